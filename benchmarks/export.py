r"""Export figures: file size, runtime latency and peak memory per configuration.

  python benchmarks/export.py [--sizes=512x512,1231x1907] [--quantize=none,float16,dynamic_int8]
      [--kernels=xnnpack,builtin] [--formats=tflite,onnx] [--repeats=3] [--threads=2]
      [--max_rss_gb=8] [--pooled_size=22 --width=256] [--keep=DIR]

The full-size student (MobileNet-IQA: mobilenetv3_large_100 + the paper's head, S=22, C=256)
with random weights (drawn, not initialised, so nothing compiles before the timed parts).
Every step runs in its own subprocess, so each peak RSS (the child's own peak,
`process.peak_rss_bytes`: the whole process, weights included) belongs to that step alone:

- JAX: the jitted scorer, batch 1, the project's default depthwise implementation for this
  backend; latency after a warm-up call (which includes compilation).
- export: `mobileiqa_jax.export.exporter.export` per quantisation (conversion time and file
  size).
- runtime: `runtime_scorer.ExportedScorer` alone (no TensorFlow, no JAX imported, as in an
  app) loads the file, allocates, runs once to warm up, then `--repeats` timed runs. For a
  .tflite file, `xnnpack` is LiteRT's default XNNPACK delegate, `builtin` its reference CPU
  kernels.
- `--formats=onnx` adds the ONNX export (float32 only; `--format=onnx`, jax2onnx) and its
  ONNX Runtime rows (kernels `ort-cpu`: the CPU execution provider, `--threads` intra-op
  threads), batch 1, the same input. docs/performance.md ("The ONNX export") has its figures.

A watchdog polls each child's resident memory and kills it above `--max_rss_gb` (the row then
says so: that is a figure too); on a shared machine nothing else is protected. Latencies are
medians and carry the machine's load (printed). 'abs diff' is the runtime's score against
JAX's on the same random input.

The TFLite figures of the full student (81.5M parameters; jax 0.10.2, TF-cpu 2.21,
ai-edge-litert 2.3) on a 2-core x86_64 VM shared with other jobs (load average 8-13, so every
latency carries that load and varies by 2x between rows):

| input HxW | quantisation | kernels | .tflite MiB | LiteRT ms (2 threads) | LiteRT peak RSS GB | JAX ms | JAX peak RSS GB | abs diff vs JAX | convert s |
|---|---|---|---|---|---|---|---|---|---|
| 512x512 | none | xnnpack | 311.0 | 5458 | 0.72 | 6436 | 1.21 | 6.0e-08 | 352 |
| 512x512 | none | builtin | 311.0 | 52414 | 0.41 | 6436 | 1.21 | 6.0e-08 | 352 |
| 512x512 | float16 | xnnpack | 155.6 | 2097 | 0.57 | 6436 | 1.21 | 7.2e-07 | 147 |
| 512x512 | float16 | builtin | 155.6 | 28175 | 0.57 | 6436 | 1.21 | 7.2e-07 | 147 |
| 512x512 | dynamic_int8 | xnnpack | 78.8 | 1056 | 0.26 | 6436 | 1.21 | 2.3e-04 | 169 |
| 512x512 | dynamic_int8 | builtin | 78.8 | 10688 | 0.16 | 6436 | 1.21 | 2.2e-04 | 169 |
| 1231x1907 | none | xnnpack | 311.1 | 4048 | 1.11 | 6688 | 1.72 | 0.0e+00 | 62 |
| 1231x1907 | none | builtin | 311.1 | 28442 | 0.75 | 6688 | 1.72 | 6.0e-08 | 62 |
| 1231x1907 | float16 | xnnpack | 155.7 | 5610 | 0.97 | 6688 | 1.72 | 6.6e-07 | 109 |
| 1231x1907 | float16 | builtin | 155.7 | 20123 | 0.90 | 6688 | 1.72 | 6.6e-07 | 109 |
| 1231x1907 | dynamic_int8 | xnnpack | 78.8 | 3849 | 0.66 | 6688 | 1.72 | 2.0e-04 | 94 |
| 1231x1907 | dynamic_int8 | builtin | 78.8 | 19076 | 0.51 | 6688 | 1.72 | 1.4e-04 | 94 |

Back to back at 1231x1907 (XNNPACK, same input, load 9-12): JAX 5830 ms, float32 3979 ms
(1.11 GB), float16 4779 ms (0.97 GB), dynamic_int8 4475 ms (0.66 GB), JAX again 7874 ms.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_variables(model, size_hw, seed=0):
  # The random weights the tests use too, so the benchmark exports what they check.
  from mobileiqa_jax.weights import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.random_variables(model, size_hw, seed)


def _peak_rss_gb() -> float:
  from mobileiqa_jax.profiling import process  # pylint: disable=g-import-not-at-top
  return process.peak_rss_bytes() / 2**30


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  times.sort()
  return times[len(times) // 2]


def _worker_jax(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import runtime  # pylint: disable=g-import-not-at-top
  h, w = (int(v) for v in args.size.split("x"))
  small = dict(pooled_size=args.pooled_size, width=args.width)
  # Weights drawn for the export model (same shapes; the runtime does not change them).
  variables = _random_variables(mobileiqa.mobileiqa_student(runtime.FOR_EXPORT, **small),
                                (h, w))
  # JAX as it scores on this host (the platform's depthwise form).
  model = mobileiqa.mobileiqa_student(runtime.Runtime.for_platform(jax.default_backend()),
                                      **small)
  fwd = jax.jit(lambda v, im: model.apply(v, im, train=False))
  dv = jax.device_put(variables)
  x = np.load(args.input)
  t = time.perf_counter()
  score = float(np.asarray(fwd(dv, x))[0])
  first = time.perf_counter() - t
  ms = 1e3 * _median_time(lambda: fwd(dv, x).block_until_ready(), args.repeats)
  return {"ms": ms, "first_s": first, "score": score, "peak_rss_gb": _peak_rss_gb()}


def _worker_export(args) -> dict:
  from mobileiqa_jax.export import exporter  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import runtime  # pylint: disable=g-import-not-at-top
  h, w = (int(v) for v in args.size.split("x"))
  small = dict(pooled_size=args.pooled_size, width=args.width)
  model = mobileiqa.mobileiqa_student(runtime.FOR_EXPORT, **small)
  variables = _random_variables(model, (h, w))
  fmt = "onnx" if args.model_file.endswith(".onnx") else "tflite"
  t = time.perf_counter()
  # The files are this script's own scratch output (a rerun with --keep replaces them).
  meta = exporter.export(model, variables, args.model_file, (h, w), args.quantize,
                         mobileiqa.model_config("student", **small).to_dict(), fmt=fmt,
                         measure=False, overwrite=True)
  return {"convert_s": time.perf_counter() - t, "mib": meta["file_bytes"] / 2**20,
          "requires_flex": meta.get("requires_flex", False), "peak_rss_gb": _peak_rss_gb()}


def _worker_runtime(args) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.export import runtime_scorer  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  scorer = runtime_scorer.ExportedScorer(args.model_file, args.threads,
                                         xnnpack=args.kernels != "builtin")
  load_s = time.perf_counter() - t
  rss_loaded = _peak_rss_gb()
  x = np.load(args.input)
  t = time.perf_counter()
  score = float(scorer(x)[0])
  first = time.perf_counter() - t
  ms = 1e3 * scorer.time_invoke(repeats=args.repeats, warmup=0)
  return {"ms": ms, "first_s": first, "load_s": load_s, "score": score,
          "peak_rss_loaded_gb": rss_loaded, "peak_rss_gb": _peak_rss_gb()}


def _vm_rss_kb(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _run_child(argv: list[str], max_rss_gb: float, timeout_s: float) -> dict:
  """Runs one worker; kills it above `max_rss_gb` resident or after `timeout_s`."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             TF_CPP_MIN_LOG_LEVEL="2")
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=out,
                            stderr=err, env=env, text=True)
    peak, t0, why = 0, time.time(), None
    while proc.poll() is None:
      rss = _vm_rss_kb(proc.pid)
      peak = max(peak, rss)
      if rss > max_rss_gb * 2**20:
        why = f"killed above {max_rss_gb:g} GB RSS"
      elif time.time() - t0 > timeout_s:
        why = f"killed after {timeout_s:.0f} s"
      if why:
        proc.kill()
        proc.wait()
        break
      time.sleep(0.05)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  if why:
    return {"error": why, "peak_rss_gb": peak / 2**20}
  if proc.returncode:
    return {"error": f"exit {proc.returncode}: {stderr.strip()[-400:]}",
            "peak_rss_gb": peak / 2**20}
  return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--sizes", default="512x512,1231x1907", help="HxW,HxW,...")
  parser.add_argument("--quantize", default="none,float16,dynamic_int8")
  parser.add_argument("--kernels", default="xnnpack,builtin", help="xnnpack and/or builtin")
  parser.add_argument("--formats", default="tflite", help="tflite and/or onnx")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2, help="runtime threads")
  parser.add_argument("--max_rss_gb", type=float, default=8.0, help="watchdog limit per child")
  parser.add_argument("--timeout_s", type=float, default=900.0, help="watchdog time per child")
  parser.add_argument("--pooled_size", type=int, default=22, help="head's pooled side S")
  parser.add_argument("--width", type=int, default=256, help="head's width C")
  parser.add_argument("--no_jax", action="store_true", help="skip the JAX reference")
  parser.add_argument("--keep", default=None, help="folder to keep the .tflite files in")
  parser.add_argument("--worker", choices=["jax", "export", "runtime"],
                      help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)
  parser.add_argument("--input", help=argparse.SUPPRESS)
  parser.add_argument("--model_file", help=argparse.SUPPRESS)
  parser.add_argument("--quantize_one", dest="quantize_one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    if args.worker == "export":
      args.quantize = args.quantize_one
    print(json.dumps({"jax": _worker_jax, "export": _worker_export,
                      "runtime": _worker_runtime}[args.worker](args)))
    return

  import numpy as np  # pylint: disable=g-import-not-at-top
  print(f"# {os.cpu_count()} cores, load average {os.getloadavg()}, runtime threads "
        f"{args.threads}, watchdog {args.max_rss_gb:g} GB", flush=True)
  common = [f"--repeats={args.repeats}", f"--threads={args.threads}",
            f"--pooled_size={args.pooled_size}", f"--width={args.width}"]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.keep or tmp
    os.makedirs(folder, exist_ok=True)
    for size in args.sizes.split(","):
      h, w = (int(v) for v in size.split("x"))
      inp = os.path.join(tmp, f"input_{size}.npy")
      np.save(inp, np.random.RandomState(1).standard_normal((1, h, w, 3)).astype(np.float32))
      jax_r = {"error": "skipped"}
      if not args.no_jax:
        jax_r = _run_child(["--worker=jax", f"--size={size}", f"--input={inp}", *common],
                           args.max_rss_gb, args.timeout_s)
        print(f"{size} JAX: {json.dumps(jax_r)}", flush=True)
      runs = []
      formats = args.formats.split(",")
      if "tflite" in formats:
        runs += [("tflite", q, args.kernels.split(",")) for q in args.quantize.split(",")]
      if "onnx" in formats:
        runs.append(("onnx", "none", ["ort-cpu"]))
      for fmt, q, kernel_list in runs:
        path = os.path.join(folder, f"student_{size}_{q}.{fmt}")
        exp = _run_child(["--worker=export", f"--size={size}", f"--quantize_one={q}",
                          f"--model_file={path}", *common], args.max_rss_gb, args.timeout_s)
        print(f"{size} {fmt} {q} export: {json.dumps(exp)}", flush=True)
        for kernels in kernel_list:
          r = ({"error": "export failed"} if "error" in exp else _run_child(
              ["--worker=runtime", f"--kernels={kernels}", f"--model_file={path}",
               f"--input={inp}", *common], args.max_rss_gb, args.timeout_s))
          print(f"{size} {fmt} {q} {kernels}: {json.dumps(r)}", flush=True)
          rows.append((size, fmt, q, kernels, exp, r, jax_r))
  print(f"\n| input HxW | format | quantisation | kernels | file MiB | runtime ms "
        f"({args.threads} threads) | runtime peak RSS GB | JAX ms | JAX peak RSS GB | "
        "abs diff vs JAX | convert s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for size, fmt, q, kernels, exp, r, jax_r in rows:
    mib = "" if "error" in exp else f"{exp['mib']:.1f}"
    conv = exp.get("error") or f"{exp['convert_s']:.0f}"
    if "error" in r:
      lat, rss = r["error"], f"> {r['peak_rss_gb']:.1f}" if "killed above" in r["error"] else ""
    else:
      lat, rss = f"{r['ms']:.0f}", f"{r['peak_rss_gb']:.2f}"
    jms = "" if "error" in jax_r else f"{jax_r['ms']:.0f}"
    jrss = "" if "error" in jax_r else f"{jax_r['peak_rss_gb']:.2f}"
    diff = ("" if "error" in r or "error" in jax_r
            else f"{abs(r['score'] - jax_r['score']):.1e}")
    print(f"| {size} | {fmt} | {q} | {kernels} | {mib} | {lat} | {rss} | {jms} | {jrss} | {diff} | "
          f"{conv} |")
  print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
  main()
