r"""Scoring photos, JAX `load(.pkl).score` against the authors' PyTorch, in one run.

  python benchmarks/scoring.py [--models=student,teacher] [--sizes=512x512,1231x1907]
      [--frameworks=jax,torch] [--batch=N] [--photos=8] [--repeats=2] [--stages]

Writes an authors'-format `.pkl` per model with random weights
(`mobileiqa_jax.weights.synthetic.save_authors_pkl`; the time does not depend on them), then
runs every (framework, model, size) in a fresh process, so peak RSS
(`profiling.process.peak_rss_bytes`) is that configuration's alone:

- jax: `mobileiqa_jax.scoring.scorer.load(pkl, size, batch_size=--batch).score(photos)`;
  first call (compile + score) and warm seconds per photo (median of --repeats);
- torch: the authors' model written from the paper (`mobileiqa_jax.weights.torch_reference`)
  with `load_state_dict` of the same `.pkl`, one photo at a time under `inference_mode` (PIL
  bicubic resize, ImageNet mean/std).

Both run with their libraries' own settings (allocator, threads). `--stages` also prints the
peak and current resident memory after imports, load, first call and warm calls (where the
memory goes). Photos are LIVE Challenge JPEGs (../shared/data/livec_jpg). Then, unless
`--cli_rounds=0`, the one-photo whole command (`launch/predict.py` on the student's `.pkl` at
--cli_size, first run with an empty compilation cache, second run, and the PyTorch reference in
a fresh process), as benchmarks/quick_start.py times it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = "/work/shared/data/livec_jpg/Images"


def _mem() -> dict:
  """Peak and current resident memory of this process, GB (current: None without /proc)."""
  from mobileiqa_jax.profiling import process  # pylint: disable=g-import-not-at-top
  now = process.rss_bytes()
  return {"peak": process.peak_rss_bytes() / 2**30, "now": None if now is None else now / 2**30}


def _worker(args: argparse.Namespace) -> dict:
  h, w = (int(v) for v in args.size.split("x"))
  photos = sorted(glob.glob(os.path.join(args.photo_dir, "*.JPG")))[: args.photos]
  stages = {"start": _mem()}
  if args.framework == "torch":
    import numpy as np  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from mobileiqa_jax.weights import torch_reference  # pylint: disable=g-import-not-at-top
    stages["import"] = _mem()
    ctor = (torch_reference.teacher_reference if args.model == "teacher"
            else torch_reference.student_reference)
    model = ctor().eval()
    model.load_state_dict(torch.load(args.pkl, map_location="cpu", weights_only=True))
    stages["load"] = _mem()

    def run():
      out = []
      for p in photos:
        im = Image.open(p).convert("RGB").resize((w, h), Image.BICUBIC)
        x = (np.asarray(im, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        x = torch.from_numpy(x.astype(np.float32).transpose(2, 0, 1)[None])
        with torch.inference_mode():
          out.append(float(model(x)[0]))
      return out
  else:
    from mobileiqa_jax.scoring import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
    stages["import"] = _mem()
    scorer = scorer_lib.load(args.pkl, (h, w), batch_size=args.batch or None)
    stages["load"] = _mem()
    stages["tensorflow imported"] = "tensorflow" in sys.modules

    def run():
      return scorer.score(photos)

  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  stages["first call"] = _mem()
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  stages["warm"] = _mem()
  times.sort()
  return {"framework": args.framework, "model": args.model, "size": args.size,
          "batch": scorer.batch_size if args.framework == "jax" else 1, "photos": len(photos),
          "first_s": first, "s_per_photo": times[len(times) // 2] / len(photos),
          "peak_rss_gb": stages["warm"]["peak"], "stages": stages}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="student,teacher")
  parser.add_argument("--sizes", default="512x512,1231x1907", help="HxW,HxW,...")
  parser.add_argument("--frameworks", default="jax,torch")
  parser.add_argument("--batch", type=int, default=0,
                      help="JAX batch size (0: load's default for this platform)")
  parser.add_argument("--photos", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--photo_dir", default=PHOTOS)
  parser.add_argument("--stages", action="store_true", help="print memory per stage")
  parser.add_argument("--cli_rounds", type=int, default=2,
                      help="rounds of the one-photo command rows (0: none)")
  parser.add_argument("--cli_size", default="1231,1907", help="H,W of the command rows")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--framework", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)
  parser.add_argument("--pkl", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(_worker(args)))
    return

  print(f"# {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"JAX batch {args.batch or 'default'}, {args.photos} photos")
  print(f"{'model':8} {'size':>10} {'framework':>9} {'s/photo':>8} {'first s':>8} "
        f"{'peak RSS GB':>11}")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  tmp = tempfile.mkdtemp(prefix="scoring_bench_")
  sys.path.insert(0, REPO)
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import synthetic  # pylint: disable=g-import-not-at-top
  results = {}
  for model in args.models.split(","):
    pkl = synthetic.save_authors_pkl(mobileiqa.build_model(mobileiqa.model_config(model)),
                                     os.path.join(tmp, f"{model}.pkl"))
    for size in args.sizes.split(","):
      for fw in args.frameworks.split(","):
        cmd = [sys.executable, __file__, "--worker", f"--framework={fw}", f"--model={model}",
               f"--size={size}", f"--batch={args.batch}", f"--repeats={args.repeats}",
               f"--photos={args.photos}", f"--photo_dir={args.photo_dir}", f"--pkl={pkl}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode:
          print(f"{model:8} {size:>10} {fw:>9} FAILED: {out.stderr.strip()[-300:]}")
          continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[(model, size, fw)] = r
        print(f"{model:8} {size:>10} {fw:>9} {r['s_per_photo']:8.3f} {r['first_s']:8.2f} "
              f"{r['peak_rss_gb']:11.2f}", flush=True)
        if args.stages:
          print("  " + json.dumps(r["stages"]), flush=True)
      j, t = results.get((model, size, "jax")), results.get((model, size, "torch"))
      if j and t:
        print(f"{model:8} {size:>10} {'jax/torch':>9} {j['s_per_photo'] / t['s_per_photo']:8.2f} "
              f"{'':8} {j['peak_rss_gb'] / t['peak_rss_gb']:11.2f}", flush=True)
  if args.cli_rounds > 0:
    import quick_start  # pylint: disable=g-import-not-at-top  # this folder's
    pkl = os.path.join(tmp, "student.pkl")
    if not os.path.exists(pkl):
      synthetic.save_authors_pkl(mobileiqa.build_model(mobileiqa.model_config("student")), pkl)
    photo = sorted(glob.glob(os.path.join(args.photo_dir, "*.JPG")))[0]
    print(f"# launch/predict.py on one photo ({photo}) at {args.cli_size}, the student's .pkl, "
          f"whole commands", flush=True)
    print(json.dumps(quick_start.cli_rows(pkl, photo, args.cli_size, args.cli_rounds, tmp)))


if __name__ == "__main__":
  main()
