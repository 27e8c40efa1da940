r"""Images/s of the input pipeline turning 3840x2160 JPEGs into normalised 1231x1907 batches.

  python benchmarks/input_pipeline.py [--images=8] [--batch=4] [--epochs=2] [--workers=1,2,4]

Generates photo-like synthetic JPEGs (smooth shading, edges and fine grain; quality 95,
a few MB each, like UHD-IQA's), then times:
  1. each stage on one image (decode, resize, normalise) on one core;
  2. `pipeline.Loader` (grain) with 1..N reader threads and with `mp_prefetch` worker
     processes (started once per epoch, start-up included): images/s, and
     images/s per worker (= per core while workers <= cores).
The issue's target: >= 4 images/s per core, so that a 16-core host feeds a 30+ img/s step.
"""

from __future__ import annotations

import io
import os
import resource
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from mobileiqa_jax.data import pipeline
from mobileiqa_jax.data import preprocess

_IMAGES = flags.DEFINE_integer("images", 8, "Distinct synthetic JPEGs.")
_BATCH = flags.DEFINE_integer("batch", 4, "Per-process batch size.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Passes over the images per measurement.")
_WORKERS = flags.DEFINE_list("workers", None, "Worker counts (default 1..cores, powers of 2).")
_SIZE = (1231, 1907)  # (H, W) of the UHD-IQA teacher


def synthetic_photo(seed: int, w: int = 3840, h: int = 2160, quality: int = 95) -> bytes:
  """A JPEG with the statistics that matter for decode cost: shading, edges, grain."""
  rng = np.random.default_rng(seed)
  small = rng.normal(0, 1, (h // 32, w // 32, 3)).astype(np.float32)
  img = Image.fromarray(np.uint8(np.clip(small * 40 + 128, 0, 255))).resize((w, h), Image.BICUBIC)
  a = np.asarray(img, np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  edges = 40 * np.sign(np.sin(xx / (50 + 10 * seed)) * np.cos(yy / 70))
  a = a + edges[..., None] + rng.normal(0, 6, a.shape).astype(np.float32)
  buf = io.BytesIO()
  Image.fromarray(np.uint8(np.clip(a, 0, 255))).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def _time(fn, repeat=3):
  """(wall, CPU) seconds per call. CPU time is what a core spends, whatever the load of a
  shared machine; wall time is what the consumer sees."""
  fn()
  t, c = time.perf_counter(), time.process_time()
  for _ in range(repeat):
    fn()
  return (time.perf_counter() - t) / repeat, (time.process_time() - c) / repeat


def main(argv):
  del argv
  cores = len(os.sched_getaffinity(0))
  print(f"CPU cores available: {cores}; target size {_SIZE[0]}x{_SIZE[1]} (HxW)")
  t = time.perf_counter()
  images = [synthetic_photo(i) for i in range(_IMAGES.value)]
  mean_mb = np.mean([len(b) for b in images]) / 1e6
  print(f"generated {len(images)} JPEGs 3840x2160, mean {mean_mb:.1f} MB "
        f"({time.perf_counter() - t:.0f} s)")

  # 1. Stages, one core.
  data = images[0]
  img = preprocess.decode_rgb(data, "x")
  small = img.resize((_SIZE[1], _SIZE[0]), Image.BICUBIC)
  stages = {
      "decode": _time(lambda: preprocess.decode_rgb(data, "x")),
      "bicubic resize": _time(lambda: img.resize((_SIZE[1], _SIZE[0]), Image.BICUBIC)),
      "normalise": _time(lambda: preprocess.resize_normalize(small, _SIZE)),
  }
  for i, what in enumerate(("wall", "CPU")):
    total = sum(v[i] for v in stages.values())
    print(f"stages, one thread ({what} time): "
          + ", ".join(f"{k} {v[i] * 1e3:.0f} ms" for k, v in stages.items())
          + f" -> {1 / total:.2f} images/s per core")

  source = pipeline.memory_source(images, [0.5] * len(images))
  counts = ([int(w) for w in _WORKERS.value] if _WORKERS.value
            else sorted({1, *[2 ** k for k in range(1, 8) if 2 ** k <= cores], cores}))

  def run(workers, kind):
    loader = pipeline.Loader(source, _BATCH.value, _SIZE, train=True, seed=0,
                             num_workers=workers, worker_type=kind)
    for _ in loader.iter_epoch(99):  # warm up: imports, first decodes
      break
    n = 0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    t, c = time.perf_counter(), time.process_time()
    for e in range(_EPOCHS.value):
      for b in loader.iter_epoch(e):
        n += int(b["mask"].sum())
    dt, dc = time.perf_counter() - t, time.process_time() - c
    # grain's process workers live for one epoch (their start-up is timed) and are reaped
    # when it ends, so their CPU time is counted here.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Process workers' CPU (start-up and warm-up included, so slightly pessimistic).
    dc += (after.ru_utime - kids.ru_utime) + (after.ru_stime - kids.ru_stime)
    return n / dt, n / dc

  print(f"\nLoader, batch {_BATCH.value}, train (shuffle + flips), {_EPOCHS.value} epochs of "
        f"{len(images)} images:")
  print(f"{'workers':>8} {'kind':>8} {'images/s':>9} {'per worker':>11} {'speed-up':>9} "
        f"{'images/CPU-s':>13}")
  for kind in ("thread", "process"):
    base = None
    for w in counts:
      ips, per_cpu_s = run(w, kind)
      base = base or ips
      print(f"{w:>8} {kind:>8} {ips:>9.2f} {ips / w:>11.2f} {ips / base:>8.2f}x "
            f"{per_cpu_s:>13.2f}")
  print(f"\nload average now: {os.getloadavg()[0]:.1f} on {cores} cores (others' work "
        "lowers wall-clock figures on a shared machine; images/CPU-s is the per-core rate).")


if __name__ == "__main__":
  app.run(main)
