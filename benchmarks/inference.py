r"""Forward latency and peak memory of MobileIQA, JAX against the PyTorch reference.

  python benchmarks/inference.py [--models=teacher,student] [--sizes=512x512,1231x1907]
      [--frameworks=jax,torch] [--batch=1] [--repeats=3] [--threads=N]

Every (framework, model, size) runs in a fresh subprocess, so the peak resident memory it
reports (`profiling.process.peak_rss_bytes`) belongs to that configuration alone. Weights are
random (the speed does not depend on them). PyTorch runs the reference the parity tests check
against (`mobileiqa_jax.weights.torch_reference`: timm backbone + the head written from
docs/model.md) in eval mode under
`torch.inference_mode()`; JAX runs the jitted scorer. Latency is the median of `--repeats`
timed runs after one warm-up (JAX's warm-up includes compilation, reported separately).
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args: argparse.Namespace) -> dict:
  h, w = (int(v) for v in args.size.split("x"))
  if args.framework == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    from mobileiqa_jax.weights import torch_reference  # pylint: disable=g-import-not-at-top
    if args.threads:
      torch.set_num_threads(args.threads)
    ctor = (torch_reference.teacher_reference if args.model == "teacher"
            else torch_reference.student_reference)
    model = ctor().eval()
    x = torch.randn(args.batch, 3, h, w)

    def run():
      with torch.inference_mode():
        return model(x).numpy()
  else:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
    from mobileiqa_jax.models import runtime  # pylint: disable=g-import-not-at-top
    rt = runtime.Runtime.for_platform(jax.default_backend(), compute_dtype=args.dtype)
    model = mobileiqa.build_model(mobileiqa.model_config(args.model), rt)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, h, w, 3))
    fwd = jax.jit(lambda v, im: model.apply(v, im, train=False))

    def run():
      return jax.device_get(fwd(variables, x))

  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  times.sort()
  from mobileiqa_jax.profiling import process  # pylint: disable=g-import-not-at-top
  return {
      "framework": args.framework, "model": args.model, "size": args.size,
      "batch": args.batch, "first_s": first, "median_s": times[len(times) // 2],
      "min_s": times[0], "peak_rss_gb": process.peak_rss_bytes() / 2**30,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="teacher,student")
  parser.add_argument("--sizes", default="512x512,1231x1907", help="HxW,HxW,...")
  parser.add_argument("--frameworks", default="jax,torch")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  parser.add_argument("--dtype", default="float32", help="JAX compute dtype")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--framework", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(_worker(args)))
    return

  import platform  # pylint: disable=g-import-not-at-top
  print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, batch {args.batch}, JAX dtype {args.dtype}")
  print(f"{'model':8} {'size':>10} {'framework':>9} {'median s':>9} {'first s':>8} "
        f"{'peak RSS GB':>11}")
  # The workers import this checkout's package, whatever is installed.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  results = {}
  for model in args.models.split(","):
    for size in args.sizes.split(","):
      for fw in args.frameworks.split(","):
        cmd = [sys.executable, __file__, "--worker", f"--framework={fw}", f"--model={model}",
               f"--size={size}", f"--batch={args.batch}", f"--repeats={args.repeats}",
               f"--threads={args.threads}", f"--dtype={args.dtype}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
          print(f"{model:8} {size:>10} {fw:>9} FAILED: {out.stderr.strip()[-300:]}")
          continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[(model, size, fw)] = r
        print(f"{model:8} {size:>10} {fw:>9} {r['median_s']:9.3f} {r['first_s']:8.2f} "
              f"{r['peak_rss_gb']:11.2f}", flush=True)
      j, t = results.get((model, size, "jax")), results.get((model, size, "torch"))
      if j and t:
        print(f"{model:8} {size:>10} {'jax/torch':>9} {j['median_s'] / t['median_s']:9.2f} "
              f"{'':8} {j['peak_rss_gb'] / t['peak_rss_gb']:11.2f}", flush=True)


if __name__ == "__main__":
  main()
