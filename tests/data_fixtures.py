"""Small generated replicas of the IQA releases' layouts, for the data tests.

Each `make_<dataset>(root)` writes the release's label files in their released formats
(.csv / .xlsx / .mat) and a few small images under the release's folder names, and returns
the expected labels: {image_name: (mos, std or nan, split or None, group)}.
"""

from __future__ import annotations

import csv
import io
import math
import os
import pathlib

import numpy as np
from PIL import Image

# The LIVE Challenge subset (627 real photos with MOS; see its README for the terms) lives
# beside the repository, in ../shared/data/livec_jpg. MOBILEIQA_LIVEC_DIR points elsewhere.
LIVEC_JPG = pathlib.Path(os.environ.get(
    "MOBILEIQA_LIVEC_DIR",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "livec_jpg"))
if not LIVEC_JPG.is_dir() and "MOBILEIQA_LIVEC_DIR" not in os.environ:
  LIVEC_JPG = pathlib.Path("/work/shared/data/livec_jpg")
LIVEC_IMAGES = str(LIVEC_JPG / "Images")


def image_bytes(seed: int, size=(40, 30), fmt="JPEG", mode="RGB", **save_kwargs) -> bytes:
  """A small textured image, encoded."""
  rng = np.random.default_rng(seed)
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w]
  base = (np.sin(xx / (3 + seed % 5)) + np.cos(yy / 4)) * 60 + 128
  rgb = np.clip(base[..., None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
  img = Image.fromarray(rgb, "RGB")
  if mode == "I;16":
    img = Image.fromarray((rgb[..., 0].astype("<u2") * 257))  # 16-bit greyscale
  elif mode != "RGB":
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, fmt, **save_kwargs)
  return buf.getvalue()


def _write(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def make_uhd_iqa(root: pathlib.Path) -> dict:
  sets = ["training"] * 6 + ["validation"] * 2 + ["test"] * 2
  expected = {}
  with open(root / "uhd-iqa-metadata.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_name", "quality_mos", "set", "width", "height"])
    for i, s in enumerate(sets):
      name = f"{1000 + i}.jpg"
      mos = round(0.3 + 0.05 * i, 4)
      _write(root / s / name, image_bytes(i, (48, 27), quality=95))
      w.writerow([name, mos, s, 48, 27])
      expected[name] = (mos, math.nan, {"training": "train"}.get(s, s), name)
  return expected


def make_koniq10k(root: pathlib.Path) -> dict:
  sets = ["training"] * 6 + ["validation"] * 2 + ["test"] * 3
  expected = {}
  rows_sets, rows_scores = [], []
  for i, s in enumerate(sets):
    name = f"{826373 + i * 7919}.jpg"
    mos5 = 2.0 + 0.2 * i
    sd = 0.5 + 0.01 * i
    z = 30.0 + 5.5 * i
    _write(root / "1024x768" / name, image_bytes(10 + i, (32, 24)))
    counts = [10, 20, 30, 25, 15]
    rows_sets.append([name, *counts, sum(counts), mos5, sd, s])
    rows_scores.append([name, *counts, sum(counts), mos5, sd, z])
    expected[name] = (z, sd, {"training": "train"}.get(s, s), name)
  # The release quotes strings ("image_name",...) and leaves numbers bare.
  with open(root / "koniq10k_distributions_sets.csv", "w", newline="") as f:
    w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
    w.writerow(["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"])
    w.writerows(rows_sets)
  with open(root / "koniq10k_scores_and_distributions.csv", "w", newline="") as f:
    w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
    w.writerow(["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"])
    w.writerows(rows_scores)
  return expected


def make_spaq(root: pathlib.Path, n: int = 10) -> dict:
  import openpyxl  # pylint: disable=g-import-not-at-top

  wb = openpyxl.Workbook()
  ws = wb.active
  ws.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness",
             "Sharpness"])
  expected = {}
  for i in range(n):
    name = f"{i + 1:05d}.jpg"
    mos = 20.0 + 6.25 * i
    _write(root / "TestImage" / name, image_bytes(20 + i, (30, 40)))
    ws.append([name, mos, 50, 51, 52, 53, 54])
    expected[name] = (mos, math.nan, None, name)
  (root / "Annotations").mkdir(parents=True, exist_ok=True)
  wb.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
  return expected


def make_livec(root: pathlib.Path, n: int = 10) -> dict:
  import scipy.io  # pylint: disable=g-import-not-at-top

  names = [f"t{i + 1}.bmp" for i in range(7)]
  for i, name in enumerate(names):
    _write(root / "Images" / "trainingImages" / name, image_bytes(90 + i, (20, 20), fmt="BMP"))
  expected = {}
  for i in range(n):
    # The release mixes .bmp and .JPG.
    name, fmt = (f"{i + 3}.bmp", "BMP") if i % 3 == 0 else (f"{i + 3}.JPG", "JPEG")
    names.append(name)
    _write(root / "Images" / name, image_bytes(30 + i, (25, 25), fmt=fmt))
  mos = np.array([[50.0] * 7 + [10.0 + 8.0 * i for i in range(n)]])  # 1 x N double
  std = np.array([[15.0] * 7 + [12.0 + 0.5 * i for i in range(n)]])
  for i, name in enumerate(names[7:]):
    expected[name] = (mos[0, 7 + i], std[0, 7 + i], None, name)
  cell = np.empty((len(names), 1), dtype=object)  # N x 1 cell of char arrays
  for i, name in enumerate(names):
    cell[i, 0] = np.array([name])
  (root / "Data").mkdir(parents=True, exist_ok=True)
  scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
  scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": mos})
  scipy.io.savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": std})
  return expected


def make_bid(root: pathlib.Path, n: int = 10) -> dict:
  import openpyxl  # pylint: disable=g-import-not-at-top

  wb = openpyxl.Workbook()
  ws = wb.active
  ws.append(["Image Number", "Average Subjective Grade"])
  expected = {}
  for i in range(1, n + 1):
    name = f"DatabaseImage{i:04d}.JPG"
    mos = round(0.4 * i, 3)
    _write(root / name, image_bytes(40 + i, (36, 24)))
    ws.append([i, mos])
    expected[name] = (mos, math.nan, None, name)
  wb.save(root / "DatabaseGrades.xlsx")
  return expected


def make_kadid10k(root: pathlib.Path, refs: int = 5, dists: int = 2, levels: int = 1) -> dict:
  expected = {}
  with open(root / "dmos.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["dist_img", "ref_img", "dmos", "var"])
    for r in range(1, refs + 1):
      ref = f"I{r:02d}.png"
      _write(root / "images" / ref, image_bytes(60 + r, (24, 24), fmt="PNG"))
      for d in range(1, dists + 1):
        for lv in range(1, levels + 1):
          name = f"I{r:02d}_{d:02d}_{lv:02d}.png"
          dmos = 1.5 + 0.3 * r + 0.1 * d
          var = 0.25 * d
          _write(root / "images" / name, image_bytes(100 * r + 10 * d + lv, (24, 24), fmt="PNG"))
          w.writerow([name, ref, dmos, var])
          expected[name] = (dmos, math.sqrt(var), None, ref)
  return expected


def make_folder(root: pathlib.Path, n: int = 6, extra_columns: bool = True) -> dict:
  expected = {}
  with open(root / "labels.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_name", "mos", "mos_std"] if extra_columns else ["image_name", "mos"])
    for i in range(n):
      name = f"photo_{i}.jpg"
      mos = 1.0 + 0.5 * i
      _write(root / "images" / name, image_bytes(200 + i, (30, 20)))
      w.writerow([name, mos, 0.3] if extra_columns else [name, mos])
      expected[name] = (mos, 0.3 if extra_columns else math.nan, None, name)
  return expected


MAKERS = {
    "uhd_iqa": make_uhd_iqa,
    "koniq10k": make_koniq10k,
    "spaq": make_spaq,
    "livec": make_livec,
    "bid": make_bid,
    "kadid10k": make_kadid10k,
    "iqa_folder": make_folder,
}
