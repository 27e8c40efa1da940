r"""Saving and restoring the teacher's full training state, on local disk and in a gs:// bucket.

  python benchmarks/bucket_checkpoint.py                  # configs/teacher.py, 1231x1907
  python benchmarks/bucket_checkpoint.py --repeats=1 --steps=20

The state is the real teacher's (configs/teacher.py: MobileViTv2-200 and its head at the
UHD-IQA size 1231x1907): parameters, BatchNorm statistics and Adam's two moments, as
`training.checkpointer.TrainCheckpointer` saves them every `checkpoint.every_steps`. The
bucket is fake-gcs-server (tests/buckets.py starts it, on 127.0.0.1, memory backend), so the
bucket figures measure the client path (orbax -> tensorstore's gcs driver -> HTTP, the
checksum record through gcsfs), not a real network. For each place it prints:

- save: `TrainCheckpointer.save` + `wait` with `async_save=False` (the checksum record
  included), and restore: `restore_latest_good` (checksums verified, then orbax's restore);
- overlap: with `async_save=True`, how long `save` blocks the loop, how long the save takes to
  finish in the background, and the time per step of a stand-in train step (a jitted matmul
  chain of about `--step_ms`) before and while the save runs.

Not part of the test suite; prints figures, asserts nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "tests")]
os.environ.setdefault("EPATH_USE_TF", "false")  # before etils first sees a gs:// path

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_integer("repeats", 2, "saves and restores per place (the best is printed)")
flags.DEFINE_integer("steps", 30, "stand-in train steps timed before and during a save")
flags.DEFINE_float("step_ms", 200.0, "about how long one stand-in step takes")
flags.DEFINE_list("places", ["local", "gs"], "where to save: local, gs")
FLAGS = flags.FLAGS


def _state():
  """The teacher's variables and Adam state at 1231x1907, as host arrays (random values)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import teacher  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.training import trainer  # pylint: disable=g-import-not-at-top
  config = teacher.get_config()
  steps = trainer.build_steps(config, sharding.make_mesh(config.mesh), steps_per_epoch=100)
  rng = np.random.default_rng(0)
  fill = lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding)
  abstract = steps.abstract_state
  variables = jax.tree.map(fill, abstract.variables)
  opt_state = jax.tree.map(fill, abstract.opt_state)
  meta = {"model_config": steps.model_config.to_dict(), "extra": {"image_size": [1231, 1907]}}
  return variables, opt_state, meta, abstract


def _nbytes(*trees) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.nbytes for t in trees for x in jax.tree.leaves(t))


def _stand_in_step(step_ms: float):
  """A jitted step of about `step_ms` on this host (matmuls; the device stays busy)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.ones((512, 512), jnp.float32)
  f = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda _, y: jnp.tanh(y @ y) * 0.5, x))
  f(x, 1).block_until_ready()  # compiled once (n is traced)
  n = 1
  while True:
    t = time.perf_counter()
    f(x, n).block_until_ready()
    if (time.perf_counter() - t) * 1e3 >= step_ms or n > 1 << 16:
      break
    n *= 2
  return lambda: f(x, n).block_until_ready()


def _time_steps(step, count: int) -> list[float]:
  times = []
  for _ in range(count):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return times


def _measure(place: str, root: str, state, step) -> None:
  from mobileiqa_jax import storage  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.training import checkpointer  # pylint: disable=g-import-not-at-top
  variables, opt_state, meta, abstract = state
  saves, restores = [], []
  for r in range(FLAGS.repeats):
    workdir = storage.join(root, f"sync{r}")
    ck = checkpointer.TrainCheckpointer(workdir, keep=2, async_save=False)
    t = time.perf_counter()
    ck.save(10, variables, opt_state, meta, {"step": 10})
    ck.wait()
    saves.append(time.perf_counter() - t)
    ck.close()
    ck = checkpointer.TrainCheckpointer(workdir, keep=2, async_save=False)
    t = time.perf_counter()
    restored = ck.restore_latest_good(abstract.variables, abstract.opt_state)
    restores.append(time.perf_counter() - t)
    assert restored is not None and restored[0] == 10
    ck.close()
    storage.rmtree(workdir)
  gb = _nbytes(variables, opt_state) / 1e9
  print(f"{place}: save {min(saves):.2f} s ({gb / min(saves):.2f} GB/s), restore "
        f"{min(restores):.2f} s ({gb / min(restores):.2f} GB/s); best of {FLAGS.repeats}",
        flush=True)

  # Asynchronous: does the save run beside the steps?
  workdir = storage.join(root, "async")
  ck = checkpointer.TrainCheckpointer(workdir, keep=2, async_save=True)
  before = _time_steps(step, FLAGS.steps)
  t = time.perf_counter()
  ck.save(10, variables, opt_state, meta, {"step": 10})
  blocked = time.perf_counter() - t
  # orbax's background save, waited for on a thread while this one keeps stepping.
  finished = {}

  def wait_for_orbax():
    ck.manager.wait_until_finished()
    finished["s"] = time.perf_counter() - t
  waiter = threading.Thread(target=wait_for_orbax)
  waiter.start()
  during = []
  while waiter.is_alive() or len(during) < 3:
    during += _time_steps(step, 1)
  waiter.join()
  t_seal = time.perf_counter()
  ck.wait()  # the checksum record of the finished step
  seal = time.perf_counter() - t_seal
  ck.close()
  storage.rmtree(workdir)
  median = lambda xs: sorted(xs)[len(xs) // 2]
  print(f"{place} async: save() blocked the loop {blocked:.2f} s; orbax finished "
        f"{finished['s']:.2f} s after save() was called, while {len(during)} steps ran; "
        f"step {median(before) * 1e3:.0f} ms before, {median(during) * 1e3:.0f} ms during "
        f"(medians); then the checksum record (at the next save or the end) "
        f"{seal:.2f} s", flush=True)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  print(f"{platform.node()}: {os.cpu_count()} cores, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}; {time.strftime('%Y-%m-%d')}", flush=True)
  t = time.perf_counter()
  state = _state()
  print(f"teacher state at 1231x1907: {_nbytes(state[0]) / 1e6:.0f} MB variables + "
        f"{_nbytes(state[1]) / 1e6:.0f} MB Adam state (built in {time.perf_counter() - t:.0f} s)",
        flush=True)
  step = _stand_in_step(FLAGS.step_ms)
  if "local" in FLAGS.places:
    root = tempfile.mkdtemp(prefix="bucket_checkpoint-")
    try:
      _measure("local disk", root, state, step)
    finally:
      shutil.rmtree(root, ignore_errors=True)
  if "gs" in FLAGS.places:
    import buckets  # pylint: disable=g-import-not-at-top  (tests/buckets.py)
    with buckets.Servers() as servers:
      before = buckets.apply_env(servers.env)
      try:
        servers.make_bucket("gs://bench")
        _measure("gs:// (fake-gcs-server)", "gs://bench/runs", state, step)
      finally:
        buckets.restore_env(before)


if __name__ == "__main__":
  app.run(main)
