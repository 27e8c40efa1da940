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

import errno
import json
import os
import re
import shutil
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

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
  if jax.process_index() == 0:
    integrity.seal(directory)  # so a damaged copy is named when it is read
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


def _unreadable(path: str, error: BaseException) -> CheckpointDamagedError | None:
  """An orbax/tensorstore read failure as a damaged-checkpoint error naming `path`."""
  damage = _damage(error)
  return None if damage is None else CheckpointDamagedError(path, f"it cannot be read ({damage})")


def load_variables(path: str) -> tuple[Any, dict[str, Any]]:
  """Host-numpy variables and the meta dict of one resolved checkpoint path.

  Raises:
    CheckpointDamagedError: the checkpoint's files fail their checksums, or cannot be read.
  """
  sealed = integrity.verify(path, items=("variables", "meta"))
  try:
    tree = _item_tree_metadata(path, "variables")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      out = ckptr.restore(path, ocp.args.Composite(
          variables=ocp.args.PyTreeRestore(restore_args=_numpy_restore_args(tree)),
          meta=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except  (orbax wraps tensorstore's errors)
    # Files that pass their checksums are intact: their read error is not damage.
    damaged = None if sealed else _unreadable(path, e)
    if damaged is None:
      raise
    raise damaged from e
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


class CheckpointDiskFullError(OSError):
  """A checkpoint did not fit on the workdir's file system; earlier checkpoints are intact."""


def _is_disk_full(error: BaseException) -> bool:
  """Whether an orbax save failed for want of space (tensorstore: RESOURCE_EXHAUSTED)."""
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  text = str(error)
  return "No space left on device" in text or "os_error_code='28'" in text or (
      "RESOURCE_EXHAUSTED" in text and "writ" in text.lower())


def _tree_bytes(*trees: Any) -> int:
  return int(sum(getattr(x, "nbytes", 0) for t in trees for x in jax.tree.leaves(t)))



# Orbax saves a replicated array by splitting it across its replicas ("replica-parallel"), one
# device-to-host slice per replica. Each slice shape on each device is a jit(slice) compile: on
# a data-parallel mesh a model's hundreds of small leaves (biases, norms) cost hundreds of
# compiles at the first save on every host (400 on 8 CPU devices for the tests' smallest
# student, 8 s of 61 s). Below this size a leaf is copied whole from one replica instead; the
# large ones, where splitting the transfer pays, are still split.
_MIN_REPLICA_SLICE_BYTES = 1 << 20


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler with orbax's standard leaf types, small arrays saved unsplit."""
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
      (jax.Array, th.ArrayHandler(
          min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)),
      (str, th.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class TrainCheckpointer:
  """Training checkpoints in `<workdir>/checkpoints`: keep the last K and the best by metric.

  All processes must call `save`/`restore_latest_good`/`wait` (orbax coordinates multi-host
  saves; each process writes the shards it owns). Besides orbax's own atomic commit (an
  unfinished save never becomes a step), a finished step gets a checksum record
  (`integrity.seal`, process 0) once its save is known to be complete, so a
  resume can tell a damaged step from a good one and fall back.
  """

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self._is_main = jax.process_index() == 0
    self._unsealed: list[int] = []  # steps this run saved whose checksums are not yet recorded
    self._in_flight: tuple[int, int] | None = None  # (step, bytes) of the save under way
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
    self._async = async_save
    self._closed = False
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"variables": _pytree_handler(), "opt_state": _pytree_handler(),
                       "meta": ocp.JsonCheckpointHandler(), "train": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, variables: Any, opt_state: Any, meta: Mapping[str, Any],
           train: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> bool:
    """Starts an (async) save; `train['metrics']` gets `metrics` so `load_model` can pick best.

    Raises:
      CheckpointDiskFullError: this save (or the previous async one) did not fit on disk.
    """
    self.wait()  # the previous save: long done at the usual spacing; surfaces its errors
    needed = self._bytes_needed(variables, opt_state)
    free = shutil.disk_usage(self.directory).free
    if free < needed:  # refuse before orbax starts writing a checkpoint that cannot fit
      self._disk_full(step, needed, free)
    train = to_plain(dict(train, metrics=dict(metrics) if metrics else None))
    self._in_flight = (step, needed)
    logging.info("checkpoint step %d -> %s", step, self.step_dir(step))
    try:
      saved = self.manager.save(
          step,
          args=ocp.args.Composite(
              variables=ocp.args.PyTreeSave(dict(variables)),
              opt_state=ocp.args.PyTreeSave(opt_state),
              meta=ocp.args.JsonSave(_split_meta(to_plain(dict(meta)))),
              train=ocp.args.JsonSave(train)),
          metrics=to_plain(dict(metrics)) if metrics else None,
          force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_disk_full(e)
      raise
    if saved:
      self._unsealed.append(step)
    if not self._async:
      self.wait()  # finished already: record its checksums now
    return saved

  def _bytes_needed(self, variables: Any, opt_state: Any) -> int:
    """The newest finished step's size on disk, else the state's in-memory size."""
    for step in reversed(self.manager.all_steps()):
      path = self.step_dir(step)
      if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, n))
                   for r, _, names in os.walk(path) for n in names)
    return _tree_bytes(variables, opt_state)

  def _disk_full(self, step: int, needed: int, free: int) -> None:
    # Orbax's half-written temporary folder would hold on to space the user is about to
    # free; it is never a checkpoint (the committed steps are untouched).
    if self._is_main and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if name.startswith(f"{step}.") and "tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    latest = [s for s in self.manager.all_steps() if s != step]
    kept = f"step {max(latest)} is the newest checkpoint" if latest else "no checkpoint yet"
    raise CheckpointDiskFullError(
        errno.ENOSPC,
        f"out of disk space saving checkpoint step {step}: it needs about {needed:,} bytes, "
        f"{free:,} are free ({kept}, left as it was). Free space on that file system or "
        f"move the workdir, then rerun the same command to resume", self.workdir)

  def _raise_if_disk_full(self, error: BaseException) -> None:
    if self._in_flight is not None and _is_disk_full(error):
      step, needed = self._in_flight
      self._in_flight = None
      self._disk_full(step, needed, shutil.disk_usage(self.directory).free)

  def restore_latest_good(self, variables_target: Any, opt_state_target: Any
                          ) -> tuple[int, Any, Any, dict[str, Any]] | None:
    """Restores the newest step that reads; damaged newer steps are moved aside and named.

    A damaged step (checksums that do not match, or a restore that fails) goes to
    `<workdir>/damaged_checkpoints/<step>` (kept for inspection, out of orbax's way) and the
    next older step is tried, with one warning line per skipped step.

    Returns:
      (step, variables, opt_state, train) or None when no step reads.
    """
    for step in reversed(self.manager.all_steps()):
      try:
        sealed = integrity.verify(self.step_dir(step))
      except CheckpointDamagedError as e:
        sealed, problem = False, e.problem
      else:
        try:
          return (step, *self.restore(step, variables_target, opt_state_target))
        except Exception as e:  # pylint: disable=broad-except  (orbax wraps tensorstore's)
          # An unsealed step's damage shows here; an intact one's error (a target of another
          # structure, a bug) is real and must not send good checkpoints aside.
          damaged = None if sealed else _unreadable(self.step_dir(step), e)
          if damaged is None:
            raise
          problem = damaged.problem
      self._move_aside(step)
      older = [s for s in self.manager.all_steps() if s < step]
      logging.warning("checkpoint step %d is damaged (%s); moved to %s; %s", step, problem,
                      os.path.join(self.workdir, "damaged_checkpoints", str(step)),
                      f"resuming from step {older[-1]}" if older else
                      "no older checkpoint: starting from scratch")
    return None

  def _move_aside(self, step: int) -> None:
    if self._is_main:
      dest = os.path.join(self.workdir, "damaged_checkpoints", str(step))
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      if os.path.exists(dest):
        dest = f"{dest}.{int(time.time())}"
      os.rename(self.step_dir(step), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"mobileiqa_jax: moved damaged step {step}")
    self.manager.reload()

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
    """Waits for the save under way, then records the checksums of the finished steps.

    Raises:
      CheckpointDiskFullError: the save did not fit on disk.
    """
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_disk_full(e)
      raise
    self._in_flight = None
    finished = set(self.manager.all_steps())
    for step in self._unsealed:
      if self._is_main and step in finished:
        integrity.seal(self.step_dir(step))
    self._unsealed = []

  def close(self) -> None:
    """Waits for the last save and releases orbax's threads (call it on every exit path)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self.manager.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
    if exc_type is None:
      self.close()
      return
    # Already failing: still finish a save under way (it holds a good state), but report the
    # error that stopped the run, not a second one from the shutdown.
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("while closing %s after an error: %s", self.directory, e)


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
