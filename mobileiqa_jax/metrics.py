"""Image-quality metrics: SROCC, PLCC, KROCC, RMSE, MAE and logistic-fitted PLCC.

These are the numbers the IQA literature and the reference report (docs/model.md,
section 5): correlations between predicted scores and mean opinion scores (MOS)
over a held-out split. They run on host numpy arrays at the end of an evaluation
pass, so they use float64 numpy/scipy rather than jax.

* SROCC: Spearman rank correlation (ties get average ranks, as scipy).
* PLCC: Pearson linear correlation of the raw predictions (no fit), as the
  reference selects models with.
* KROCC: Kendall tau-b (tie-corrected), as `scipy.stats.kendalltau`.
* RMSE, MAE: on the raw predictions, as the UHD-IQA challenge ranks them.
* PLCC after the VQEG logistic fit (`plcc_logistic`): the convention of many
  papers; an extra, not used for model selection.

Every function validates its inputs and raises `ValueError` naming the problem:
different lengths, fewer than 3 samples, NaN/inf values, or (for correlations)
a constant input, where a correlation is undefined.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.optimize
import scipy.stats

_MIN_SAMPLES = 3


def _as_vectors(pred: Any, mos: Any) -> tuple[np.ndarray, np.ndarray]:
  """Returns `pred` and `mos` as validated float64 vectors.

  Any shape is accepted as long as both hold the same number of values: a
  model's `[N, 1]` output against `[N]` labels is the usual case.
  """
  p = np.asarray(pred, dtype=np.float64).reshape(-1)
  m = np.asarray(mos, dtype=np.float64).reshape(-1)
  if p.size != m.size:
    raise ValueError(
        f'pred and mos must have the same number of values: pred has {p.size} '
        f'(shape {np.shape(pred)}), mos has {m.size} (shape {np.shape(mos)}).')
  if p.size < _MIN_SAMPLES:
    raise ValueError(
        f'IQA metrics need at least {_MIN_SAMPLES} samples, got {p.size}.')
  for name, v in (('pred', p), ('mos', m)):
    bad = ~np.isfinite(v)
    if bad.any():
      idx = np.flatnonzero(bad)
      raise ValueError(
          f'{name} has {idx.size} non-finite value(s) (NaN or inf), first at '
          f'index {idx[0]} ({v[idx[0]]}); cannot compute IQA metrics.')
  return p, m


def _check_not_constant(p: np.ndarray, m: np.ndarray) -> None:
  for name, v in (('pred', p), ('mos', m)):
    if np.all(v == v[0]):
      raise ValueError(
          f'{name} is constant (all {v.size} values equal {v[0]!r}): a '
          'correlation is undefined. A model that outputs one score for every '
          'image has collapsed; check the learning rate and the labels.')


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a = a - a.mean()
  b = b - b.mean()
  r = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
  # Rounding can push |r| a hair above 1 for perfectly correlated inputs.
  return float(np.clip(r, -1.0, 1.0))


def srocc(pred: Any, mos: Any) -> float:
  """Spearman rank-order correlation (average ranks for ties, as scipy)."""
  p, m = _as_vectors(pred, mos)
  _check_not_constant(p, m)
  return _pearson(scipy.stats.rankdata(p), scipy.stats.rankdata(m))


def plcc(pred: Any, mos: Any) -> float:
  """Pearson linear correlation of the raw predictions (no logistic fit)."""
  p, m = _as_vectors(pred, mos)
  _check_not_constant(p, m)
  return _pearson(p, m)


def krocc(pred: Any, mos: Any) -> float:
  """Kendall rank correlation, tau-b (tie-corrected), as `scipy.stats.kendalltau`."""
  p, m = _as_vectors(pred, mos)
  _check_not_constant(p, m)
  # scipy's O(n log n) tau-b; a pairwise numpy version is O(n^2) memory.
  return float(scipy.stats.kendalltau(p, m, variant='b').statistic)


def rmse(pred: Any, mos: Any) -> float:
  """Root mean squared error of the raw predictions against MOS."""
  p, m = _as_vectors(pred, mos)
  return float(np.sqrt(np.mean((p - m)**2)))


def mae(pred: Any, mos: Any) -> float:
  """Mean absolute error of the raw predictions against MOS."""
  p, m = _as_vectors(pred, mos)
  return float(np.mean(np.abs(p - m)))


def logistic_5(x: np.ndarray, b1: float, b2: float, b3: float, b4: float,
               b5: float) -> np.ndarray:
  """VQEG (2003) 5-parameter monotonic logistic: b1(1/2 - 1/(1+e^{b2(x-b3)})) + b4 x + b5."""
  z = np.clip(b2 * (x - b3), -500.0, 500.0)  # exp overflow guard
  return b1 * (0.5 - 1.0 / (1.0 + np.exp(z))) + b4 * x + b5


def logistic_4(x: np.ndarray, b1: float, b2: float, b3: float,
               b4: float) -> np.ndarray:
  """VQEG 4-parameter logistic: (b1 - b2) / (1 + e^{-(x-b3)/|b4|}) + b2."""
  z = np.clip(-(x - b3) / max(abs(b4), 1e-12), -500.0, 500.0)
  return (b1 - b2) / (1.0 + np.exp(z)) + b2


def fit_logistic(pred: Any, mos: Any, n_params: int = 5) -> np.ndarray:
  """Maps `pred` to the MOS scale with the VQEG logistic fitted by least squares.

  Args:
    pred: predicted scores.
    mos: mean opinion scores.
    n_params: 5 (`logistic_5`, the usual choice) or 4 (`logistic_4`).

  Returns:
    The fitted predictions, float64 of shape `[N]`. If the fit does not
    converge, a least-squares linear map is returned instead (with a warning),
    whose PLCC equals the unfitted PLCC.
  """
  p, m = _as_vectors(pred, mos)
  _check_not_constant(p, m)
  if n_params == 5:
    fn = logistic_5
    beta0 = [np.max(m) - np.min(m), 1.0 / np.std(p), np.mean(p), 0.0, np.mean(m)]
  elif n_params == 4:
    fn = logistic_4
    beta0 = [np.max(m), np.min(m), np.mean(p), np.std(p)]
  else:
    raise ValueError(f'n_params must be 4 or 5, got {n_params}.')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', scipy.optimize.OptimizeWarning)
      beta, _ = scipy.optimize.curve_fit(fn, p, m, p0=beta0, maxfev=20000)
    fitted = fn(p, *beta)
    if np.all(np.isfinite(fitted)) and not np.all(fitted == fitted[0]):
      return fitted
  except RuntimeError:
    pass
  warnings.warn(f'{n_params}-parameter logistic fit did not converge; using a '
                'linear fit for plcc_logistic.')
  slope, intercept = np.polyfit(p, m, 1)
  return slope * p + intercept


def plcc_logistic(pred: Any, mos: Any, n_params: int = 5) -> float:
  """PLCC between MOS and the predictions after the VQEG logistic fit."""
  p, m = _as_vectors(pred, mos)
  return _pearson(fit_logistic(p, m, n_params), m)


def iqa_metrics(pred: Any, mos: Any, logistic: bool = True) -> dict[str, float]:
  """All IQA metrics of `pred` against `mos`.

  Args:
    pred: predicted scores, any shape with as many values as `mos`.
    mos: mean opinion scores (the labels, on any scale).
    logistic: also compute `plcc_logistic` (5-parameter VQEG fit); it costs a
      small nonlinear least-squares fit.

  Returns:
    `{'srocc', 'plcc', 'krocc', 'rmse', 'mae'[, 'plcc_logistic']}` as floats.

  Raises:
    ValueError: on a length mismatch, fewer than 3 samples, NaN/inf values, or
      a constant `pred` or `mos`.
  """
  p, m = _as_vectors(pred, mos)
  out = {
      'srocc': srocc(p, m),
      'plcc': plcc(p, m),
      'krocc': krocc(p, m),
      'rmse': rmse(p, m),
      'mae': mae(p, m),
  }
  if logistic:
    out['plcc_logistic'] = plcc_logistic(p, m)
  return out


def selection_score(metrics: Mapping[str, float]) -> float:
  """SROCC + PLCC + KROCC: the quantity the reference picks its best epoch by."""
  return float(metrics['srocc'] + metrics['plcc'] + metrics['krocc'])
