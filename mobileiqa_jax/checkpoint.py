"""Orbax checkpoints: one on-disk format for inference checkpoints and training checkpoints.

Layout of ONE checkpoint (an orbax composite directory):

    <ckpt>/variables/   PyTree {'params': ..., 'batch_stats': ...}  (what `model.apply` reads)
    <ckpt>/meta/        JSON {'format', 'model_config', 'training', 'extra'}
    <ckpt>/opt_state/   PyTree optimizer state                       (training checkpoints only)
    <ckpt>/train/       JSON {'step', 'best', 'metrics'}                (training checkpoints only)

`save_model(dir, ...)` writes a standalone checkpoint (variables + meta) straight into `dir`;
`launch/convert.py` uses it. Training writes the same items under `<workdir>/checkpoints/<step>/`
through an orbax `CheckpointManager` (`TrainCheckpointer`).

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

`extra` conventionally holds 'image_size' ([H, W]) and 'mos_range' ([lo, hi] that the MOS was
min-max normalised from, or None when the model predicts the data set's own scale).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

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
  return os.path.isdir(os.path.join(path, "variables")) and os.path.isdir(
      os.path.join(path, "meta"))


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


def _split_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
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
  directory = os.path.abspath(directory)
  meta = _split_meta({"format": FORMAT, "model_config": to_plain(model_config),
                      "extra": to_plain(dict(extra or {}))})
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(directory, ocp.args.Composite(
        variables=ocp.args.PyTreeSave(dict(variables)), meta=ocp.args.JsonSave(meta)),
               force=force)
  return directory


def list_steps(root: str) -> list[int]:
  """Finished checkpoint steps under a checkpoints folder (orbax leaves tmp dirs unnamed)."""
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root)
                if _STEP_RE.match(n) and is_checkpoint(os.path.join(root, n)))


def read_json_item(path: str, item: str) -> dict[str, Any] | None:
  """Reads a JSON item (`meta` or `train`) of one checkpoint; None when absent."""
  if not os.path.isdir(os.path.join(path, item)):
    return None
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
  return dict(out[item])


def resolve_checkpoint(path: str, which: str = "best", step: int | None = None) -> str:
  """Turns a checkpoint, step directory, checkpoints folder or workdir into one checkpoint path."""
  path = os.path.abspath(path)
  if is_checkpoint(path) and step is None:
    return path
  root = os.path.join(path, "checkpoints") if os.path.isdir(
      os.path.join(path, "checkpoints")) else path
  steps = list_steps(root)
  if not steps:
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a directory holding variables/ and meta/ "
        f"(launch/convert.py output), a training workdir, or its checkpoints/ folder")
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"step {step} not in {root}; have {steps}")
    return os.path.join(root, str(step))
  if which == "best":
    scored = []
    for s in steps:
      train = read_json_item(os.path.join(root, str(s)), "train") or {}
      sel = (train.get("metrics") or {}).get("selection")
      if sel is not None and np.isfinite(sel):
        scored.append((sel, s))
    if scored:
      return os.path.join(root, str(max(scored)[1]))
  elif which != "latest":
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  return os.path.join(root, str(steps[-1]))


def load_variables(path: str) -> tuple[Any, dict[str, Any]]:
  """Host-numpy variables and the meta dict of one resolved checkpoint path."""
  tree = _item_tree_metadata(path, "variables")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, ocp.args.Composite(
        variables=ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(tree)),
        meta=ocp.args.JsonRestore()))
  variables = dict(out["variables"])
  variables.setdefault("batch_stats", {})
  return variables, _split_meta(out["meta"])


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


# ----------------------------------------------------------------------------- training


class TrainCheckpointer:
  """Training checkpoints in `<workdir>/checkpoints`: keep the last K and the best by metric.

  All processes must call `save`/`restore`/`wait` (orbax coordinates multi-host saves; each
  process writes the shards it owns).
  """

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    pp = ocp.checkpoint_managers
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        # Epoch-end checkpoints carry the selection metric; mid-epoch ones do not.
        pp.BestN(get_metric_fn=lambda m: m["selection"], n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("variables", "opt_state", "meta", "train"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, variables: Any, opt_state: Any, meta: Mapping[str, Any],
           train: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> bool:
    """Starts an (async) save; `train['metrics']` gets `metrics` so `load_model` can pick best."""
    train = to_plain(dict(train, metrics=dict(metrics) if metrics else None))
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            variables=ocp.args.PyTreeSave(dict(variables)),
            opt_state=ocp.args.PyTreeSave(opt_state),
            meta=ocp.args.JsonSave(_split_meta(to_plain(dict(meta)))),
            train=ocp.args.JsonSave(train)),
        metrics=to_plain(dict(metrics)) if metrics else None,
        force=True)

  def restore(self, step: int, variables_target: Any,
              opt_state_target: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Restores into targets of jax.ShapeDtypeStruct with shardings (sharded restore)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.PyTreeRestore(
            item=variables_target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(variables_target)),
        opt_state=ocp.args.PyTreeRestore(
            item=opt_state_target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(opt_state_target)),
        train=ocp.args.JsonRestore()))
    return out["variables"], out["opt_state"], dict(out["train"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------- resume check

# Config fields a resumed run may change: they say how long to run, how often to log, evaluate
# and save, and how the work is spread (mesh, processes, data threads), not what is trained or
# how the numbers are computed. `remat` recomputes the same values in the backward pass; the
# depthwise forms compute the same function (top-level since the runtime split, under `model`
# in older workdirs' config.json).
# A field listed here covers everything below it (`checkpoint` covers `checkpoint.keep`).
SAFE_TO_CHANGE_ON_RESUME = (
    "num_epochs", "max_steps", "eval_every_epochs", "log_every_steps", "progress_bar",
    "scatter_plot", "checkpoint", "distributed", "mesh", "fsdp_min_size", "remat", "name",
    "depthwise_impl", "model.depthwise_impl",
    "data.num_workers", "data.eval_batch_size", "data.data_dir",
)


class ResumeConfigError(ValueError):
  """A workdir's checkpoints were trained with a config the new run contradicts."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def _is_safe(field: str) -> bool:
  return any(field == s or field.startswith(s + ".") for s in SAFE_TO_CHANGE_ON_RESUME)


def check_resume_config(workdir: str, config: Any) -> None:
  """Refuses to resume a workdir's checkpoints with a config that differs from its config.json.

  Call it before writing anything into the workdir. A workdir without checkpoints (a new run)
  or without config.json passes. Fields in `SAFE_TO_CHANGE_ON_RESUME` may differ.

  Raises:
    ResumeConfigError: listing every differing field with its stored and new value.
  """
  workdir = os.path.abspath(workdir)
  if not list_steps(os.path.join(workdir, "checkpoints")):
    return
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    logging.warning("%s holds checkpoints but no config.json: cannot check that the resumed "
                    "config matches them", workdir)
    return
  with open(path, encoding="utf-8") as f:
    stored = _flatten(json.load(f))
  new = _flatten(json.loads(json.dumps(to_plain(config))))  # tuples -> lists, as stored
  missing = object()
  diffs = [f"{k}: {stored.get(k, missing)!r} -> {new.get(k, missing)!r}".replace(
      repr(missing), "(absent)") for k in sorted(set(stored) | set(new))
           if stored.get(k, missing) != new.get(k, missing) and not _is_safe(k)]
  if diffs:
    raise ResumeConfigError(
        f"{workdir} holds checkpoints trained with a different config ({path}); refusing to "
        f"resume with {'; '.join(diffs)}. Use the stored values or a new --workdir (fields "
        f"safe to change on resume: {', '.join(SAFE_TO_CHANGE_ON_RESUME)}).")
