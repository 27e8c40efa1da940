"""Sharding: mesh construction, parameter shardings, and that sharding does not change a step.

The multi-device checks run in subprocesses because the fake CPU device count
(XLA_FLAGS=--xla_force_host_platform_device_count=N) must be set before jax is imported: one
process with 8 devices (one step on 1 device and on 4 x 2); two processes with 4 devices each
against the same training run in one 8-device process. Both are slow tests (`-m slow`).
"""

from __future__ import annotations

import os
import sys
import textwrap

import jax
import numpy as np
import pytest

from mobileiqa_jax.training import sharding
from support import free_port, python_env, run_peers, run_python


def _env(devices: int) -> dict[str, str]:
  # XLA's optimisations off: these processes are mostly compiling (8 fake devices, several
  # train steps), and the comparisons' bounds hold unoptimised (measured: parameters 1.5e-8,
  # update 8.7e-5, loss 0 against 1e-5, 1e-3, 1e-5); about a quarter less CPU time.
  return python_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                    JAX_DISABLE_MOST_OPTIMIZATIONS="1")


def _run(code: str, devices: int, timeout: int = 900, args=()) -> str:
  proc = run_python(["-c", textwrap.dedent(code), *args], env=_env(devices), timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return proc.stdout


def test_make_mesh_single_device_and_errors():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp") and mesh.size == jax.device_count()
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh((("model", 1),))
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh((("data", 3),))


def test_fsdp_spec_splits_largest_divisible_dim():
  assert sharding._fsdp_spec((64, 128), 4, 16) == jax.sharding.PartitionSpec(None, "fsdp")  # pylint: disable=protected-access
  assert sharding._fsdp_spec((6,), 4, 1) == jax.sharding.PartitionSpec()  # pylint: disable=protected-access
  assert sharding._fsdp_spec((64, 128), 4, 10**6) == jax.sharding.PartitionSpec()  # pylint: disable=protected-access


# The config of every run below. The two-process run trains on the same 4 x 2 mesh as the
# one-process reference (fsdp across processes).
_CONFIG = """
from support import SMALLEST, tiny_config, tiny_data
c = tiny_config("student", batch_size=8, fsdp_min_size=64, max_steps=2, **SMALLEST)
c.mesh = (("data", 4), ("fsdp", 2))
c.checkpoint.every_steps = 2
c.optimizer.eps = 1.0  # Adam's first step linear in the gradient (see below)
"""

# One training step on the same global batch: 1 device, and 8 devices as 4 (data) x 2 (fsdp)
# with fsdp-sharded parameters. Prints the max relative parameter difference to the 1-device step.
# Parameters are compared over the whole tree (max abs difference / max abs value) and the
# update by its relative L2 norm. Per-leaf relative errors are meaningless for leaves whose
# gradient is zero up to rounding (a bias followed by BatchNorm, which removes any shift): the
# reduction order across devices decides their noise. For the same reason eps = 1 makes Adam's
# first step linear in the gradient (with eps -> 0 it is lr * sign(g), which turns rounding
# noise into +-lr).
#
# The teacher's step (one model; the distillation step adds the frozen teacher's forward pass,
# which has no parameters to shard or update): the two-process test trains the student.
_STEP_SCRIPT = """
import jax, numpy as np
from mobileiqa_jax.training import sharding
from mobileiqa_jax.training import trainer
assert jax.device_count() == 8, jax.devices()
""" + _CONFIG.replace('tiny_config("student"', 'tiny_config("teacher"') + """
data = tiny_data(c, flips=False)
batch = next(data.train_epoch(0))

def one_step(mesh):
  steps = trainer.build_steps(c, mesh, data.steps_per_epoch)
  state = steps.init_state()
  p0 = jax.device_get(state.params)
  state, m = steps.train_step(state, sharding.host_to_global(batch, mesh), None)
  return p0, jax.device_get(state.params), float(m["loss"]), state

def flat(t):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])

p0, ref, ref_loss, _ = one_step(sharding.make_mesh((("data", 1),), jax.devices()[:1]))
# 4 x 2 covers both: the batch split 8 ways (data x fsdp) and the parameters split on fsdp.
for shape in ((("data", 4), ("fsdp", 2)),):
  q0, params, loss, state = one_step(sharding.make_mesh(shape))
  if shape[-1][0] == "fsdp":
    specs = {l.sharding.spec for l in jax.tree.leaves(state.params)}
    assert any("fsdp" in str(s) for s in specs), specs
  a, b = flat(params), flat(ref)
  assert np.array_equal(flat(q0), flat(p0))  # same initial parameters
  rel_params = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
  ua, ub = a - flat(q0), b - flat(p0)
  rel_update = float(np.linalg.norm(ua - ub) / np.linalg.norm(ub))
  print("REL", shape, rel_params, rel_update, abs(loss - ref_loss) / abs(ref_loss))
"""


@pytest.fixture(scope="module")
def eight_devices():
  """One 8-device process running _STEP_SCRIPT; its stdout."""
  return _run(_STEP_SCRIPT, devices=8)


@pytest.mark.slow  # compiles the step for 1 and for 8 devices in a subprocess (~90 CPU s)
def test_sharded_step_equals_single_device_step(eight_devices):
  out = eight_devices
  lines = [l for l in out.splitlines() if l.startswith("REL")]
  assert len(lines) == 1, out
  for line in lines:
    rel_params, rel_update, rel_loss = (float(x) for x in line.split()[-3:])
    assert rel_params <= 1e-5 and rel_update <= 1e-3 and rel_loss <= 1e-5, line


# Two steps of train_and_evaluate; process 0 saves the final params to argv[1].
_TRAIN_SCRIPT = """
import os, sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
out, nproc, pid, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if nproc > 1:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                             process_id=pid)
import numpy as np
from mobileiqa_jax.training import trainer
""" + _CONFIG + """
summary = trainer.train_and_evaluate(c, out + "_workdir", data=tiny_data(c, flips=True))
params = trainer.sharding.global_to_host(summary["final_params"])
if jax.process_index() == 0:
  flat = {"/".join(str(k.key) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(out, **flat)
print("DONE", jax.process_index(), summary["step"])
"""


@pytest.mark.slow  # three interpreters compile and train (about 3 CPU minutes)
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  single = str(tmp_path / "single.npz")
  _run(_TRAIN_SCRIPT, devices=8, args=(single, "1", "0", "0"))
  port = str(free_port())
  multi = str(tmp_path / "multi.npz")
  procs = run_peers(
      [[sys.executable, "-c", textwrap.dedent(_TRAIN_SCRIPT), multi, "2", str(i), port]
       for i in range(2)], [_env(4)] * 2, tmp_path)
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i}:\n" + p.stdout[-3000:] + p.stderr[-6000:]
  a, b = np.load(single), np.load(multi)
  assert sorted(a.files) == sorted(b.files)
  # Whole-tree relative difference (the gloo all-reduce sums in another order than XLA:CPU's
  # in-process one, so elements whose gradient is rounding noise differ; see _STEP_SCRIPT).
  fa = np.concatenate([a[k].ravel() for k in sorted(a.files)])
  fb = np.concatenate([b[k].ravel() for k in sorted(a.files)])
  assert np.max(np.abs(fa - fb)) / np.max(np.abs(fa)) <= 1e-5
  for k in a.files:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # Both runs checkpointed through orbax (all processes took part).
  assert os.path.isdir(single + "_workdir/checkpoints/2")
  assert os.path.isdir(str(tmp_path / "multi.npz_workdir" / "checkpoints" / "2"))
