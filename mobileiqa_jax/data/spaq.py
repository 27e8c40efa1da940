"""SPAQ (Fang et al., 2020): 11,125 smartphone photos, MOS 0-100, seeded 80/20 split.

Release layout (manual download, e.g. `~/tensorflow_datasets/downloads/manual/spaq/`):

    Annotations/MOS and Image attribute scores.xlsx   Image name, MOS, Brightness, ...
    TestImage/*.jpg                                   (also accepted: images/ or the root)

There is no official split: the stored one is a seeded 80/20 split by image
(`releases.split_by_group`, seed 0). Scale: the documented [0, 100].
Reading .xlsx needs openpyxl.
"""

from __future__ import annotations

import pathlib

from mobileiqa_jax.data import tfds_builder
from mobileiqa_jax.data import releases

_XLSX = "Annotations/MOS and Image attribute scores.xlsx"


class Spaq(tfds_builder.IQABuilder):
  """SPAQ: smartphone photography attribute and quality database."""

  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/h4nwei/SPAQ"
  CITATION = """@inproceedings{fang2020perceptual,
  title={Perceptual Quality Assessment of Smartphone Photography},
  author={Fang, Yuming and Zhu, Hanwei and Zeng, Yan and Ma, Kede and Wang, Zhou},
  booktitle={CVPR}, pages={3677--3686}, year={2020}}"""
  MARKER_FILE = _XLSX
  DOCUMENTED_SCALE = (0.0, 100.0)
  RELEASE_COUNT = 11125
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  <manual_dir>/{_XLSX}   (columns: Image name, MOS, ...)
  <manual_dir>/TestImage/*.jpg   (or images/, or the root)
  """

  def _read_entries(self, root: pathlib.Path) -> list[releases.Entry]:
    xlsx = self.require_file(root, _XLSX)
    rows = releases.read_xlsx_rows(xlsx)
    if not rows:
      raise ValueError(f"spaq: {xlsx} is empty.")
    header = [str(h).strip().lower() if h is not None else "" for h in rows[0]]
    try:
      i_name = next(i for i, h in enumerate(header) if "name" in h)
      i_mos = header.index("mos")
    except (StopIteration, ValueError):
      raise ValueError(
          f"spaq: {xlsx} needs columns 'Image name' and 'MOS' in its first row; it has {rows[0]}."
      ) from None
    names, mos = [], []
    for r, row in enumerate(rows[1:], start=2):
      if row[i_name] is None or str(row[i_name]).strip() == "":
        continue
      names.append(str(row[i_name]).strip())
      mos.append(releases.parse_float(row[i_mos], f"spaq: {xlsx} row {r} MOS"))
    paths = self.locate(root, names, ("TestImage", "images", ""))
    return tfds_builder.seeded_entries(names, paths, mos)
