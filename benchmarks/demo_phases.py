r"""Where the demo's time goes: each phase of `configs/<teacher|student>.py:demo`, timed alone.

  python benchmarks/demo_phases.py [--config=configs/teacher.py:demo] [--steps=30] \
      [--loader_batches=30] [--config.<field>=...]

Builds the run the way `trainer.train_and_evaluate` does and times, one after the other (wall
and process CPU seconds; CPU time counts every thread, so it is what a phase costs on a
shared machine): imports, the demo data set, the model and jitted steps, initialisation,
the train and eval step compiles, steady train steps on a batch already on the device (no
input pipeline), the training input pipeline alone (batches decoded and dropped), one
held-out evaluation pass, one checkpoint save. Then it extrapolates a full run from the
config's step count and evaluation schedule. Prints figures; asserts nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

_T0, _C0 = time.perf_counter(), time.process_time()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from mobileiqa_jax.weights import checkpoint as ckpt_lib  # noqa: E402
from mobileiqa_jax.training import checkpointer  # noqa: E402
from mobileiqa_jax.training import evaluation  # noqa: E402
from mobileiqa_jax.training import sharding  # noqa: E402
from mobileiqa_jax.training import trainer  # noqa: E402
from mobileiqa_jax.training import train_data  # noqa: E402
from mobileiqa_jax.models import runtime as runtime_lib  # noqa: E402

_IMPORT_S, _IMPORT_CPU = time.perf_counter() - _T0, time.process_time() - _C0

_CONFIG = config_flags.DEFINE_config_file("config", "configs/teacher.py:demo",
                                          "Experiment config[:variant].")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed train steps (after the compile).")
_LOADER = flags.DEFINE_integer("loader_batches", 30, "Timed training batches of the loader.")


class _Clock:
  """Prints and keeps (wall, CPU) seconds of named phases."""

  def __init__(self):
    self.rows: dict[str, tuple[float, float]] = {}

  def __call__(self, name: str, fn, *args, **kwargs):
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    self.rows[name] = (time.perf_counter() - t, time.process_time() - c)
    print(f"{name:<40s} wall {self.rows[name][0]:8.2f} s   CPU {self.rows[name][1]:8.2f} s",
          flush=True)
    return out


def main(argv):
  del argv
  config = _CONFIG.value
  clock = _Clock()
  clock.rows["imports"] = (_IMPORT_S, _IMPORT_CPU)
  print(f"{'imports':<40s} wall {_IMPORT_S:8.2f} s   CPU {_IMPORT_CPU:8.2f} s  "
        f"(load average {os.getloadavg()[0]:.2f})", flush=True)
  mesh = sharding.make_mesh(config.mesh)
  rt = runtime_lib.for_training(config, runtime_lib.platform_of(mesh.devices.flat[0]))
  data = clock("demo data set (from_config)", train_data.from_config, config)
  teacher = teacher_host = None
  if config.teacher_checkpoint:
    teacher, teacher_host = clock("load teacher", trainer.load_teacher, config, rt.frozen())
  steps = clock("build_steps", trainer.build_steps, config, mesh, data.steps_per_epoch, teacher,
                rt)
  teacher_vars = (None if teacher is None else
                  sharding.host_tree_to_global(teacher_host, steps.teacher_shardings))
  state = clock("init_state (init compile + run)", steps.init_state)

  batch = next(iter(data.train_epoch(0, 0)))
  g = sharding.host_to_global(batch, mesh)
  lowered = clock("train step trace+lower", steps.train_step.lower, state, g, teacher_vars)
  clock("train step compile", lowered.compile)
  eval_batch = next(iter(data.eval_batches()))
  ge = sharding.host_to_global(eval_batch, mesh)
  lowered_e = clock("eval step trace+lower", steps.eval_step.lower, state.variables,
                    ge["image"])
  clock("eval step compile", lowered_e.compile)

  state, _ = clock("first train step (jit cache fill)", steps.train_step, state, g,
                   teacher_vars)

  def run_steps(state):
    for _ in range(_STEPS.value):
      state, m = steps.train_step(state, g, teacher_vars)
    return state, m
  state, _ = clock(f"{_STEPS.value} train steps (device batch)", run_steps, state)

  def run_loader():
    for i, _ in enumerate(data.train_epoch(1, 0)):
      if i + 1 >= _LOADER.value:
        break
  clock(f"{_LOADER.value} loader batches (no step)", run_loader)

  clock("one eval pass (with its input)", lambda: evaluation.score_batches(
      steps.eval_step, state.variables, data.eval_batches(), mesh)[0])

  with tempfile.TemporaryDirectory() as tmp:
    with checkpointer.TrainCheckpointer(tmp, keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save) as ckpt:
      meta = {"format": ckpt_lib.FORMAT, "model_config": steps.model_config.to_dict(),
              "training": steps.runtime.to_dict(), "extra": {}}
      def save():
        ckpt.save(1, state.variables, state.opt_state, meta, {"step": 1, "best": {}})
        ckpt.wait()
      clock("one checkpoint save (waited)", save)

  # A full run from these figures.
  total = data.steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total = min(total, config.max_steps)
  evals = sum(1 for e in range(1, config.num_epochs + 1)
              if e % config.eval_every_epochs == 0 or e == config.num_epochs) + 1  # + best
  step_s = clock.rows[f"{_STEPS.value} train steps (device batch)"][0] / _STEPS.value
  step_cpu = clock.rows[f"{_STEPS.value} train steps (device batch)"][1] / _STEPS.value
  load_s = clock.rows[f"{_LOADER.value} loader batches (no step)"][0] / _LOADER.value
  load_cpu = clock.rows[f"{_LOADER.value} loader batches (no step)"][1] / _LOADER.value
  fixed = sum(clock.rows[k][0] for k in clock.rows if "compile" in k or "lower" in k
              or k in ("imports", "demo data set (from_config)", "build_steps",
                       "init_state (init compile + run)", "load teacher"))
  ev = clock.rows["one eval pass (with its input)"][0]
  print(f"\nper train step: {step_s * 1e3:.0f} ms wall ({step_cpu * 1e3:.0f} ms CPU) on the "
        f"device batch; input pipeline alone {load_s * 1e3:.0f} ms wall "
        f"({load_cpu * 1e3:.0f} ms CPU) per batch of {config.batch_size}")
  print(f"a full run ({total} steps, {evals} eval passes, {total // data.steps_per_epoch} "
        f"epoch-end saves): fixed {fixed:.0f} s + steps {total * step_s:.0f} s (+ input "
        f"{total * load_cpu:.0f} CPU s if it does not overlap) + evals {evals * ev:.0f} s")
  print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  app.run(main)
