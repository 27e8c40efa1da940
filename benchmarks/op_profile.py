r"""Where the jitted forward pass spends its time, by part of the model, and the CPU's GEMM.

  python benchmarks/op_profile.py [--model=teacher] [--size=512x512] [--batch=2] [--depth=3]
      [--top=25] [--gemm]

Traces two warm calls of the scoring forward pass (random weights, this host's runtime) with
`jax.profiler` (a Perfetto trace), maps every executed XLA op back to the model through the
compiled HLO's `op_name` metadata, and prints milliseconds per call summed by module path
(`--depth` levels, e.g. `MALs/0/feature_attention`) and by op kind (`ynn_fusion` = XLA:CPU's
YNNPACK matmul fusions). Op times are summed over threads, so independent ops that ran side
by side add up to more than the wall time, which is printed too.

`--gemm` also times one float32 matrix product of the MALs' pixel-attention shape
(512x2420 @ 2420x2420) in JAX, NumPy and, where installed, PyTorch: the ceiling a
matmul-bound model meets on this CPU (docs/scoring.md, "The teacher at 512x512").
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import numpy as np


def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the `op_name` of its metadata (the traced module path)."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = .*?op_name=\"([^\"]*)\"", line)
    if m and m.group(1) not in names:
      names[m.group(1)] = m.group(2)
  return names


def _module_path(op_name: str, depth: int) -> str:
  parts = [p for p in op_name.split("/")[1:-1]
           if p not in ("MobileIQA", "MobileIQA.forward_features", "while", "body", "closed_call")
           and not p.startswith(("jit(", "checkpoint"))]
  return "/".join(parts[:depth]) or "(top)"


def _gemm(repeats: int = 10) -> None:
  m, k, n = 512, 2420, 2420
  a = np.random.randn(m, k).astype(np.float32)
  b = np.random.randn(k, n).astype(np.float32)

  def rate(fn):
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
      fn()
    return 2 * m * k * n / ((time.perf_counter() - t) / repeats) / 1e9

  import jax  # pylint: disable=g-import-not-at-top
  ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
  mm = jax.jit(lambda x, y: x @ y)
  print(f"GEMM {m}x{k} @ {k}x{n} float32: JAX {rate(lambda: mm(ja, jb).block_until_ready()):.0f}"
        f" GFLOP/s, NumPy {rate(lambda: a @ b):.0f}", end="")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    print(f", PyTorch {rate(lambda: ta @ tb):.0f} ({torch.get_num_threads()} threads)")
  except ImportError:
    print(", PyTorch not installed")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="teacher", choices=("teacher", "student"))
  parser.add_argument("--size", default="512x512", help="HxW")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--depth", type=int, default=3, help="module path levels to sum by")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--gemm", action="store_true", help="also time the CPU's GEMM")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import runtime as runtime_lib  # pylint: disable=g-import-not-at-top

  h, w = (int(v) for v in args.size.split("x"))
  platform = runtime_lib.platform_of(jax.devices()[0])
  model = mobileiqa.build_model(mobileiqa.model_config(args.model),
                                runtime_lib.Runtime.for_platform(platform))
  x = jax.numpy.asarray(np.random.RandomState(0).randn(args.batch, h, w, 3), jax.numpy.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  forward = jax.jit(lambda v, images: model.apply(v, images))
  names = _op_names(forward.lower(variables, x).compile().as_text())
  forward(variables, x).block_until_ready()

  calls = 2
  trace_dir = tempfile.mkdtemp(prefix="op_profile_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  t0 = time.perf_counter()
  for _ in range(calls):
    forward(variables, x).block_until_ready()
  wall = (time.perf_counter() - t0) / calls
  jax.profiler.stop_trace()
  trace = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  # A while loop's own event spans its body's ops: count the body, not the loop.
  events = [e for e in json.load(gzip.open(trace))["traceEvents"]
            if e.get("ph") == "X" and e["name"] in names
            and not re.match(r"(while|conditional|call)(\.\d+)?$", e["name"])]

  by_module, by_kind = collections.Counter(), collections.Counter()
  for e in events:
    ms = e["dur"] / 1e3 / calls
    by_module[_module_path(names[e["name"]], args.depth)] += ms
    by_kind[re.sub(r"[._]\d+$", "", e["name"])] += ms
  total = sum(by_module.values())
  print(f"# {args.model} {h}x{w}, batch {args.batch}, {platform}: wall {wall * 1e3:.0f} ms per "
        f"call ({wall / args.batch:.3f} s/photo); op time summed over threads {total:.0f} ms")
  print(f"{'ms/call':>8} {'share':>6}  module")
  for path, ms in by_module.most_common(args.top):
    print(f"{ms:8.1f} {ms / total:6.1%}  {path}")
  print(f"{'ms/call':>8} {'share':>6}  op kind")
  for kind, ms in by_kind.most_common(12):
    print(f"{ms:8.1f} {ms / total:6.1%}  {kind}")
  if args.gemm:
    _gemm()


if __name__ == "__main__":
  main()
