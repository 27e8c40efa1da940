"""One loader for every kind of weights the project reads: `load_model(path)`.

`path` may be
- an orbax checkpoint folder (`launch/convert.py` output, or one training step),
- a training workdir or its `checkpoints/` folder (its best step by the selection metric,
  or `which='latest'`),
- a PyTorch state dict file: the authors' `.pkl`, or a `.pth`/`.pt`/`.bin`/`.safetensors`.
  The model (teacher: `global_vit.*` keys, student: `local_cnn.*`) and the head's size are
  read from its keys and shapes, and it is converted in memory, strictly.

Scoring (`scoring.scorer.load`), evaluation (`scoring.evaluate`) and distillation's frozen
teacher all come through here, so each accepts the same paths.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from mobileiqa_jax import storage
from mobileiqa_jax.data import preprocess
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.weights import convert

#: File endings of the PyTorch state dicts `load_model` converts.
STATE_DICT_EXTENSIONS = (".pkl", ".pth", ".pt", ".bin", ".safetensors")


def is_state_dict_file(path: str) -> bool:
  """Whether `path` names a PyTorch/timm state-dict file rather than an orbax checkpoint."""
  return path.lower().endswith(STATE_DICT_EXTENSIONS) and storage.isfile(path)


def load_model(path: str | os.PathLike, *, which: str = "best", step: int | None = None,
               model: str | None = None, runtime: Any = None, copy: bool = True,
               variables_template: Callable[[Mapping[str, Any], Callable[[], Any]], Any]
               | None = None) -> tuple[Any, Any, dict[str, Any]]:
  """(module, host variables, meta) of any checkpoint, workdir or state dict.

  Args:
    path: see the module docstring.
    which: for a workdir: 'best' or 'latest'.
    step: for a workdir: an explicit step.
    model: 'teacher' or 'student' to insist on one (a mismatch is an error).
    runtime: how the module runs (`runtime.Runtime`); None: `runtime.DEFAULT` (float32).
    copy: for a state dict, whether its arrays are copied (False when it was read for this
      call alone).
    variables_template: for a state dict, `f(architecture, build)` -> the model's variables'
      shapes, which `build()` computes (a cache may keep them); default `build()`.

  Returns:
    The Flax module, its variables ({'params', 'batch_stats'} as host numpy arrays) and a meta
    dict with at least 'path' (what was read), 'model_config' (the architecture) and 'extra'
    (what a training run stored: image_size, mos_range, ...; for a state dict its
    reference image size).

  Raises:
    FileNotFoundError: nothing at `path`, or no checkpoint in it.
    ValueError: a file that is no state dict, or a model other than `model`.
  """
  path = os.fspath(path)
  storage.check_bucket(path)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} does not exist (expected a checkpoint folder, a training "
                            "workdir or a .pkl/.pth state dict).")
  if is_state_dict_file(path):
    module, variables, config = convert.mobileiqa_from_state_dict(
        convert.load_state_dict(path), model, source=path, runtime=runtime, copy=copy,
        template_of=variables_template)
    meta = {"path": storage.absolute(path), "model_config": config,
            "extra": {"image_size": list(preprocess.REFERENCE_IMAGE_SIZE), "source": path}}
    return module, variables, meta
  if storage.isfile(path):
    raise ValueError(f"{path} is a file but not a state dict ({', '.join(STATE_DICT_EXTENSIONS)})"
                     ": pass a checkpoint folder, a training workdir or a state dict.")
  module, variables, meta = checkpoint.load_model(path, which=which, step=step, runtime=runtime)
  variant = meta["model_config"].get("variant")
  if model is not None and variant != model:
    raise ValueError(f"{path} holds a {variant} model, not a {model}.")
  meta["extra"] = dict(meta.get("extra") or {})
  return module, variables, meta
