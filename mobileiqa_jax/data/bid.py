"""BID, the Blurred Image Database (Ciancio et al., 2011): 586 photos, MOS 0-5.

Release layout (manual download, e.g. `~/tensorflow_datasets/downloads/manual/bid/`):

    DatabaseGrades.xlsx          column 1 image number, column 2 MOS (header in row 1;
                                 a third column is read as the std if its header says so)
    DatabaseImageNNNN.JPG        image number NNNN, 4 digits (also found under ImageDatabase/)

Stored split: seeded 80/20 by image (seed 0). Scale: the documented [0, 5].
Reading .xlsx needs openpyxl.
"""

from __future__ import annotations

import pathlib

from mobileiqa_jax.data import tfds_builder
from mobileiqa_jax.data import releases


class Bid(tfds_builder.IQABuilder):
  """BID: blurred image database."""

  DESCRIPTION = __doc__
  HOMEPAGE = "https://www.sites.google.com/site/eaborrello/databases"
  CITATION = """@article{ciancio2011no,
  title={No-Reference Blur Assessment of Digital Pictures Based on Multifeature Classifiers},
  author={Ciancio, Alexandre and da Costa, Andr{\\'e} Luiz N. Targino and da Silva, Eduardo A. B. and Said, Amir and Samadani, Ramin and Obrador, Pere},
  journal={IEEE Transactions on Image Processing}, volume={20}, number={1}, pages={64--75}, year={2011}}"""
  MARKER_FILE = "DatabaseGrades.xlsx"
  DOCUMENTED_SCALE = (0.0, 5.0)
  RELEASE_COUNT = 586
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  <manual_dir>/DatabaseGrades.xlsx   (image number, MOS)
  <manual_dir>/DatabaseImage0001.JPG ... DatabaseImage0586.JPG   (or under ImageDatabase/)
  """

  def _read_entries(self, root: pathlib.Path) -> list[releases.Entry]:
    xlsx = self.require_file(root, "DatabaseGrades.xlsx")
    rows = releases.read_xlsx_rows(xlsx)
    header = [str(h).lower() if h is not None else "" for h in (rows[0] if rows else [])]
    has_std = len(header) > 2 and ("std" in header[2] or "deviation" in header[2])
    names, mos, std = [], [], []
    for r, row in enumerate(rows[1:], start=2):
      if not row or row[0] is None or str(row[0]).strip() == "":
        continue
      number = int(releases.parse_float(row[0], f"bid: {xlsx} row {r} image number"))
      names.append(f"DatabaseImage{number:04d}.JPG")
      mos.append(releases.parse_float(row[1] if len(row) > 1 else None, f"bid: {xlsx} row {r} MOS"))
      std.append(releases.parse_float(row[2], f"bid: {xlsx} row {r} std") if has_std else float("nan"))
    if not names:
      raise ValueError(f"bid: {xlsx} lists no images (expected rows: image number, MOS).")
    paths = self.locate(root, names, ("", "ImageDatabase"))
    return tfds_builder.seeded_entries(names, paths, mos, std)
