"""Orbax checkpoints: one on-disk format for inference checkpoints and training checkpoints.

Layout of ONE checkpoint (an orbax composite directory):

    <ckpt>/variables/   PyTree {'params': ..., 'batch_stats': ...}  (what `model.apply` reads)
    <ckpt>/meta/        JSON {'format', 'model_config', 'training', 'extra'}
    <ckpt>/opt_state/   PyTree optimizer state                       (training checkpoints only)
    <ckpt>/train/       JSON {'step', 'best', 'metrics'}                (training checkpoints only)

`save_model(dir, ...)` writes a standalone checkpoint (variables + meta) straight into `dir`;
`launch/convert.py` uses it. Training writes the same items under `<workdir>/checkpoints/<step>/`
through an orbax `CheckpointManager` (`training/checkpointer.py`).

`load_model(path)` accepts any of:
  - a standalone checkpoint directory (holds `variables/` and `meta/`);
  - one training step directory, e.g. `runs/teacher_demo/checkpoints/1200`;
  - a training workdir (`runs/teacher_demo`) or its `checkpoints/` folder: it loads the step with
    the best selection metric (SROCC+PLCC+KROCC of an epoch-end evaluation) if any step has one,
    otherwise the latest step. `which='latest'` or `step=N` choose explicitly.
`model_config` is the architecture only (`build_model(model_config, runtime)` rebuilds it); how
the run computed and where it started (`compute_dtype`, `remat`, `head_init`) is kept apart in
`training`, so a bfloat16-trained model is scored in float32 by predict, evaluate and export
alike unless a caller passes another `runtime.Runtime`. Checkpoints written before this split
carry `dtype`, `depthwise_impl` and `backbone_kwargs.remat` inside `model_config`; reading
moves them to `training`.

Any of these paths may be a gs:// or s3:// URL (`storage`): orbax reads and writes gs://
itself; an s3:// checkpoint is read from a local copy and written through one.

`extra` conventionally holds 'image_size' ([H, W]) and 'mos_range' ([lo, hi] that the MOS was
min-max normalised from, or None when the model predicts the data set's own scale).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from mobileiqa_jax import storage
from mobileiqa_jax.weights import integrity
from mobileiqa_jax.weights.integrity import CheckpointDamagedError  # re-exported

FORMAT = "mobileiqa_jax/1"
_STEP_RE = re.compile(r"^\d+$")


# ----------------------------------------------------------------------------- helpers


def _numpy_restore_args(tree_metadata: Any) -> Any:
  """Restore everything as host numpy arrays: no device or sharding assumptions."""
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_metadata,
                      is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))


def _item_tree_metadata(path: str, item: str) -> Any:
  md = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path) / item)
  return getattr(md, "tree", md)


def is_checkpoint(path: str) -> bool:
  """Whether `path` is one checkpoint (holds `variables/` and `meta/`)."""
  return storage.isdir(storage.join(path, "variables")) and storage.isdir(
      storage.join(path, "meta"))


#: The object orbax writes last into a checkpoint in a bucket (it cannot rename a finished
#: temporary folder there); orbax's `atomicity.COMMIT_SUCCESS_FILE`.
COMMIT_MARKER = "commit_success.txt"


def is_complete(path: str) -> bool:
  """Whether a checkpoint folder is finished. Locally orbax renames a finished save into its
  name, so a folder by that name is; in a bucket, where objects appear one by one, it is
  finished when it holds orbax's commit marker or the checksum record (a checkpoint copied
  into a bucket carries the second)."""
  if not storage.is_bucket(path):
    return is_checkpoint(path)
  names = set(storage.listdir(path)) if storage.isdir(path) else set()
  return ({"variables", "meta"} <= names and
          (COMMIT_MARKER in names or integrity.MANIFEST in names))


def to_plain(x: Any) -> Any:
  """JSON-safe copy of a config-like mapping (ConfigDict, tuples, numpy scalars)."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): to_plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_plain(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def split_model_config(model_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A model config -> (architecture, training settings).

  The training settings are how the run computed (`runtime.architecture_of`: `dtype` ->
  `compute_dtype`, `backbone_kwargs.remat` -> `remat`, `depthwise_impl`), found inside the
  model configs of older checkpoints, and the head's initialisation (`head_init`): they change
  how the numbers are computed or where training started, not which model it is.
  """
  from mobileiqa_jax.models import runtime  # pylint: disable=g-import-not-at-top
  arch, training = runtime.architecture_of(to_plain(dict(model_config)))
  if "head_init" in arch:
    training["head_init"] = arch.pop("head_init")
  return arch, training


def split_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
  """meta with the training settings moved out of `model_config` into `training`."""
  meta = dict(meta)
  if isinstance(meta.get("model_config"), Mapping):
    arch, training = split_model_config(meta["model_config"])
    meta["model_config"] = arch
    if training or "training" in meta:
      meta["training"] = dict(training, **dict(meta.get("training") or {}))
  return meta


# ----------------------------------------------------------------------------- inference API


def save_model(directory: str, variables: Any, model_config: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None, *, force: bool = True) -> str:
  """Writes a standalone inference checkpoint (variables + model config JSON) to `directory`.

  Every process must call it (orbax coordinates multi-host writes).

  Args:
    directory: destination; replaced when `force` and it exists.
    variables: {'params': ..., 'batch_stats': ...}.
    model_config: the serialisable model config that `build_model` takes; its training
      settings (`dtype`, `backbone_kwargs.remat`) are stored apart, under `training`.
    extra: anything else the consumer needs (e.g. image_size, mos_range).
    force: overwrite an existing checkpoint.

  Returns:
    The absolute directory written.
  """
  directory = storage.absolute(directory)
  storage.check_bucket(directory)
  meta = split_meta({"format": FORMAT, "model_config": to_plain(model_config),
                      "extra": to_plain(dict(extra or {}))})
  if not storage.orbax_can_write(directory):  # e.g. s3://: written locally, then copied
    with tempfile.TemporaryDirectory(prefix="mobileiqa_jax-") as tmp:
      local = save_model(os.path.join(tmp, "ckpt"), variables, model_config, extra, force=force)
      if storage.exists(directory) and not force:
        raise FileExistsError(f"{directory} exists (pass force=True to replace it).")
      storage.rmtree(directory)
      storage.upload_tree(local, directory, last=integrity.MANIFEST)
    return directory
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(directory, ocp.args.Composite(
        variables=ocp.args.PyTreeSave(dict(variables)), meta=ocp.args.JsonSave(meta)),
               force=force)
  if jax.process_index() == 0:
    integrity.seal(directory)  # so a damaged copy is named when it is read
  return directory


def list_steps(root: str) -> list[int]:
  """Finished checkpoint steps under a checkpoints folder (orbax leaves tmp dirs unnamed)."""
  if not storage.isdir(root):
    return []
  return sorted(int(n) for n in storage.listdir(root)
                if _STEP_RE.match(n) and is_complete(storage.join(root, n)))


def read_json_item(path: str, item: str) -> dict[str, Any] | None:
  """Reads a JSON item (`meta` or `train`) of one checkpoint; None when absent."""
  if not storage.isdir(storage.join(path, item)):
    return None
  if not storage.orbax_can_write(path):  # orbax cannot read it where it is (s3://)
    return json.loads(storage.read_text(storage.join(path, item, "metadata")))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
  return dict(out[item])


def resolve_checkpoint(path: str, which: str = "best", step: int | None = None) -> str:
  """Turns a checkpoint, step directory, checkpoints folder or workdir into one checkpoint path."""
  path = storage.absolute(path)
  storage.check_bucket(path)
  if is_checkpoint(path) and step is None:
    return path
  root = storage.join(path, "checkpoints") if storage.isdir(
      storage.join(path, "checkpoints")) else path
  steps = list_steps(root)
  if not steps:
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a directory holding variables/ and meta/ "
        f"(launch/convert.py output), a training workdir, or its checkpoints/ folder")
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"step {step} not in {root}; have {steps}")
    return storage.join(root, str(step))
  if which == "best":
    scored = []
    for s in steps:
      train = read_json_item(storage.join(root, str(s)), "train") or {}
      sel = (train.get("metrics") or {}).get("selection")
      if sel is not None and np.isfinite(sel):
        scored.append((sel, s))
    if scored:
      return storage.join(root, str(max(scored)[1]))
  elif which != "latest":
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  return storage.join(root, str(steps[-1]))


# What tensorstore and orbax say when a checkpoint's files are not what was written (truncated,
# missing, garbled), as opposed to a caller's mistake such as a target of another structure.
_DAMAGE_MARKERS = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "is not valid for value of size",
                   "Error reading", "Unexpected end", "corrupt", "Expecting value",
                   "No such file or directory")


def _damage(error: BaseException) -> str | None:
  """The first line of the damage report in `error`'s chain, or None when it is no damage."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError)) or any(
        m in text for m in _DAMAGE_MARKERS):
      return text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    error = error.__cause__ or error.__context__
  return None


def unreadable(path: str, error: BaseException) -> CheckpointDamagedError | None:
  """An orbax/tensorstore read failure as a damaged-checkpoint error naming `path`."""
  damage = _damage(error)
  return None if damage is None else CheckpointDamagedError(path, f"it cannot be read ({damage})")


def load_variables(path: str) -> tuple[Any, dict[str, Any]]:
  """Host-numpy variables and the meta dict of one resolved checkpoint path.

  Raises:
    CheckpointDamagedError: the checkpoint's files fail their checksums, or cannot be read.
  """
  sealed = integrity.verify(path, items=("variables", "meta"))
  if not storage.orbax_can_write(path):  # orbax cannot read it where it is: a local copy
    with storage.local_tree(path, names=("variables", "meta")) as local:
      return load_variables(local)
  try:
    tree = _item_tree_metadata(path, "variables")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      out = ckptr.restore(path, ocp.args.Composite(
          variables=ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(tree)),
          meta=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except  (orbax wraps tensorstore's errors)
    # Files that pass their checksums are intact: their read error is not damage.
    damaged = None if sealed else unreadable(path, e)
    if damaged is None:
      raise
    raise damaged from e
  variables = dict(out["variables"])
  variables.setdefault("batch_stats", {})
  return variables, split_meta(out["meta"])


def load_model(directory: str, which: str = "best", step: int | None = None,
               runtime: Any = None) -> tuple[Any, Any, dict[str, Any]]:
  """Loads (model, variables, meta) from any checkpoint the project writes.

  Args:
    directory: standalone checkpoint, training step directory, checkpoints folder or workdir.
    which: for workdirs, 'best' (largest selection metric, else latest) or 'latest'.
    step: for workdirs, an explicit step.
    runtime: how the model runs (`runtime.Runtime`); None: `runtime.DEFAULT` (float32),
      whatever the run trained in (its settings are in meta['training']).

  Returns:
    model: the Flax module built from the stored architecture.
    variables: {'params', 'batch_stats'} as host numpy arrays (device_put them as needed).
    meta: {'format', 'model_config' (architecture), 'training' (when stored), 'extra',
      'path', plus 'train' for training checkpoints}.
  """
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  path = resolve_checkpoint(directory, which=which, step=step)
  variables, meta = load_variables(path)
  meta["path"] = path
  train = read_json_item(path, "train")
  if train is not None:
    meta["train"] = train
  model = mobileiqa.build_model(meta["model_config"], runtime)
  logging.info("loaded the %s from %s", meta["model_config"].get("variant", "model"), path)
  return model, variables, meta
