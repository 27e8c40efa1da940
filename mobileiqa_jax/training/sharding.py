"""Mesh, shardings and the host-batch -> global-array step.

One code path for 1 CPU, 8 GPUs and a TPU pod: `jax.jit` with `NamedSharding` over a
`jax.sharding.Mesh` (no pmap). The mesh has two named axes:

- `data`: the batch is split over it; parameters are replicated along it.
- `fsdp`: the batch is split over it too, and parameters (and their optimizer moments) are
  additionally split along it (ZeRO-3 / FSDP style) to save memory. Size 1 by default, which
  means plain data parallelism with replicated parameters.

The batch is sharded over both axes, so every device holds a distinct slice of the global batch.
BatchNorm statistics computed inside a jitted step are therefore statistics of the *global*
batch: XLA turns the batch-axis mean into a cross-device reduction. That differs from PyTorch
DataParallel/DDP (per-device BN) and equals SyncBatchNorm; with one device it is identical.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Environment variable that asks for `jax.distributed.initialize()` (besides the flag).
DISTRIBUTED_ENV = "MOBILEIQA_DISTRIBUTED"


def maybe_initialize_distributed(requested: bool = False, **kwargs: Any) -> bool:
  """Calls `jax.distributed.initialize(**kwargs)` when asked by flag or environment.

  Asked when `requested` is true or the environment variable MOBILEIQA_DISTRIBUTED is '1'/'true'.
  On TPU pods and SLURM/Open MPI clusters jax discovers coordinator and process ids itself;
  elsewhere pass coordinator_address, num_processes and process_id (or set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

  Returns:
    Whether jax.distributed was initialised by this call.
  """
  env = os.environ.get(DISTRIBUTED_ENV, "").lower() in ("1", "true", "yes")
  if not (requested or env):
    return False
  if jax.distributed.is_initialized():
    return False
  # jax reads JAX_COORDINATOR_ADDRESS itself, but not these two.
  for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    if kwargs.get(key) is None and os.environ.get(name):
      try:
        kwargs[key] = int(os.environ[name])
      except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r} is not an integer.") from None
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(mesh_shape: Sequence[tuple[str, int]] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the device mesh from a config such as `(('data', -1), ('fsdp', 1))`.

  One size may be -1 (all remaining devices). Axes not named default to size 1, so the returned
  mesh always has the axes BATCH_AXES in that order.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(mesh_shape or (("data", -1),))
  unknown = set(sizes) - set(BATCH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {BATCH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in BATCH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {mesh_shape}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {mesh_shape}")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {dict(zip(BATCH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  try:
    # Topology-aware device order (ICI rings on TPU); falls back for fake CPU devices.
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], n: int, min_size: int) -> P:
  """Splits the largest dimension that `n` divides; small arrays stay replicated."""
  if n <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
  """NamedShardings for a pytree of parameters (arrays or ShapeDtypeStructs).

  Replicated when the `fsdp` axis has size 1; otherwise each array with at least `min_size`
  elements is split along its largest dimension divisible by the fsdp size.
  """
  n = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, _fsdp_spec(tuple(np.shape(x)), n, min_size)), tree)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  if global_batch_size % mesh.size:
    raise ValueError(f"global batch size {global_batch_size} must be divisible by the "
                     f"{mesh.size} devices of the mesh {dict(mesh.shape)}")


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Process-local numpy batch -> global jax arrays sharded over the batch axes.

  Every process passes its own rows (its slice of the global batch, in process order); the
  result is one global array whose leading dimension is the sum of all processes' rows.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def host_tree_to_global(tree: Any, shardings: Any) -> Any:
  """Host arrays that are identical on every process -> global arrays with `shardings`.

  For variables (restored or loaded weights), not batches: each process holds the whole
  value and places the parts its devices own.
  """
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def global_to_host(tree: Any) -> Any:
  """Fully-materialised numpy copies of (possibly non-addressable) global arrays, on every host."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any of them (a tiny all-gather)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
  return bool(np.any(flags))
