"""KonIQ-10k (Hosu et al., 2020): 10,073 in-the-wild photos at 1024x768, official splits.

Release layout (manual download, e.g. `~/tensorflow_datasets/downloads/manual/koniq10k/`):

    koniq10k_distributions_sets.csv         image_name, c1..c5, c_total, MOS, SD, set
    koniq10k_scores_and_distributions.csv   image_name, ..., MOS, SD, MOS_zscore   (optional)
    1024x768/*.jpg

Splits are the release's `set` column: training 7,058 / validation 1,000 / test 2,015.
`mos` is MOS_zscore (the 1-100 scale most papers report) when
koniq10k_scores_and_distributions.csv is present, else the 1-5 `MOS`; the metadata's
`mos_scale` records which documented scale ([1, 100] or [1, 5]) maps it to [0, 1].
`mos_std` is the release's SD (of the 1-5 ratings).
"""

from __future__ import annotations

import pathlib

from mobileiqa_jax.data import tfds_builder
from mobileiqa_jax.data import releases



class Koniq10k(tfds_builder.IQABuilder):
  """KonIQ-10k in-the-wild image quality database."""

  DESCRIPTION = __doc__
  HOMEPAGE = "https://database.mmsp-kn.de/koniq-10k-database.html"
  CITATION = """@article{hosu2020koniq,
  title={KonIQ-10k: An Ecologically Valid Database for Deep Learning of Blind Image Quality Assessment},
  author={Hosu, Vlad and Lin, Hanhe and Sziranyi, Tamas and Saupe, Dietmar},
  journal={IEEE Transactions on Image Processing}, volume={29}, pages={4041--4056}, year={2020}}"""
  MARKER_FILE = "koniq10k_distributions_sets.csv"
  RELEASE_COUNT = 10073
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  <manual_dir>/koniq10k_distributions_sets.csv        (image_name, MOS, SD, set)
  <manual_dir>/koniq10k_scores_and_distributions.csv  (optional: MOS_zscore, the 1-100 scale)
  <manual_dir>/1024x768/*.jpg                          (from koniq10k_1024x768.zip)
  """

  def _split_kind(self) -> str:
    return "official"

  def _read_entries(self, root: pathlib.Path) -> list[releases.Entry]:
    sets_csv = self.require_file(root, "koniq10k_distributions_sets.csv")
    rows = releases.read_csv_rows(sets_csv, ["image_name", "MOS", "set"])
    zscore: dict[str, str] = {}
    scores_csv = root / "koniq10k_scores_and_distributions.csv"
    if scores_csv.is_file():
      zscore = {r["image_name"]: r["MOS_zscore"]
                for r in releases.read_csv_rows(scores_csv, ["image_name", "MOS_zscore"])}
    if rows and "MOS_zscore" in rows[0]:
      zscore = {r["image_name"]: r["MOS_zscore"] for r in rows}
    use_z = bool(zscore)
    self._scale = (1.0, 100.0) if use_z else (1.0, 5.0)
    names = [r["image_name"] for r in rows]
    if use_z:
      lacking = [n for n in names if n not in zscore]
      if lacking:
        raise ValueError(f"koniq10k: {scores_csv} has no MOS_zscore for {lacking[:5]}.")
    paths = self.locate(root, names, ("1024x768",))
    entries = []
    for i, (n, p, r) in enumerate(zip(names, paths, rows)):
      s = r["set"].lower()
      if s not in releases.SET_TO_SPLIT:
        raise ValueError(f"koniq10k: {sets_csv} row {i + 2}: unknown set {r['set']!r}.")
      mos = zscore[n] if use_z else r["MOS"]
      entries.append(releases.Entry(
          name=n, path=p, mos=releases.parse_float(mos, f"koniq10k: {n} MOS"),
          mos_std=float(r["SD"]) if r.get("SD") else float("nan"),
          split=releases.SET_TO_SPLIT[s], group=n))
    return entries

  def _mos_scale(self, entries):
    lo, hi = self._scale
    return releases.MosScale(low=lo, high=hi, source="documented")
