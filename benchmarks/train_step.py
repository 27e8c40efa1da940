r"""Times the teacher train step and the distillation step: JAX (float32/bfloat16, remat on/off)
and the PyTorch reference (eager float32) in the same run. Prints images/s and peak memory.

The paper's setting (GPU):

  python benchmarks/train_step.py --size=1231,1907 --batch=8

A CPU-sized run (small models, small images):

  python benchmarks/train_step.py --size=128,128 --batch=4 --teacher_backbone=mobilevitv2_050 \
      --student_backbone=mobilenetv3_large_100 --width=64 --pooled=8 --teacher_pool=2 --steps=3

Peak memory: the accelerator's peak_bytes_in_use (JAX) / max_memory_allocated (PyTorch CUDA);
on CPU the process's peak RSS (`profiling.process.peak_rss_bytes`, cumulative over the run,
so only the first figure is clean: order matters; benchmarks/device_check.py runs each row in
a process of its own). Not part of the test suite.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mobileiqa_jax.profiling import process  # noqa: E402

flags.DEFINE_string("size", "1231,1907", "HEIGHT,WIDTH")
flags.DEFINE_integer("batch", 8, "global batch size")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "JAX compute dtypes")
flags.DEFINE_list("remat", ["0", "1"], "JAX remat settings to time")
flags.DEFINE_list("kinds", ["teacher", "distill"], "steps to time")
flags.DEFINE_integer("steps", 5, "timed steps after one warm-up step")
flags.DEFINE_bool("torch", True, "also time the PyTorch reference (eager float32)")
flags.DEFINE_string("teacher_backbone", "mobilevitv2_200", "")
flags.DEFINE_string("student_backbone", "mobilenetv3_large_100", "")
flags.DEFINE_integer("width", 256, "head width C")
flags.DEFINE_integer("pooled", 22, "pooled side S")
flags.DEFINE_integer("teacher_pool", 4, "teacher regressor pool")
flags.DEFINE_integer("num_mals", 3, "opinion MALs per model")
flags.DEFINE_float("depth_multiplier", 1.0,
                   "timm's depth multiplier for the MobileNetV3 backbones among the two (fewer "
                   "blocks: the tests' smallest models)")
FLAGS = flags.FLAGS


def _backbone_kwargs(backbone: str) -> dict[str, float]:
  if backbone.startswith("mobilenetv3") and FLAGS.depth_multiplier != 1.0:
    return {"depth_multiplier": FLAGS.depth_multiplier}
  return {}


def _peak_bytes_jax() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return float(stats["peak_bytes_in_use"])
  return float(process.peak_rss_bytes())


def _config(kind: str, dtype: str, remat: bool):
  from configs import student, teacher  # pylint: disable=g-import-not-at-top
  c = (teacher if kind == "teacher" else student).get_config("uhd_iqa")
  c.model.backbone = FLAGS.teacher_backbone if kind == "teacher" else FLAGS.student_backbone
  c.model.width, c.model.pooled_size = FLAGS.width, FLAGS.pooled
  c.model.num_mals = FLAGS.num_mals
  c.model.backbone_kwargs = _backbone_kwargs(c.model.backbone)
  if kind == "teacher":
    c.model.regressor_pool = FLAGS.teacher_pool
  c.init.backbone = ""
  c.compute_dtype, c.remat = dtype, remat
  c.data.image_size = tuple(int(x) for x in FLAGS.size.split(","))
  c.batch_size = FLAGS.batch
  c.teacher_checkpoint = ""
  return c


def time_jax(kind: str, dtype: str, remat: bool) -> dict[str, float]:
  """One configuration's JAX step: images/s, peak device memory, the compiler's buffer plan.

  A distillation step gets a randomly initialised frozen teacher (the preset at this run's
  head size), built with the run's runtime as the trainer builds it (`Runtime.frozen`).
  """
  from mobileiqa_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import runtime  # pylint: disable=g-import-not-at-top
  c = _config("teacher" if kind == "teacher" else "student", dtype, remat)
  mesh = sharding.make_mesh(c.mesh)
  rt = runtime.for_training(c, runtime.platform_of(mesh.devices.flat[0]))
  h, w = c.data.image_size
  teacher = teacher_vars = None
  if kind == "distill":
    t_cfg = _config("teacher", dtype, False).model.to_dict()
    teacher = mobileiqa.build_model(t_cfg, rt.frozen())
    t_init = jax.jit(lambda k: teacher.init(k, jax.numpy.zeros((1, h, w, 3))))
    teacher_vars = dict(t_init(jax.random.PRNGKey(1)))
  steps = trainer.build_steps(c, mesh, steps_per_epoch=100, teacher=teacher, runtime=rt)
  if teacher is not None:
    teacher_vars = sharding.host_tree_to_global(
        {"params": teacher_vars["params"], "batch_stats": teacher_vars.get("batch_stats", {})},
        steps.teacher_shardings)
  state = steps.init_state()
  rng = np.random.default_rng(0)
  batch = sharding.host_to_global(
      {"image": rng.normal(size=(c.batch_size, h, w, 3)).astype(np.float32),
       "mos": rng.random(c.batch_size).astype(np.float32)}, mesh)
  t = time.perf_counter()
  compiled = steps.train_step.lower(state, batch, teacher_vars).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
  state, m = compiled(state, batch, teacher_vars)  # warm-up
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, m = compiled(state, batch, teacher_vars)
  jax.block_until_ready(m)
  dt = time.perf_counter() - t
  return {"images_per_s": FLAGS.steps * c.batch_size / dt, "step_s": dt / FLAGS.steps,
          "peak_bytes": _peak_bytes_jax(), "compiled_bytes": float(planned),
          "compile_s": compile_s, "runtime": rt.to_dict(),
          "loss": float(np.asarray(m["loss"]))}


def time_torch(kind: str) -> tuple[float, float]:
  import torch  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import torch_reference as ref  # pylint: disable=g-import-not-at-top
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  h, w = (int(x) for x in FLAGS.size.split(","))

  def make(backbone, prefix, name, pool, sigmoid):
    bb = ref.timm_backbone(backbone, **_backbone_kwargs(backbone))
    return ref.MobileIQA(bb, bb.feature_info.channels(), name, prefix, pooled_size=FLAGS.pooled,
                         width=FLAGS.width, regressor_pool=pool, sigmoid=sigmoid,
                         num_mals=FLAGS.num_mals).to(dev)
  if kind == "teacher":
    model = make(FLAGS.teacher_backbone, "LGF", "global_vit", FLAGS.teacher_pool, False)
    teacher = None
  else:
    model = make(FLAGS.student_backbone, "LDA", "local_cnn", 2, True)
    teacher = make(FLAGS.teacher_backbone, "LGF", "global_vit", FLAGS.teacher_pool, False).eval()
  opt = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=1e-5)
  x = torch.randn(FLAGS.batch, 3, h, w, device=dev)
  y = torch.rand(FLAGS.batch, device=dev)

  def step():
    model.train()
    opt.zero_grad(set_to_none=True)
    if teacher is None:
      loss = torch.nn.functional.mse_loss(model(x), y)
    else:
      with torch.no_grad():
        tx, tdof, _, _ = teacher(x, return_features=True)
      sx, sdof, s, _ = model(x, return_features=True)
      loss = (torch.nn.functional.mse_loss(sdof, tdof) + torch.nn.functional.mse_loss(sx, tx)
              + torch.nn.functional.mse_loss(s, y))
    loss.backward()
    opt.step()
    return loss

  step()
  if dev == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    step()
  if dev == "cuda":
    torch.cuda.synchronize()
    peak = float(torch.cuda.max_memory_allocated())
  else:
    peak = float(process.peak_rss_bytes())
  return FLAGS.steps * FLAGS.batch / (time.perf_counter() - t), peak


def main(argv):
  del argv
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  size {FLAGS.size}  "
        f"batch {FLAGS.batch}  teacher {FLAGS.teacher_backbone}  student "
        f"{FLAGS.student_backbone}  width {FLAGS.width}  pooled {FLAGS.pooled}")
  rows = []
  for kind in FLAGS.kinds:
    for dtype in FLAGS.dtypes:
      for remat in FLAGS.remat:
        name = f"jax {kind:8s} {dtype:9s} remat={remat}"
        try:
          r = time_jax(kind, dtype, remat == "1")
          rows.append(f"{name}  {r['images_per_s']:8.2f} img/s  peak "
                      f"{r['peak_bytes'] / 2**30:6.2f} GiB")
        except Exception as e:  # pylint: disable=broad-except
          rows.append(f"{name}  failed: {type(e).__name__}: {str(e)[:200]}")
        print(rows[-1], flush=True)
    if FLAGS.torch:
      name = f"torch {kind:8s} float32   eager  "
      try:
        ips, peak = time_torch(kind)
        rows.append(f"{name}  {ips:8.2f} img/s  peak {peak / 2**30:6.2f} GiB")
      except Exception as e:  # pylint: disable=broad-except
        rows.append(f"{name}  failed: {type(e).__name__}: {str(e)[:200]}")
      print(rows[-1], flush=True)
  print("\n".join(["", "summary:"] + rows))


if __name__ == "__main__":
  app.run(main)
