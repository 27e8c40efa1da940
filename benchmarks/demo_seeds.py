r"""The demo's held-out figures per seed: the teacher demo, then the student distilled from it.

  python benchmarks/demo_seeds.py [--seeds=3407,1,2] [--workdir=DIR] [--only=teacher|student]
      [--teacher_args="--config.x=..."] [--student_args="..."] [--json=OUT.json]

For each seed, the README's two commands, each a fresh process with its own workdir:

  python launch/train.py --config=configs/teacher.py:demo --config.seed=S \
      --workdir=DIR/teacher_S
  python launch/train.py --config=configs/student.py:demo --config.seed=S \
      --config.teacher_checkpoint=DIR/teacher_S --workdir=DIR/student_S

and prints, per run: the best held-out SROCC and PLCC (the epoch the trainer kept, read from
the workdir's summary.json), that epoch, the run's wall minutes and CPU seconds (children's
user + sys), and the machine's 1-minute load average sampled while it ran (mean and max; the
VM is shared, so every time comes with its load). Also the machine (CPU model, cores), the
commit and whether the tree had local changes. Runs go one after the other, never
concurrently. Asserts nothing: a run that fails is reported with its log's last lines.
The default seeds are the configs' own (3407) and two others. --workdir keeps the workdirs
(default: a temporary folder, removed at the end); a `teacher_S` or `student_S` folder already
there is removed before its run, so every run starts fresh. --only=student distils again from
the teacher workdirs a previous call left there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "launch", "train.py")


def machine() -> dict[str, object]:
  """CPU model, logical cores (and how many this process may use), memory, OS."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_gib = None
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
  except (OSError, ValueError, IndexError):
    pass
  return {"cpu": model, "cores": os.cpu_count(),
          "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(),
          "memory_gib": mem_gib, "os": platform.platform()}


def commit() -> str:
  """HEAD's short hash, with '+local changes' when tracked files differ from it."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.strip()
  head = git("rev-parse", "--short", "HEAD") or "unknown"
  return head + (" +local changes" if git("status", "--porcelain", "--untracked-files=no")
                 else "")


class LoadSampler:
  """Samples the 1-minute load average every `every` seconds in a thread."""

  def __init__(self, every: float = 10.0):
    self.every, self.samples = every, [os.getloadavg()[0]]
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.wait(self.every):
      self.samples.append(os.getloadavg()[0])

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.samples.append(os.getloadavg()[0])


def best_of(workdir: str) -> dict[str, object]:
  """The kept (best) evaluation of a finished run, and every evaluation's SROCC by epoch."""
  out: dict[str, object] = {}
  evals = []
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        if row.get("kind") == "eval":
          evals.append((int(row["epoch"]), round(row["srocc"], 4)))
  except (OSError, ValueError, KeyError):
    pass
  out["srocc_by_epoch"] = evals
  try:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return out
  best = summary.get("best") or {}
  # best_eval: the kept checkpoint scored again at the end (the same figures as `best`).
  final = summary.get("best_eval") or best
  out.update(srocc=final.get("srocc"), plcc=final.get("plcc"), krocc=final.get("krocc"),
             epoch=int(best["epoch"]) if "epoch" in best else None,
             step=int(best["step"]) if "step" in best else None)
  return out


def run(args: list[str], workdir: str, log_path: str) -> dict[str, object]:
  """One launch/train.py process: its wall time, CPU time, load and best figures."""
  env = dict(os.environ)
  # This checkout's package, whatever an editable install points at.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
  cmd = [sys.executable, TRAIN, *args, f"--workdir={workdir}"]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  with LoadSampler() as load, open(log_path, "w", encoding="utf-8") as log:
    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                        check=False).returncode
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  result = {"command": shlex.join(["python", os.path.relpath(TRAIN, REPO), *args,
                                   f"--workdir={workdir}"]),
            "returncode": rc, "minutes": wall / 60,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_mean": statistics.fmean(load.samples), "load_max": max(load.samples)}
  result.update(best_of(workdir))
  if rc:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      result["log_tail"] = f.read()[-3000:]
  return result


def fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", default="3407,1,2",
                      help="comma-separated --config.seed values, one teacher+student each")
  parser.add_argument("--workdir", default="",
                      help="keep the runs' workdirs here (default: a temporary folder)")
  parser.add_argument("--only", choices=("both", "teacher", "student"), default="both",
                      help="student: distil from the teacher workdirs already in --workdir")
  parser.add_argument("--teacher_args", default="", help="extra flags for the teacher runs")
  parser.add_argument("--student_args", default="", help="extra flags for the student runs")
  parser.add_argument("--json", default="", help="also write the results here")
  a = parser.parse_args()
  seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  root = os.path.abspath(a.workdir) if a.workdir else tempfile.mkdtemp(prefix="demo_seeds_")
  os.makedirs(root, exist_ok=True)
  info = {"machine": machine(), "commit": commit(), "started": time.strftime("%Y-%m-%d %H:%M"),
          "python": platform.python_version()}
  print(f"machine: {info['machine']['cpu']}, {info['machine']['cores']} cores "
        f"({info['machine']['usable_cores']} usable), {info['machine']['memory_gib']} GiB; "
        f"commit {info['commit']}; load average now {os.getloadavg()[0]:.2f}", flush=True)
  results = []
  try:
    for seed in seeds:
      t_dir = os.path.join(root, f"teacher_{seed}")
      runs = []
      if a.only != "student":
        runs.append(("teacher", ["--config=configs/teacher.py:demo", f"--config.seed={seed}",
                                 *shlex.split(a.teacher_args)], t_dir))
      if a.only != "teacher":
        runs.append(("student", ["--config=configs/student.py:demo", f"--config.seed={seed}",
                                 f"--config.teacher_checkpoint={t_dir}",
                                 *shlex.split(a.student_args)],
                     os.path.join(root, f"student_{seed}")))
      for role, args, wd in runs:
        if role == "student" and results and results[-1]["role"] == "teacher" and (
            results[-1]["returncode"]):
          continue  # no teacher to distil from
        # A fresh run each time: a workdir left by an earlier call would resume, not train.
        shutil.rmtree(wd, ignore_errors=True)
        r = run(args, wd, os.path.join(root, f"{role}_{seed}.log"))
        r.update(role=role, seed=seed)
        results.append(r)
        print(f"{role:<8s} seed {seed:>5d}: SROCC {fmt(r.get('srocc'), '.4f')} PLCC "
              f"{fmt(r.get('plcc'), '.4f')} best epoch {fmt(r.get('epoch'), 'd')} "
              f"{r['minutes']:5.1f} min ({r['cpu_s']:.0f} CPU s) load {r['load_mean']:.1f} "
              f"(max {r['load_max']:.1f}); SROCC by epoch {r.get('srocc_by_epoch')}"
              + (f"\n  FAILED (exit {r['returncode']}):\n{r['log_tail']}" if r["returncode"]
                 else ""), flush=True)
  finally:
    if not a.workdir:
      shutil.rmtree(root, ignore_errors=True)

  print(f"\n| run | seed | held-out SROCC | PLCC | best epoch | wall min | CPU s | load mean "
        f"(max) |\n|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['role']} | {r['seed']} | {fmt(r.get('srocc'), '.3f')} | "
          f"{fmt(r.get('plcc'), '.3f')} | {fmt(r.get('epoch'), 'd')} | {r['minutes']:.1f} | "
          f"{r['cpu_s']:.0f} | {r['load_mean']:.1f} ({r['load_max']:.1f}) |")
  for role in ("teacher", "student"):
    s = [r["srocc"] for r in results if r["role"] == role and r.get("srocc") is not None]
    if s:
      print(f"{role}: SROCC min {min(s):.3f} mean {statistics.fmean(s):.3f} over {len(s)} "
            f"seeds; wall max "
            f"{max(r['minutes'] for r in results if r['role'] == role):.1f} min")
  print(f"machine: {info['machine']['cpu']}, {info['machine']['cores']} cores; commit "
        f"{info['commit']}; started {info['started']}")
  if a.json:
    with open(a.json, "w", encoding="utf-8") as f:
      json.dump({**info, "runs": results}, f, indent=2)


if __name__ == "__main__":
  main()
