"""KADID-10k (Lin et al., 2019): 81 references x 25 distortions x 5 levels, DMOS 1-5.

Release layout (manual download, e.g. `~/tensorflow_datasets/downloads/manual/kadid10k/`):

    dmos.csv          dist_img, ref_img, dmos, var
    images/           I01.png ... I81.png (references) and I01_01_01.png ... (distorted)

Only the 10,125 distorted images are examples. Stored split: seeded 80/20 by *reference
image* (seed 0), so no content is in both splits. `mos` is the released dmos (higher is
better), `mos_std` = sqrt(var). Scale: the documented [1, 5].
"""

from __future__ import annotations

import math
import pathlib

from mobileiqa_jax.data import tfds_builder
from mobileiqa_jax.data import releases


class Kadid10k(tfds_builder.IQABuilder):
  """KADID-10k: Konstanz artificially distorted image quality database."""

  DESCRIPTION = __doc__
  HOMEPAGE = "https://database.mmsp-kn.de/kadid-10k-database.html"
  CITATION = """@inproceedings{lin2019kadid,
  title={KADID-10k: A Large-scale Artificially Distorted IQA Database},
  author={Lin, Hanhe and Hosu, Vlad and Saupe, Dietmar},
  booktitle={QoMEX}, year={2019}}"""
  MARKER_FILE = "dmos.csv"
  DOCUMENTED_SCALE = (1.0, 5.0)
  RELEASE_COUNT = 10125
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  <manual_dir>/dmos.csv     (dist_img, ref_img, dmos, var)
  <manual_dir>/images/*.png
  """

  def _read_entries(self, root: pathlib.Path) -> list[releases.Entry]:
    csv_path = self.require_file(root, "dmos.csv")
    rows = releases.read_csv_rows(csv_path, ["dist_img", "ref_img", "dmos"])
    names = [r["dist_img"] for r in rows]
    paths = self.locate(root, names, ("images", ""))
    mos = [releases.parse_float(r["dmos"], f"kadid10k: {r['dist_img']} dmos") for r in rows]
    std = [math.sqrt(releases.parse_float(r["var"], f"kadid10k: {r['dist_img']} var"))
           if r.get("var") else float("nan") for r in rows]
    return tfds_builder.seeded_entries(names, paths, mos, std, groups=[r["ref_img"] for r in rows])
