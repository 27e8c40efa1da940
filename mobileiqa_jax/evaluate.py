"""Scoring a held-out split: SROCC, PLCC, KROCC, RMSE, MAE, the scatter plot, the CSV.

`score_batches(eval_step, variables, batches, mesh)` is the evaluation the training loop runs
after each epoch; `evaluate_checkpoint` runs it on any checkpoint and split.

`evaluate_checkpoint(checkpoint_dir, config, split)` loads a checkpoint with
`checkpoint.load_model` (standalone, a training step, or a workdir -> its best step; or a
PyTorch state dict such as the authors' .pkl, with `config`), in float32, reads the
held-out split of `config.data` with the training pipeline (sharded over every device of
every process), and writes to `output_dir` (default `<checkpoint>/eval_<data>_<split>`):

  metrics.json       the metrics (+ logistic-fitted PLCC), checkpoint path, split, count
  predictions.csv    predicted score and MOS per example
  scatter.png        predicted vs MOS (matplotlib)

Without a config, the one saved next to a training checkpoint (`<workdir>/config.json`) is
used; a standalone checkpoint needs `config` (its image size comes from the checkpoint).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

from absl import logging
import jax
import ml_collections
import numpy as np

from mobileiqa_jax import checkpoint as ckpt_lib
from mobileiqa_jax import convert
from mobileiqa_jax import inference
from mobileiqa_jax import metrics as metrics_lib
from mobileiqa_jax import sharding
from mobileiqa_jax.data import feed
from mobileiqa_jax.models import runtime as runtime_lib

PyTree = Any


def make_eval_step(model: Any) -> Callable[[PyTree, jax.Array], jax.Array]:
  """The un-jitted eval step `(variables, images) -> scores` (inference mode)."""
  def eval_fn(variables: PyTree, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False)
  return eval_fn


def score_batches(eval_step: Callable, variables: PyTree, batches: Iterable[feed.Batch],
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
  fig.savefig(path)
  plt.close(fig)
  return True


def write_outputs(directory: str, pred: np.ndarray, mos: np.ndarray, title: str,
                  prefix: str = "", scatter: bool = True) -> str | None:
  """`<prefix>predictions.csv` and, with `scatter`, `<prefix>scatter.png` in `directory`.

  Returns the scatter plot's path, or None when none was written.
  """
  write_predictions(os.path.join(directory, f"{prefix}predictions.csv"), pred, mos)
  path = os.path.join(directory, f"{prefix}scatter.png")
  return path if scatter and write_scatter(path, pred, mos, title) else None


def write_predictions(path: str, pred: np.ndarray, mos: np.ndarray) -> None:
  """CSV `index,predicted,mos`, one row per held-out example in split order."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("index,predicted,mos\n")
    for i, (p, m) in enumerate(zip(pred, mos)):
      f.write(f"{i},{float(p):.6f},{float(m):.6f}\n")


def _workdir_config(path: str) -> ml_collections.ConfigDict | None:
  """The resolved config.json of the training run a checkpoint belongs to, if any."""
  d = os.path.abspath(path)
  for _ in range(3):
    f = os.path.join(d, "config.json")
    if os.path.isfile(f):
      with open(f, encoding="utf-8") as fh:
        return ml_collections.ConfigDict(json.load(fh))
    d = os.path.dirname(d)
  return None


def evaluate_checkpoint(checkpoint_dir: str, config: ml_collections.ConfigDict | None = None,
                        split: str | None = None, output_dir: str | None = None,
                        which: str = "best", batch_size: int | None = None) -> dict[str, Any]:
  """Scores a split with a checkpoint; returns the metrics (also written to output_dir)."""
  sharding.maybe_initialize_distributed(bool(config and config.get("distributed")))
  # Float32 (as predict and export) in this backend's form, decided once here.
  rt = runtime_lib.Runtime.for_platform(jax.default_backend())
  if inference.is_state_dict_file(checkpoint_dir):  # the authors' .pkl: needs --config
    path = os.path.abspath(checkpoint_dir)
    model, host_vars, model_config = convert.load_mobileiqa(path, runtime=rt)
    meta = {"model_config": model_config, "extra": {}}
  else:
    path = ckpt_lib.resolve_checkpoint(checkpoint_dir, which=which)
    model, host_vars, meta = ckpt_lib.load_model(path, runtime=rt)
  config = config or _workdir_config(path)
  if config is None:
    raise ValueError(f"{path} is not inside a training workdir: pass --config to say which "
                     "data set to evaluate on")
  config = ml_collections.ConfigDict(config.to_dict())
  if meta.get("extra", {}).get("image_size"):
    config.data.image_size = tuple(meta["extra"]["image_size"])
  if batch_size:
    config.data.eval_batch_size = batch_size
  split = split or config.data.eval_split

  mesh = sharding.make_mesh(config.get("mesh"))
  sharding.check_batch_size(config.data.eval_batch_size, mesh)
  shardings = {k: sharding.param_shardings(v, mesh, config.get("fsdp_min_size", 2**14))
               for k, v in host_vars.items()}
  variables = sharding.host_tree_to_global(host_vars, shardings)
  eval_step = jax.jit(make_eval_step(model),
                      in_shardings=(shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.batch_sharding(mesh))
  # The train loader is built too (it carries the MOS scale) but never iterated.
  data = feed.from_config(config, split)
  result, pred, mos = score_batches(eval_step, variables, data.eval_batches(), mesh)
  try:
    result["plcc_logistic"] = metrics_lib.plcc_logistic(pred, mos)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("logistic PLCC fit failed: %s", e)
  result = {k: float(v) for k, v in result.items()}

  output_dir = output_dir or (os.path.splitext(path)[0] + "_" if os.path.isfile(path)
                              else path + os.sep) + f"eval_{config.data.name}_{split}"
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
      json.dump({"checkpoint": path, "data": config.data.name, "split": split, **result}, f,
                indent=2)
    write_outputs(output_dir, pred, mos, f"{os.path.basename(path)} on {config.data.name}/"
                  f"{split}: SROCC {result['srocc']:.3f} PLCC {result['plcc']:.3f}")
  result["output_dir"] = output_dir
  return result
