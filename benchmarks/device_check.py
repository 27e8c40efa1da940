r"""The one script to run when a GPU is lent: steps timed, memory measured, plan checked.

  python benchmarks/device_check.py --out=$OUT                 # on the GPU: the paper's size
  python benchmarks/device_check.py --toy --out=/tmp/check     # CPU, small models (CI's test)

In one call (each row in its own process, so each peak is its own and a crash or an
out-of-memory is one failed row, not a lost run):

1. the JAX teacher step and distillation step at 1231x1907, batch 8, bfloat16 + remat, then
   float32 + remat (the trainer's `build_steps`, as benchmarks/train_step.py times it):
   images/s, peak device memory (`memory_stats()['peak_bytes_in_use']`; peak RSS on CPU) and
   the compiler's own buffer total on this device;
2. the PyTorch reference step (timm backbones + the head of weights/torch_reference.py,
   eager float32, CUDA when present) for both;
3. the deviceless plan of the same JAX steps (`launch/aot_compile.py`'s API) for
   `--plan_topology` (default: the chip this GPU is, e.g. h200:1), compiled on the CPU of this
   machine, and the ratio measured / planned.

Everything goes to `<out>/device_check.json` as it arrives, so a run stopped by its time limit
keeps what it measured. `--budget_s` (default 420 s) stops starting rows that would not finish.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import train_step  # noqa: E402  (its flags: size, batch, steps, backbones, width, pooled)

flags.DEFINE_string("out", os.environ.get("OUT", "device_check"), "folder for the JSON")
flags.DEFINE_bool("toy", False, "small backbones and images: seconds on a CPU")
flags.DEFINE_string("plan_topology", "", "deviceless plan target; default this GPU's chip:1")
flags.DEFINE_integer("budget_s", 420, "start no row after this many seconds")
flags.DEFINE_integer("row_timeout_s", 240, "kill a row after this many seconds")
flags.DEFINE_string("child", "", "internal: run one row in this process and print its JSON")
FLAGS = flags.FLAGS

# (kind, dtype, remat) of the JAX rows, most wanted first.
JAX_ROWS = (("teacher", "bfloat16", True), ("distill", "bfloat16", True),
            ("teacher", "float32", True), ("distill", "float32", True))

# The CPU-sized variant: the smallest backbones of each family, a small head, small images.
TOY = {"size": "64,64", "batch": "2", "steps": "1", "teacher_backbone": "mobilevitv2_050",
       "student_backbone": "mobilenetv3_small_050", "width": "16", "pooled": "6",
       "teacher_pool": "2"}

# jax Device.device_kind -> the chip name in aot_compile.CHIPS.
_KINDS = {"H100": "h100", "H200": "h200", "A100": "a100"}


def _row_flags() -> list[str]:
  names = ("size", "batch", "steps", "teacher_backbone", "student_backbone", "width", "pooled",
           "teacher_pool", "num_mals", "depth_multiplier")
  return [f"--{n}={FLAGS[n].value}" for n in names]


def _child(spec: str) -> dict:
  """One row in this process: 'jax:<kind>:<dtype>:<remat>', 'torch:<kind>' or 'plan:...'."""
  what, *rest = spec.split(":")
  if what == "jax":
    kind, dtype, remat = rest
    return train_step.time_jax(kind, dtype, remat == "1")
  if what == "torch":
    ips, peak = train_step.time_torch(rest[0])
    return {"images_per_s": ips, "peak_bytes": peak}
  if what == "plan":
    from mobileiqa_jax.training import aot_compile  # pylint: disable=g-import-not-at-top
    kind, dtype, remat, topology = rest[0], rest[1], rest[2], ":".join(rest[3:])
    c = train_step._config(  # pylint: disable=protected-access
        "teacher" if kind == "teacher" else "student", dtype, remat == "1")
    c.depthwise_impl = ""
    if kind == "distill":
      c.teacher_checkpoint = "no/such/teacher"  # the preset teacher at this head size
    report = aot_compile.compile_for_topology(c, topology, with_eval=False,
                                              teacher_backbone=FLAGS.teacher_backbone)
    return report.to_json()
  raise ValueError(f"unknown row {spec!r}")


def _run_row(spec: str, env: dict[str, str], timeout: float) -> dict:
  t = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={spec}",
                           *_row_flags()], capture_output=True, text=True, env=env,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"row": spec, "ok": False, "error": f"timed out after {timeout:.0f} s"}
  out = {"row": spec, "wall_s": time.perf_counter() - t}
  last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
  if proc.returncode == 0 and last and last[0].startswith("{"):
    return {**out, "ok": True, **json.loads(last[0])}
  err = [l for l in proc.stderr.strip().splitlines() if l.strip()][-3:]
  return {**out, "ok": False, "error": " | ".join(err)[-600:], "returncode": proc.returncode}


def _device() -> dict:
  """This machine's first device, asked in a child so this process holds no GPU memory."""
  code = ("import jax, json; d = jax.devices()[0]; "
          "print(json.dumps({'platform': d.platform, 'kind': d.device_kind, "
          "'count': jax.device_count(), 'jax': jax.__version__}))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.toy:
    for name, value in TOY.items():
      if not FLAGS[name].present:
        FLAGS[name].parse(value)
  if FLAGS.child:
    print(json.dumps(_child(FLAGS.child)), flush=True)
    return
  start = time.perf_counter()
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, "device_check.json")
  device = _device()
  chip = next((v for k, v in _KINDS.items() if k in device["kind"]), "")
  plan_topology = FLAGS.plan_topology or (f"{chip}:1" if chip else "")
  result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device, "size": FLAGS.size, "batch": FLAGS.batch, "steps": FLAGS.steps,
            "plan_topology": plan_topology, "rows": []}
  env = dict(os.environ)
  cpu_env = dict(os.environ, JAX_PLATFORMS="cpu")

  def save():
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)

  # train_step's --kinds and --dtypes choose rows (the CI test runs one of each kind of row).
  rows = [r for r in JAX_ROWS if r[0] in FLAGS.kinds and r[1] in FLAGS.dtypes]
  specs = []
  for kind, dtype, remat in rows:
    specs.append((f"jax:{kind}:{dtype}:{int(remat)}", env))
    if dtype == "bfloat16" and FLAGS.torch:
      specs.append((f"torch:{kind}", env))
  if plan_topology:
    specs += [(f"plan:{kind}:{dtype}:{int(remat)}:{plan_topology}", cpu_env)
              for kind, dtype, remat in rows if dtype == "bfloat16"]
  for spec, row_env in specs:
    left = FLAGS.budget_s - (time.perf_counter() - start)
    if left < 20:
      result["rows"].append({"row": spec, "ok": False, "error": "not started: budget spent"})
      continue
    row = _run_row(spec, row_env, min(FLAGS.row_timeout_s, left))
    result["rows"].append(row)
    print(json.dumps({k: row.get(k) for k in ("row", "ok", "images_per_s", "peak_bytes",
                                               "per_chip_bytes", "error")}), flush=True)
    save()
  # Measured against planned: the same step, peak device memory over the deviceless total.
  by_row = {r["row"]: r for r in result["rows"] if r.get("ok")}
  result["comparisons"] = []
  for kind, dtype, remat in rows:
    measured = by_row.get(f"jax:{kind}:{dtype}:{int(remat)}")
    plan = by_row.get(f"plan:{kind}:{dtype}:{int(remat)}:{plan_topology}")
    if measured and plan and plan.get("per_chip_bytes"):
      result["comparisons"].append({
          "kind": kind, "dtype": dtype, "remat": remat,
          "measured_peak_bytes": measured["peak_bytes"],
          "compiled_on_device_bytes": measured["compiled_bytes"],
          "planned_bytes": plan["per_chip_bytes"],
          "measured_over_planned": measured["peak_bytes"] / plan["per_chip_bytes"]})
  result["wall_s"] = time.perf_counter() - start
  save()
  print(f"wrote {path} ({len(by_row)} of {len(result['rows'])} rows ok, "
        f"{result['wall_s']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
