"""Tests for mobileiqa_jax.metrics against scipy and hand-computed cases."""

import numpy as np
import pytest
import scipy.stats

from mobileiqa_jax import metrics


def _random_pair(seed, n=200, ties=False):
  rng = np.random.default_rng(seed)
  mos = rng.uniform(size=n)
  pred = mos + 0.3 * rng.normal(size=n)
  if ties:
    # Rounding makes many ties in both vectors: exercises average ranks and tau-b.
    mos, pred = np.round(mos * 5), np.round(pred * 5)
  return pred, mos


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('seed', [0, 1])
def test_correlations_match_scipy(seed, ties):
  pred, mos = _random_pair(seed, ties=ties)
  assert metrics.srocc(pred, mos) == pytest.approx(
      scipy.stats.spearmanr(pred, mos).statistic, abs=1e-12)
  assert metrics.plcc(pred, mos) == pytest.approx(
      scipy.stats.pearsonr(pred, mos).statistic, abs=1e-12)
  assert metrics.krocc(pred, mos) == pytest.approx(
      scipy.stats.kendalltau(pred, mos).statistic, abs=1e-12)


def test_errors_match_numpy():
  pred, mos = _random_pair(2)
  assert metrics.rmse(pred, mos) == pytest.approx(
      np.sqrt(np.mean((pred - mos)**2)), rel=1e-12)
  assert metrics.mae(pred, mos) == pytest.approx(
      np.mean(np.abs(pred - mos)), rel=1e-12)


def test_known_cases():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  assert metrics.srocc(x, x) == 1.0
  assert metrics.plcc(x, 2 * x + 1) == pytest.approx(1.0)
  assert metrics.krocc(x, -x) == pytest.approx(-1.0)
  # Monotonic but nonlinear: ranks agree perfectly, linear correlation does not.
  assert metrics.srocc(x, np.exp(3 * x)) == 1.0
  assert metrics.plcc(x, np.exp(3 * x)) < 0.95
  # tau-b by hand: pairs of [1,2,2,3] vs [1,2,3,4]: 5 concordant, 0 discordant,
  # 1 tie in x only -> 5 / sqrt((6 - 1) * 6).
  assert metrics.krocc([1, 2, 2, 3], x) == pytest.approx(5 / np.sqrt(30))
  assert metrics.rmse([0, 0, 0], [3, 4, 0]) == pytest.approx(np.sqrt(25 / 3))
  assert metrics.mae([0, 0, 0], [3, -4, 0]) == pytest.approx(7 / 3)


def test_iqa_metrics_and_selection_score():
  pred, mos = _random_pair(3)
  m = metrics.iqa_metrics(pred.reshape(-1, 1), mos)  # [N, 1] vs [N] is fine
  assert set(m) == {'srocc', 'plcc', 'krocc', 'rmse', 'mae', 'plcc_logistic'}
  assert all(isinstance(v, float) for v in m.values())
  assert metrics.selection_score(m) == pytest.approx(
      m['srocc'] + m['plcc'] + m['krocc'])
  assert 'plcc_logistic' not in metrics.iqa_metrics(pred, mos, logistic=False)


def test_logistic_fit_recovers_nonlinear_relation():
  rng = np.random.default_rng(4)
  pred = rng.uniform(-3, 3, size=300)
  mos = 1 / (1 + np.exp(-2 * pred)) + 0.01 * rng.normal(size=300)
  # The fit straightens a sigmoid relation that raw PLCC underrates.
  assert metrics.plcc_logistic(pred, mos) > 0.99
  assert metrics.plcc_logistic(pred, mos) > metrics.plcc(pred, mos) + 0.02
  assert metrics.plcc_logistic(pred, mos, n_params=4) > 0.99


@pytest.mark.parametrize('pred, mos, match', [
    ([0.1, 0.2, 0.3], [0.1, 0.2], 'same number of values'),
    ([0.1, 0.2], [0.1, 0.2], 'at least 3 samples'),
    ([0.1, np.nan, 0.3], [0.1, 0.2, 0.3], 'pred has 1 non-finite'),
    ([0.1, 0.2, 0.3], [0.1, 0.2, np.inf], 'mos has 1 non-finite'),
    ([0.5, 0.5, 0.5], [0.1, 0.2, 0.3], 'pred is constant'),
    ([0.1, 0.2, 0.3], [1, 1, 1], 'mos is constant'),
])
def test_bad_inputs_raise_clear_errors(pred, mos, match):
  with pytest.raises(ValueError, match=match):
    metrics.iqa_metrics(pred, mos)


def test_errors_allow_constant_inputs():
  # RMSE/MAE are defined for a constant prediction; only correlations are not.
  assert metrics.rmse([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]) == 0.0
