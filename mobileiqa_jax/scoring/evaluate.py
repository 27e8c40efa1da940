"""`evaluate_checkpoint`: a checkpoint's metrics on a labelled split, with its plot and CSV.

`evaluate_checkpoint(path, config, split)` loads any weights `weights.loader` reads (a
checkpoint, a training step, a workdir -> its best step, or a PyTorch state dict such as the
authors' .pkl, with `config`), in float32, reads the split of `config.data` with the training
pipeline (sharded over every device of every process), scores it as the training loop's
evaluation does, and writes to `output_dir` (default `<checkpoint>/eval_<data>_<split>`):

  metrics.json       the metrics (+ logistic-fitted PLCC), checkpoint path, split, count
  predictions.csv    predicted score and MOS per example
  scatter.png        predicted vs MOS (matplotlib)

Without a config, the one saved next to a training checkpoint (`<workdir>/config.json`) is
used; a standalone checkpoint needs `config` (its image size comes from the checkpoint).
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from mobileiqa_jax import metrics as metrics_lib
from mobileiqa_jax import storage
from mobileiqa_jax.training import sharding
from mobileiqa_jax.training import train_data
from mobileiqa_jax.models import runtime as runtime_lib
from mobileiqa_jax.training import evaluation
from mobileiqa_jax.weights import loader


def _workdir_config(path: str) -> ml_collections.ConfigDict | None:
  """The resolved config.json of the training run a checkpoint belongs to, if any."""
  d = storage.absolute(path)
  for _ in range(3):
    f = storage.join(d, "config.json")
    if storage.isfile(f):
      return ml_collections.ConfigDict(json.loads(storage.read_text(f)))
    d = storage.dirname(d)
  return None


def evaluate_checkpoint(checkpoint_dir: str, config: ml_collections.ConfigDict | None = None,
                        split: str | None = None, output_dir: str | None = None,
                        which: str = "best", batch_size: int | None = None) -> dict[str, Any]:
  """Scores a split with a checkpoint; returns the metrics (also written to output_dir)."""
  sharding.maybe_initialize_distributed(bool(config and config.get("distributed")))
  # Float32 (as predict and export) in this backend's form, decided once here.
  rt = runtime_lib.Runtime.for_platform(jax.default_backend())
  model, host_vars, meta = loader.load_model(checkpoint_dir, which=which, runtime=rt)
  path = meta["path"]
  if loader.is_state_dict_file(path):  # the authors' .pkl: its size comes from --config
    meta["extra"].pop("image_size", None)
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
  eval_step = jax.jit(evaluation.make_eval_step(model),
                      in_shardings=(shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.batch_sharding(mesh))
  # The train loader is built too (it carries the MOS scale) but never iterated.
  data = train_data.from_config(config, split)
  result, pred, mos = evaluation.score_batches(eval_step, variables, data.eval_batches(), mesh)
  try:
    result["plcc_logistic"] = metrics_lib.plcc_logistic(pred, mos)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("logistic PLCC fit failed: %s", e)
  result = {k: float(v) for k, v in result.items()}

  output_dir = output_dir or (os.path.splitext(path)[0] + "_" if storage.isfile(path)
                              else storage.join(path, "")) + f"eval_{config.data.name}_{split}"
  if jax.process_index() == 0:
    storage.makedirs(output_dir)
    storage.write_atomic(storage.join(output_dir, "metrics.json"), json.dumps(
        {"checkpoint": path, "data": config.data.name, "split": split, **result}, indent=2))
    evaluation.write_outputs(output_dir, pred, mos, f"{storage.basename(path)} on {config.data.name}/"
                  f"{split}: SROCC {result['srocc']:.3f} PLCC {result['plcc']:.3f}")
  result["output_dir"] = output_dir
  return result
