"""Training checkpoints: `TrainCheckpointer` (keep the last K and the best; resume from the
newest step that reads) and `check_resume_config` (a resumed run keeps its recipe).

The on-disk format is the package's one (`weights/checkpoint.py`): each step of
`<workdir>/checkpoints/<step>/` holds `variables/` and `meta/` as a standalone checkpoint does,
plus `opt_state/` and `train/`, so any step loads for scoring as it is.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mobileiqa_jax import storage
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.weights import integrity
from mobileiqa_jax.weights.integrity import CheckpointDamagedError


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

  Where orbax cannot write (an `s3://` workdir: `storage.orbax_can_write`), it writes to a
  local mirror instead: the bucket's finished steps are downloaded into it at the start, and
  each step this run finishes is uploaded, its checksum record last (a step in the bucket
  without it is unfinished and not listed), and the steps orbax's retention drops are deleted
  there too. One process only: a multi-host save needs one directory all hosts write.
  """

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.workdir = storage.absolute(workdir)
    self.directory = storage.join(self.workdir, "checkpoints")
    check_workdir(self.workdir)
    self._mirror: str | None = None  # the local folder orbax writes for an s3:// workdir
    if not storage.orbax_can_write(self.directory):
      self._mirror = tempfile.mkdtemp(prefix="mobileiqa_jax-checkpoints-")
    self._orbax_dir = self._mirror or self.directory
    if self._mirror is not None:
      for step in checkpoint.list_steps(self.directory):
        storage.download_tree(self.remote_dir(step), self.step_dir(step))
    self._bucket = storage.is_bucket(self._orbax_dir)
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
        self._orbax_dir, options=options,
        item_handlers={"variables": _pytree_handler(), "opt_state": _pytree_handler(),
                       "meta": ocp.JsonCheckpointHandler(), "train": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    """Where orbax keeps `step` (the local mirror's copy for an s3:// workdir)."""
    return storage.join(self._orbax_dir, str(step))

  def remote_dir(self, step: int) -> str:
    """`step` in the workdir's checkpoints folder."""
    return storage.join(self.directory, str(step))

  def save(self, step: int, variables: Any, opt_state: Any, meta: Mapping[str, Any],
           train: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> bool:
    """Starts an (async) save; `train['metrics']` gets `metrics` so `load_model` can pick best.

    Raises:
      CheckpointDiskFullError: this save (or the previous async one) did not fit on disk.
    """
    self.wait()  # the previous save: long done at the usual spacing; surfaces its errors
    needed = 0
    if not self._bucket:  # a bucket has no free space to ask for (nor to run out of)
      needed = self._bytes_needed(variables, opt_state)
      free = shutil.disk_usage(self._orbax_dir).free
      if free < needed:  # refuse before orbax starts writing a checkpoint that cannot fit
        self._disk_full(step, needed, free)
    train = checkpoint.to_plain(dict(train, metrics=dict(metrics) if metrics else None))
    self._in_flight = (step, needed)
    logging.info("checkpoint step %d -> %s", step, self.remote_dir(step))
    try:
      saved = self.manager.save(
          step,
          args=ocp.args.Composite(
              variables=ocp.args.PyTreeSave(dict(variables)),
              opt_state=ocp.args.PyTreeSave(opt_state),
              meta=ocp.args.JsonSave(checkpoint.split_meta(checkpoint.to_plain(dict(meta)))),
              train=ocp.args.JsonSave(train)),
          metrics=checkpoint.to_plain(dict(metrics)) if metrics else None,
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
    if self._is_main and os.path.isdir(self._orbax_dir):
      for name in os.listdir(self._orbax_dir):
        if name.startswith(f"{step}.") and "tmp" in name:
          shutil.rmtree(os.path.join(self._orbax_dir, name), ignore_errors=True)
    latest = [s for s in self.manager.all_steps() if s != step]
    kept = f"step {max(latest)} is the newest checkpoint" if latest else "no checkpoint yet"
    raise CheckpointDiskFullError(
        errno.ENOSPC,
        f"out of disk space saving checkpoint step {step}: it needs about {needed:,} bytes, "
        f"{free:,} are free ({kept}, left as it was). Free space on that file system or "
        f"move the workdir, then rerun the same command to resume", self.workdir)

  def _raise_if_disk_full(self, error: BaseException) -> None:
    if self._in_flight is not None and not self._bucket and _is_disk_full(error):
      step, needed = self._in_flight
      self._in_flight = None
      self._disk_full(step, needed, shutil.disk_usage(self._orbax_dir).free)

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
          damaged = None if sealed else checkpoint.unreadable(self.step_dir(step), e)
          if damaged is None:
            raise
          problem = damaged.problem
      self._move_aside(step)
      older = [s for s in self.manager.all_steps() if s < step]
      logging.warning("checkpoint step %d is damaged (%s); moved to %s; %s", step, problem,
                      storage.join(self.workdir, "damaged_checkpoints", str(step)),
                      f"resuming from step {older[-1]}" if older else
                      "no older checkpoint: starting from scratch")
    return None

  def _move_aside(self, step: int) -> None:
    if self._is_main:
      dest = storage.join(self.workdir, "damaged_checkpoints", str(step))
      storage.makedirs(storage.dirname(dest))
      if storage.exists(dest):
        dest = f"{dest}.{int(time.time())}"
      # Locally one rename. A bucket has none: every object is copied, then deleted, the
      # objects that mark a step complete moved last, so a kill half-way leaves no second
      # complete step (`checkpoint.is_complete`).
      markers = (checkpoint.COMMIT_MARKER, integrity.MANIFEST)
      if self._mirror is None:
        storage.move_tree(self.step_dir(step), dest, markers)
      else:
        storage.move_tree(self.remote_dir(step), dest, markers)
        shutil.rmtree(self.step_dir(step))
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
        if self._mirror is not None:
          storage.rmtree(self.remote_dir(step))  # what an upload cut short left there
          storage.upload_tree(self.step_dir(step), self.remote_dir(step), last=integrity.MANIFEST)
    self._unsealed = []
    if self._mirror is not None and self._is_main:
      for step in set(checkpoint.list_steps(self.directory)) - finished:
        storage.rmtree(self.remote_dir(step))  # dropped by orbax's retention

  def close(self) -> None:
    """Waits for the last save and releases orbax's threads (call it on every exit path)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self.manager.close()
      if self._mirror is not None:
        shutil.rmtree(self._mirror, ignore_errors=True)

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


def check_workdir(workdir: str) -> None:
  """Refuses a workdir whose checkpoints this job cannot keep (before anything is written).

  Raises:
    ValueError: an s3:// workdir of a multi-process job (its checkpoints go through one
      host's local mirror; see `TrainCheckpointer`).
  """
  directory = storage.join(storage.absolute(workdir), "checkpoints")
  if not storage.orbax_can_write(directory) and jax.process_count() > 1:
    raise ValueError(
        f"{workdir}: orbax-checkpoint cannot write {directory.split(':')[0]}:// itself (it "
        f"builds a tensorstore file spec for any bucket but gs://), and the local mirror this "
        f"package keeps instead serves one process; a multi-host run needs a gs:// or "
        f"shared-file-system --workdir.")


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
  workdir = storage.absolute(workdir)
  if not checkpoint.list_steps(storage.join(workdir, "checkpoints")):
    return
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    logging.warning("%s holds checkpoints but no config.json: cannot check that the resumed "
                    "config matches them", workdir)
    return
  stored = _flatten(json.loads(storage.read_text(path)))
  # As the trainer writes config.json: tuples become lists.
  new = _flatten(json.loads(ml_collections.ConfigDict(config).to_json_best_effort()))
  missing = object()
  diffs = [f"{k}: {stored.get(k, missing)!r} -> {new.get(k, missing)!r}".replace(
      repr(missing), "(absent)") for k in sorted(set(stored) | set(new))
           if stored.get(k, missing) != new.get(k, missing) and not _is_safe(k)]
  if diffs:
    raise ResumeConfigError(
        f"{workdir} holds checkpoints trained with a different config ({path}); refusing to "
        f"resume with {'; '.join(diffs)}. Use the stored values or a new --workdir (fields "
        f"safe to change on resume: {', '.join(SAFE_TO_CHANGE_ON_RESUME)}).")
