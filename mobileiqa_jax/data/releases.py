"""Reading IQA releases from disk: label files, image locations, splits and the MOS scale.

Everything here is plain Python + numpy (+ openpyxl / scipy for .xlsx / .mat label files),
with no tfds: the tfds builders, the folder source of the pipeline and the tests share it.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import math
import os
import pathlib
import random
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from mobileiqa_jax.data import preprocess

# The seed of the split stored when a data set is prepared (seeded 80/20 split). The
# protocol "10 random splits, report the median" uses split seeds 0..9, of which 0 is the
# stored one: `pipeline.tfds_source(..., split_seed=s)` re-splits at read time.
DEFAULT_SPLIT_SEED = 0

# How releases and users' CSVs name their subsets -> the tfds split.
SET_TO_SPLIT = {"train": "train", "training": "train", "val": "validation",
                "valid": "validation", "validation": "validation", "test": "test",
                "testing": "test"}


def data_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
  """`path`, else tfds's data dir: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return pathlib.Path(
      path or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
TRAIN_FRACTION = 0.8


class MissingDataError(FileNotFoundError):
  """A manual download that is absent or incomplete."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One labelled image of a release.

  Attributes:
    name: The image's name as the label file gives it (may hold a sub-folder).
    path: Where the file is on disk.
    mos: The score as released (its data set's scale).
    mos_std: Standard deviation of the ratings where released, else NaN.
    split: 'train', 'validation' or 'test'.
    group: The unit the split keeps together: the image itself, or for KADID-10k its
      reference image, so that no content is in two splits.
  """

  name: str
  path: pathlib.Path
  mos: float
  mos_std: float
  split: str
  group: str


@dataclasses.dataclass(frozen=True)
class MosScale:
  """The affine map between released MOS and the [0, 1] training target.

  unit = (mos - low) / (high - low);  mos = low + unit * (high - low).
  """

  low: float
  high: float
  source: str  # 'documented' (the data set's published scale) or 'train_range'.

  def to_unit(self, mos):
    return (np.asarray(mos, np.float64) - self.low) / (self.high - self.low)

  def to_mos(self, unit):
    return self.low + np.asarray(unit, np.float64) * (self.high - self.low)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "MosScale":
    return cls(low=float(d["low"]), high=float(d["high"]), source=str(d["source"]))


def split_by_group(
    groups: Sequence[str], seed: int, train_fraction: float = TRAIN_FRACTION
) -> list[str]:
  """Seeded split of items into 'train'/'test' that keeps each group on one side.

  The unique groups are sorted (so the result does not depend on the order of the label
  file), permuted with `np.random.default_rng(seed)`, and the first
  round(train_fraction * n_groups) go to 'train'.

  Args:
    groups: Group per item (image name, or reference image for KADID-10k).
    seed: Split seed; 0 is the split stored at preparation.
    train_fraction: Fraction of groups in 'train'.

  Returns:
    'train' or 'test' per item.
  """
  unique = sorted(set(groups))
  order = np.random.default_rng(seed).permutation(len(unique))
  n_train = int(round(train_fraction * len(unique)))
  train = {unique[i] for i in order[:n_train]}
  return ["train" if g in train else "test" for g in groups]


# The released code's split seed (its train.sh and logs: --seed 3407).
REFERENCE_SPLIT_SEED = 3407


def reference_split(num_images: int,
                    seed: int = REFERENCE_SPLIT_SEED) -> tuple[list[int], list[int]]:
  """The split of the authors' released training code: (train indices, test indices).

  Computed as their `train.py` does: Python's `random.seed(seed)` (nothing else draws from
  `random` before it), `random.shuffle(list(range(num_images)))`, then the first
  `int(round(0.8 * num_images))` shuffled indices train and the rest test. Indices count the
  rows of the data set's label file in file order (UHD-IQA: the 4,269 rows of
  `uhd-iqa-training-metadata.csv`, giving 3,415 / 854). A private `random.Random` is used, so
  the global `random` state is left alone.

  Args:
    num_images: Rows of the label file the released code reads (`dataset_info.json`).
    seed: The released code's seed.

  Returns:
    (train, test): lists of row indices, each in the shuffled order the released code visits.
  """
  if num_images < 1:
    raise ValueError(f"reference_split: num_images must be >= 1, got {num_images}.")
  order = list(range(num_images))
  random.Random(seed).shuffle(order)
  n_train = int(round(0.8 * num_images))
  return order[:n_train], order[n_train:]


# ------------------------------------------------------------------------------------------
# Label files.


def read_csv_rows(path: pathlib.Path, required: Sequence[str]) -> list[dict[str, str]]:
  """Reads a CSV with a header into dicts; raises naming the file if a column is missing."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
      raise ValueError(
          f"{path}: missing column(s) {missing}; the header is {header}. The file needs "
          f"the columns {list(required)}."
      )
    rows = []
    for row in reader:
      row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
      if any(row.values()):  # skip blank lines only
        rows.append(row)
  return rows


def read_xlsx_rows(path: pathlib.Path) -> list[list]:
  """All rows of the first worksheet of an .xlsx file as lists of cell values."""
  try:
    import openpyxl  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading {path} needs openpyxl: pip install openpyxl"
    ) from e
  wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
  try:
    ws = wb.worksheets[0]
    return [list(r) for r in ws.iter_rows(values_only=True)]
  finally:
    wb.close()


def read_mat_vector(path: pathlib.Path, key: str) -> np.ndarray:
  """A MATLAB variable from a .mat file, flattened (cell arrays -> str objects)."""
  import scipy.io  # pylint: disable=g-import-not-at-top

  mat = scipy.io.loadmat(str(path))
  if key not in mat:
    names = [k for k in mat if not k.startswith("__")]
    raise ValueError(f"{path}: no variable {key!r}; it holds {names}.")
  v = np.asarray(mat[key]).reshape(-1)
  if v.dtype == object:  # cell array of char arrays
    v = np.array([str(np.asarray(x).reshape(-1)[0]) if np.asarray(x).size else "" for x in v],
                 dtype=object)
  return v


def parse_float(value, where: str) -> float:
  """float(value) with an error that says where the bad value is."""
  try:
    f = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: {value!r} is not a number.") from None
  if not math.isfinite(f):
    raise ValueError(f"{where}: {value!r} is not a finite number.")
  return f


# ------------------------------------------------------------------------------------------
# Image files.


def locate_images(
    root: pathlib.Path,
    names: Sequence[str],
    subdirs: Sequence[str] | Callable[[int], Sequence[str]] = ("",),
    recursive_fallback: bool = False,
) -> tuple[list[pathlib.Path | None], list[pathlib.Path]]:
  """Finds each named image under `root`.

  Args:
    root: The manual download folder.
    names: Image names from the label file.
    subdirs: Folders (relative to root) tried in order; or a function of the item index
      giving them (e.g. UHD-IQA's per-set folders).
    recursive_fallback: If not found there, look for a file with that base name anywhere
      below root (must be unique).

  Returns:
    (path or None per name, the locations tried for the first missing name).
  """
  index: dict[str, list[pathlib.Path]] | None = None
  found: list[pathlib.Path | None] = []
  first_tried: list[pathlib.Path] = []
  for i, name in enumerate(names):
    dirs = subdirs(i) if callable(subdirs) else subdirs
    tried = [root / d / name for d in dirs]
    hit = next((p for p in tried if p.is_file()), None)
    if hit is None and recursive_fallback:
      if index is None:
        index = {}
        for dirpath, _, files in os.walk(root):
          for fn in files:
            index.setdefault(fn, []).append(pathlib.Path(dirpath) / fn)
      candidates = index.get(os.path.basename(name), [])
      if len(candidates) > 1:
        raise ValueError(
            f"Image {name!r} is ambiguous: {len(candidates)} files under {root} have that "
            f"name ({[str(c) for c in candidates[:4]]}). Keep one copy, or put the images "
            f"where expected: {[str(t.parent) for t in tried]}."
        )
      hit = candidates[0] if candidates else None
    if hit is None and not first_tried:
      first_tried = tried
    found.append(hit)
  return found, first_tried


def missing_report(
    dataset: str,
    root: pathlib.Path,
    names: Sequence[str],
    found: Sequence[pathlib.Path | None],
    tried: Sequence[pathlib.Path],
    fix: str,
) -> None:
  """Raises MissingDataError listing missing images, if any."""
  missing = [n for n, p in zip(names, found) if p is None]
  if not missing:
    return
  shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
  raise MissingDataError(
      f"{dataset}: {len(missing)} of {len(names)} images listed in the label file are "
      f"missing under {root}: {shown}. For {missing[0]!r} these paths were tried: "
      f"{[str(t) for t in tried]}. {fix}"
  )


def check_images(
    entries: Sequence[Entry], num_workers: int | None = None
) -> Iterator[tuple[Entry, bytes, int, int]]:
  """Reads and fully decodes each image (in order, in parallel threads).

  Decoding everything at preparation means a corrupt file fails now, naming the file, and
  not in the middle of training. PIL releases the GIL while decoding, so threads scale.

  Yields:
    (entry, the file's bytes exactly as on disk, width, height).

  Raises:
    ImageDecodeError: naming the first file that does not decode.
  """

  def load(e: Entry):
    data = e.path.read_bytes()
    img = preprocess.decode_rgb(data, str(e.path))
    return e, data, img.width, img.height

  workers = num_workers or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    # Bounded look-ahead keeps memory flat on large releases.
    window: list[concurrent.futures.Future] = []
    it = iter(entries)
    for e in it:
      window.append(pool.submit(load, e))
      if len(window) >= 2 * workers:
        yield window.pop(0).result()
    for fut in window:
      yield fut.result()


def train_range_scale(entries: Iterable[Entry]) -> MosScale:
  """The min-max scale of the training split's MOS."""
  train = [e.mos for e in entries if e.split == "train"]
  if not train:
    raise ValueError("No training images to take the MOS range from.")
  lo, hi = min(train), max(train)
  if hi <= lo:
    raise ValueError(
        f"All training MOS are equal ({lo}); a [0, 1] mapping needs a range. Give the scale "
        "explicitly (mos_range)."
    )
  return MosScale(low=lo, high=hi, source="train_range")


# ------------------------------------------------------------------------------------------
# A user's folder: images + CSV (image_name, mos[, mos_std][, set][, group]).

FOLDER_IMAGE_SUBDIRS = ("", "images", "Images")


def folder_fix_hint(root: pathlib.Path) -> str:
  return (
      f"An image folder needs a CSV with a header row 'image_name,mos[,mos_std]' (optional "
      f"columns: set = train/validation/test, group = content id kept in one split) and the "
      f"images under {root} (or its images/ sub-folder). Then run: python "
      f"launch/prepare_data.py --dataset=iqa_folder --manual_dir={root}"
  )


def find_labels_csv(root: pathlib.Path, labels_csv: str | None) -> pathlib.Path:
  """The label CSV: given (relative to root or absolute), labels.csv, or the only .csv."""
  if labels_csv:
    path = root / labels_csv  # an absolute labels_csv replaces root
    if not path.is_file():
      raise MissingDataError(f"iqa_folder: label file {path} is missing. {folder_fix_hint(root)}")
    return path
  if not root.is_dir():
    raise MissingDataError(f"iqa_folder: folder {root} does not exist. {folder_fix_hint(root)}")
  if (root / "labels.csv").is_file():
    return root / "labels.csv"
  csvs = sorted(root.glob("*.csv"))
  if len(csvs) == 1:
    return csvs[0]
  raise MissingDataError(
      f"iqa_folder: {root} has {'no' if not csvs else len(csvs)} .csv files "
      f"{[c.name for c in csvs]}; name the label file (labels_csv) or call it labels.csv. "
      + folder_fix_hint(root)
  )


def read_folder_labels(
    root: pathlib.Path | str, labels_csv: str | None = None
) -> list[Entry]:
  """Entries of a folder of images with a CSV of scores.

  Splits: the CSV's `set` (or `split`) column if present, else the seeded 80/20 split by
  `group` (column, default: the image name) with seed DEFAULT_SPLIT_SEED.

  Raises:
    MissingDataError: the folder, the CSV or listed images are missing.
    ValueError: a required column is missing or a score is not a number.
  """
  root = pathlib.Path(root).expanduser()
  csv_path = find_labels_csv(root, labels_csv)
  rows = read_csv_rows(csv_path, ["image_name", "mos"])
  if not rows:
    raise ValueError(f"iqa_folder: {csv_path} has a header but no rows.")
  names = [r["image_name"] for r in rows]
  found, tried = locate_images(root, names, FOLDER_IMAGE_SUBDIRS, recursive_fallback=True)
  missing_report("iqa_folder", root, names, found, tried, folder_fix_hint(root))
  mos = [parse_float(r["mos"], f"{csv_path}: {r['image_name']} mos") for r in rows]
  std = [parse_float(r["mos_std"], f"{csv_path}: {r['image_name']} mos_std")
         if r.get("mos_std") else float("nan") for r in rows]
  groups = [r.get("group") or r["image_name"] for r in rows]
  set_col = "set" if "set" in rows[0] else ("split" if "split" in rows[0] else None)
  if set_col:
    splits = []
    for r in rows:
      v = r[set_col].lower()
      if v not in SET_TO_SPLIT:
        raise ValueError(
            f"{csv_path}: {r['image_name']}: {set_col} {r[set_col]!r} is not one of "
            f"{sorted(SET_TO_SPLIT)}.")
      splits.append(SET_TO_SPLIT[v])
  else:
    splits = split_by_group(groups, DEFAULT_SPLIT_SEED)
  return [Entry(name=n, path=p, mos=m, mos_std=s, split=sp, group=g)  # type: ignore[arg-type]
          for n, p, m, s, sp, g in zip(names, found, mos, std, splits, groups)]
