"""UHD-IQA (Hosu et al., 2024): 6,073 photos 3840 px wide, MOS in [0, 1], official splits.

Release layout (manual download, e.g. `~/tensorflow_datasets/downloads/manual/uhd_iqa/`):

    uhd-iqa-metadata.csv        image_name, quality_mos, set (training/validation/test), ...
    <images>                    per-set folders: training/, validation/, test/ (also found
                                under images/ or challenge/, or directly in the root)

or the challenge's per-set files `uhd-iqa-{training,validation,test}-metadata.csv`
(image_name, quality_mos; the set is the file's). Splits: train 4,269 / validation 904 /
test 900. The MOS is already on [0, 1]; the scale stored is the documented [0, 1].
"""

from __future__ import annotations

import pathlib

from mobileiqa_jax.data import tfds_builder
from mobileiqa_jax.data import releases

_STD_COLUMNS = ("quality_std", "quality_sd", "quality_mos_std", "mos_std")


class UhdIqa(tfds_builder.IQABuilder):
  """UHD-IQA: ultra-high-definition photos with expert quality ratings."""

  DESCRIPTION = __doc__
  HOMEPAGE = "https://database.mmsp-kn.de/uhd-iqa-benchmark-database.html"
  CITATION = """@inproceedings{hosu2024uhd,
  title={UHD-IQA Benchmark Database: Pushing the Boundaries of Blind Photo Quality Assessment},
  author={Hosu, Vlad and Agnolucci, Lorenzo and Wiedemann, Oliver and Iso, Daisuke and Saupe, Dietmar},
  booktitle={ECCV Workshops}, year={2024}}"""
  MARKER_FILE = "uhd-iqa-metadata.csv"
  DOCUMENTED_SCALE = (0.0, 1.0)
  RELEASE_COUNT = 6073
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  <manual_dir>/uhd-iqa-metadata.csv   (image_name, quality_mos, set)
      or uhd-iqa-training-metadata.csv, uhd-iqa-validation-metadata.csv[, uhd-iqa-test-metadata.csv]
  <manual_dir>/training/*.jpg, validation/*.jpg, test/*.jpg   (or images/<set>/, challenge/<set>/, or flat)
  """

  def _split_kind(self) -> str:
    return "official"

  def _read_entries(self, root: pathlib.Path) -> list[releases.Entry]:
    rows: list[dict[str, str]] = []
    full = root / "uhd-iqa-metadata.csv"
    if full.is_file():
      rows = releases.read_csv_rows(full, ["image_name", "quality_mos", "set"])
    else:
      per_set = [root / f"uhd-iqa-{s}-metadata.csv" for s in ("training", "validation", "test")]
      if not any(p.is_file() for p in per_set):
        self.require_file(root, "uhd-iqa-metadata.csv")  # raises with the layout
      for p, s in zip(per_set, ("training", "validation", "test")):
        if not p.is_file():
          continue
        part = releases.read_csv_rows(p, ["image_name"])
        if part and "quality_mos" not in part[0]:
          # The challenge withholds test labels: that split cannot be prepared.
          print(f"Note: {p} has no quality_mos column; the {s} split is left out.")
          continue
        rows += [dict(r, set=s) for r in part]
    sets = []
    for i, r in enumerate(rows):
      s = r["set"].lower()
      if s not in releases.SET_TO_SPLIT:
        raise ValueError(f"uhd_iqa: row {i + 2}: unknown set {r['set']!r} (want training/validation/test).")
      sets.append(s)
    names = [r["image_name"] for r in rows]
    paths = self.locate(
        root, names,
        lambda i: (sets[i], f"images/{sets[i]}", f"challenge/{sets[i]}", "images", ""),
        recursive_fallback=True)
    std_col = next((c for c in _STD_COLUMNS if rows and c in rows[0]), None)
    return [
        releases.Entry(
            name=n, path=p,
            mos=releases.parse_float(r["quality_mos"], f"uhd_iqa: {n} quality_mos"),
            mos_std=float(r[std_col]) if std_col and r[std_col] else float("nan"),
            split=releases.SET_TO_SPLIT[s], group=n)
        for n, p, r, s in zip(names, paths, rows, sets)
    ]
