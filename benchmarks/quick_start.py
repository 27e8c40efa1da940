r"""Whole-command time to score one photo: launch/predict.py cold and warm vs PyTorch.

  python benchmarks/quick_start.py [--photo=PATH] [--image_size=1231,1907] [--rounds=2]
      [--workdir=DIR]

Writes a student `.pkl` of the authors' shapes with random weights (the time does not depend
on them) to --workdir, then times, as whole fresh processes (interpreter start, imports,
weights, decode, resize, forward, output), in rounds so that each comparison shares the
machine's load of the same minute:

- jax first:  `launch/predict.py --checkpoint=<pkl> <photo> --image_size=H,W` with an empty
  compilation cache folder (what a first run on a new machine or jax version costs);
- jax second: the same command again, the cache now holding its programs;
- torch: a fresh python that builds the PyTorch reference
  (`mobileiqa_jax.weights.torch_reference`: timm MobileNetV3-large + the head; importing it
  imports no jax), loads the same .pkl with torch.load, preprocesses the photo the
  reference's way (PIL bicubic, ImageNet mean/std) and scores it under inference_mode.

Prints one line per run and a JSON summary (medians; second / torch is the figure of merit).
Needs torch and timm for the PyTorch side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PHOTO = "/work/shared/data/livec_jpg/Images/1000.JPG"

_TORCH_SCORE = r"""
import sys, numpy as np, torch
from PIL import Image
from mobileiqa_jax.weights import torch_reference
h, w = (int(v) for v in sys.argv[3].split(","))
model = torch_reference.student_reference().eval()
model.load_state_dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True),
                      strict=True)
im = Image.open(sys.argv[2]).convert("RGB").resize((w, h), Image.BICUBIC)
x = (np.asarray(im, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
x = torch.from_numpy(x.astype(np.float32).transpose(2, 0, 1)[None])
with torch.inference_mode():
  print(f"{sys.argv[2]},{float(model(x)[0]):.6f}")
"""


def write_student_pkl(path: str, seed: int = 0) -> None:
  """The authors' student state dict (real shapes, random weights), saved with torch.save."""
  sys.path.insert(0, REPO)
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.save_authors_pkl(mobileiqa.build_model(mobileiqa.model_config("student")), path,
                             seed)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
  """Wall seconds of a whole command, and its stdout; a failure stops the benchmark."""
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if proc.returncode:
    sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr[-3000:]}")
  return seconds, proc.stdout.strip().splitlines()[-1]


def cli_rows(pkl: str, photo: str, image_size: str, rounds: int, workdir: str) -> dict:
  """Times torch, jax first and jax second as whole commands, `rounds` times; prints each run.

  Returns the medians and ratios (the JSON summary `main` prints; benchmarks/scoring.py prints
  it after its table).
  """
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  runs: dict[str, list[float]] = {"jax_first": [], "jax_second": [], "torch": []}
  scores = {}
  for r in range(rounds):
    cache = os.path.join(workdir, f"xla_cache_{r}")
    shutil.rmtree(cache, ignore_errors=True)
    predict = [sys.executable, "launch/predict.py", f"--checkpoint={pkl}", photo,
               f"--image_size={image_size}", f"--compilation_cache_dir={cache}",
               "--noprogress"]
    for name, cmd in (("torch", [sys.executable, "-c", _TORCH_SCORE, pkl, photo, image_size]),
                      ("jax_first", predict), ("jax_second", predict)):
      load = os.getloadavg()[0]
      seconds, line = timed(cmd, env)
      runs[name].append(seconds)
      scores[name] = float(line.rsplit(",", 1)[1])
      print(f"round {r} {name:10} {seconds:7.2f} s  load {load:5.2f}  score "
            f"{scores[name]:.6f}", flush=True)
  med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
  return {
      "median_s": {k: round(v, 2) for k, v in med.items()},
      "first_over_torch": round(med["jax_first"] / med["torch"], 2),
      "second_over_torch": round(med["jax_second"] / med["torch"], 2),
      "abs_score_diff_jax_torch": abs(scores["jax_second"] - scores["torch"]),
      "load_avg_1min_end": round(os.getloadavg()[0], 2),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--photo", default=DEFAULT_PHOTO)
  parser.add_argument("--image_size", default="1231,1907")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "mobileiqa_quick_start"))
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  pkl = os.path.join(args.workdir, "MobileNet_IQA_random.pkl")
  if not os.path.exists(pkl):
    write_student_pkl(pkl)
  print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, photo {args.photo}, "
        f"{args.image_size}", flush=True)
  print(json.dumps(cli_rows(pkl, args.photo, args.image_size, args.rounds, args.workdir)))


if __name__ == "__main__":
  main()
