"""Scoring a held-out split: SROCC, PLCC, KROCC, RMSE, MAE, the scatter plot, the CSV.

`score_batches(eval_step, variables, batches, mesh)` is the evaluation the training loop runs
after each epoch; `scoring/evaluate.py` runs the same on any checkpoint and split.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import jax
import numpy as np

from mobileiqa_jax import metrics as metrics_lib
from mobileiqa_jax import storage
from mobileiqa_jax.training import sharding

PyTree = Any


def make_eval_step(model: Any) -> Callable[[PyTree, jax.Array], jax.Array]:
  """The un-jitted eval step `(variables, images) -> scores` (inference mode)."""
  def eval_fn(variables: PyTree, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False)
  return eval_fn


def score_batches(eval_step: Callable, variables: PyTree, batches: Iterable[Mapping[str, np.ndarray]],
                  mesh: Any) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """Scores a held-out split: (metrics, predictions, MOS) over the valid (unpadded) examples.

  `batches` are this process's rows with a `mask` (False on padding); every process gets the
  metrics of the whole split.
  """
  preds, moses = [], []
  for batch in batches:
    g = sharding.host_to_global(batch, mesh)
    scores = eval_step(variables, g["image"])
    # Every process gets the full global batch of scores, MOS and validity mask.
    s, m, valid = sharding.global_to_host((scores, g["mos"], g["mask"]))
    valid = valid.astype(bool)
    preds.append(s[valid])
    moses.append(m[valid])
  pred = np.concatenate(preds) if preds else np.zeros((0,), np.float32)
  mos = np.concatenate(moses) if moses else np.zeros((0,), np.float32)
  try:
    result = metrics_lib.iqa_metrics(pred, mos, logistic=False)
    result["selection"] = metrics_lib.selection_score(result)
  except ValueError as e:
    # A collapsed model (one score for every image) has no correlation; training goes on,
    # and this evaluation can never be the best one.
    logging.warning("evaluation: %s", e)
    result = {"srocc": np.nan, "plcc": np.nan, "krocc": np.nan,
              "rmse": float(np.sqrt(np.mean((pred - mos) ** 2))) if len(pred) else np.nan,
              "mae": float(np.mean(np.abs(pred - mos))) if len(pred) else np.nan,
              "selection": np.nan}
  result["num_examples"] = float(len(pred))
  return result, pred, mos


def write_scatter(path: str, pred: np.ndarray, mos: np.ndarray, title: str) -> bool:
  """Predicted vs MOS scatter PNG (matplotlib, Agg backend); False when matplotlib is absent."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib not installed: no scatter plot (pip install matplotlib)")
    return False
  fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
  ax.scatter(mos, pred, s=8, alpha=0.6)
  lo = float(min(np.min(mos), np.min(pred))) if len(pred) else 0.0
  hi = float(max(np.max(mos), np.max(pred))) if len(pred) else 1.0
  ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
  ax.set_xlabel("MOS")
  ax.set_ylabel("predicted")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  buffer = io.BytesIO()  # a local file or a bucket object: one write either way
  fig.savefig(buffer, format="png")
  plt.close(fig)
  storage.write_atomic(path, buffer.getvalue())
  return True


def write_outputs(directory: str, pred: np.ndarray, mos: np.ndarray, title: str,
                  prefix: str = "", scatter: bool = True) -> str | None:
  """`<prefix>predictions.csv` and, with `scatter`, `<prefix>scatter.png` in `directory`.

  Returns the scatter plot's path, or None when none was written.
  """
  write_predictions(storage.join(directory, f"{prefix}predictions.csv"), pred, mos)
  path = storage.join(directory, f"{prefix}scatter.png")
  return path if scatter and write_scatter(path, pred, mos, title) else None


def write_predictions(path: str, pred: np.ndarray, mos: np.ndarray) -> None:
  """CSV `index,predicted,mos`, one row per held-out example in split order."""
  with storage.atomic_text(path) as f:
    f.write("index,predicted,mos\n")
    for i, (p, m) in enumerate(zip(pred, mos)):
      f.write(f"{i},{float(p):.6f},{float(m):.6f}\n")
