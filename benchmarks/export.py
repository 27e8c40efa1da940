r"""TFLite export figures: file size and LiteRT interpreter latency per quantisation vs JAX.

  python benchmarks/export.py [--sizes=512x512,1231x1907] [--quantize=none,float16,dynamic_int8]
      [--repeats=3] [--threads=0] [--pooled_size=22 --width=256]

The full-size student (MobileNet-IQA: mobilenetv3_large_100 + the paper's head, S=22, C=256)
with random weights (drawn, not initialised, so nothing compiles before the timed parts). Per
input size: JAX's latency (jit, batch 1, after a warm-up call; the project's default depthwise
implementation for this backend), then per quantisation: conversion time, .tflite size, the
interpreter's latency (batch 1, after a warm-up invoke; XNNPACK, `--threads`, 0 = all cores)
and |TFLite - JAX| on the same random input. Prints a markdown table.

Latencies are medians of `--repeats` calls; on a shared machine they carry its load (the
script prints the load average).

Measured on a shared 2-core x86 box (load average 4-6 from other jobs), full student, 81.5M
parameters, jax 0.10.2, TF-cpu 2.21, ai-edge-litert 2.3, 2 interpreter threads:

| input HxW | quantisation (kernels) | .tflite MiB | LiteRT ms | JAX jit ms | max abs diff vs JAX |
|---|---|---|---|---|---|
| 512x512 | none (XNNPACK) | 311.5 | 1292 | 1230 | 0 |
| 512x512 | float16 (XNNPACK) | 156.2 | 1275 | 1230 | 8.3e-07 |
| 512x512 | dynamic_int8 (XNNPACK) | 79.4 | 919 | 1230 | 1.9e-04 |
| 512x512 | none (builtin) | 311.5 | 6412 | | |
| 512x512 | dynamic_int8 (builtin) | 79.4 | 5849 | | |
| 1231x1907 | none (builtin) | 312.1 | 24494 | 8187 | 6.0e-08 |
| 1231x1907 | float16 (builtin) | 156.7 | 23553 | 8187 | 7.2e-07 |
| 1231x1907 | dynamic_int8 (builtin) | 79.9 | 15630 | 8187 | 1.3e-04 |

At 1231x1907 the XNNPACK delegate took the process past 13 GB (killed), hence builtin kernels.
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mobileiqa_jax import export
from mobileiqa_jax.models import mobileiqa

flags.DEFINE_list("sizes", ["512x512", "1231x1907"], "HEIGHTxWIDTH input sizes.")
flags.DEFINE_list("quantize", list(export.QUANTIZATIONS), "Quantisations to export.")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
flags.DEFINE_integer("threads", 0, "Interpreter threads; 0 = os.cpu_count().")
flags.DEFINE_integer("pooled_size", 22, "Head's pooled side S (22 in the paper).")
flags.DEFINE_integer("width", 256, "Head's width C (256 in the paper).")
flags.DEFINE_boolean("jax", True, "Also time JAX.")
flags.DEFINE_list("xnnpack", ["auto"], "Interpreter runs per export: on, off (builtin kernels) "
                  "or auto (on up to export.XNNPACK_MAX_PIXELS).")
FLAGS = flags.FLAGS


def random_variables(model, size_hw, seed=0):
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *size_hw, 3), jnp.float32)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == "kernel":
      return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(
          np.float32)
    if name == "scale":
      return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main(argv):
  del argv
  threads = FLAGS.threads or os.cpu_count()
  print(f"# jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()}", flush=True)
  rows = []
  small = dict(pooled_size=FLAGS.pooled_size, width=FLAGS.width)
  for size in FLAGS.sizes:
    h, w = export.parse_image_size(size, "--sizes")
    exp_model = mobileiqa.mobileiqa_student(depthwise_impl="conv", **small)
    variables = random_variables(exp_model, (h, w))
    n_params = mobileiqa.count_params(variables)
    x = np.random.RandomState(1).standard_normal((1, h, w, 3)).astype(np.float32)
    jax_ms, jax_score = float("nan"), None
    if FLAGS.jax:
      jax_model = mobileiqa.mobileiqa_student(**small)  # backend's default depthwise impl
      f = jax.jit(lambda v, im: jax_model.apply(v, im, train=False))
      dv = jax.device_put(variables)
      t = time.perf_counter()
      jax_score = np.asarray(f(dv, x))
      compile_s = time.perf_counter() - t
      jax_ms = 1e3 * median_time(lambda: f(dv, x).block_until_ready(), FLAGS.repeats)
      print(f"{h}x{w}: {n_params / 1e6:.1f}M params; JAX first call {compile_s:.1f} s, "
            f"then {jax_ms:.0f} ms", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
      for q in FLAGS.quantize:
        path = os.path.join(tmp, f"student_{q}.tflite")
        t = time.perf_counter()
        meta = export.export(exp_model, variables, path, (h, w), q,
                             mobileiqa.model_config("student", **small).to_dict())
        convert_s = time.perf_counter() - t
        for mode in FLAGS.xnnpack:
          xnn = {"on": True, "off": False, "auto": None}[mode]
          scorer = export.TFLiteScorer(path, num_threads=threads, xnnpack=xnn)
          score = scorer(x)
          tfl_ms = 1e3 * scorer.time_invoke(repeats=FLAGS.repeats, warmup=1)
          diff = (float(np.abs(score - jax_score).max()) if jax_score is not None
                  else float("nan"))
          label = f"{q} ({'XNNPACK' if scorer.xnnpack else 'builtin'})"
          rows.append((f"{h}x{w}", label, meta["file_bytes"] / 2**20, tfl_ms, jax_ms, diff,
                       convert_s, meta["requires_flex"]))
          print(f"  {label}: {meta['file_bytes'] / 2**20:.1f} MiB, convert {convert_s:.0f} s, "
                f"interpreter {tfl_ms:.0f} ms, |tflite - jax| {diff:.2g}", flush=True)
          del scorer
  print(f"\n| input HxW | quantisation (kernels) | .tflite MiB | LiteRT ms ({threads} threads) | "
        "JAX jit ms | max abs diff vs JAX | convert s | needs Flex |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.1e} | {r[6]:.0f} | "
          f"{'yes' if r[7] else 'no'} |")
  print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
