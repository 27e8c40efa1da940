"""LIVE In the Wild Challenge (Ghadiyaram & Bovik, 2016): 1,162 photos, MOS 0-100.

Release layout (manual download, e.g. `~/tensorflow_datasets/downloads/manual/livec/`):

    Data/AllImages_release.mat   AllImages_release: 1169x1 cell of file names
    Data/AllMOS_release.mat      AllMOS_release:    1x1169 double
    Data/AllStdDev_release.mat   AllStdDev_release: 1x1169 double
    Images/                      the images (.bmp and .JPG); Images/trainingImages/ the 7
                                 rater-training images

The first 7 entries of the .mat files are the rater-training images and are excluded, as
in the literature: 1,162 images remain. Stored split: seeded 80/20 by image (seed 0).
Scale: the documented [0, 100].
"""

from __future__ import annotations

import pathlib

import numpy as np

from mobileiqa_jax.data import tfds_builder
from mobileiqa_jax.data import releases

_NUM_TRAINING_IMAGES = 7


class Livec(tfds_builder.IQABuilder):
  """LIVE In the Wild Image Quality Challenge database."""

  DESCRIPTION = __doc__
  HOMEPAGE = "https://live.ece.utexas.edu/research/ChallengeDB/index.html"
  CITATION = """@article{ghadiyaram2016massive,
  title={Massive Online Crowdsourced Study of Subjective and Objective Picture Quality},
  author={Ghadiyaram, Deepti and Bovik, Alan C.},
  journal={IEEE Transactions on Image Processing}, volume={25}, number={1}, pages={372--387}, year={2016}}"""
  MARKER_FILE = "Data/AllImages_release.mat"
  DOCUMENTED_SCALE = (0.0, 100.0)
  RELEASE_COUNT = 1162
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  <manual_dir>/Data/AllImages_release.mat, Data/AllMOS_release.mat, Data/AllStdDev_release.mat
  <manual_dir>/Images/*.bmp, *.JPG   (Images/trainingImages/ for the 7 excluded ones)
  """

  def _read_entries(self, root: pathlib.Path) -> list[releases.Entry]:
    names_mat = self.require_file(root, "Data/AllImages_release.mat")
    mos_mat = self.require_file(root, "Data/AllMOS_release.mat")
    std_mat = self.require_file(root, "Data/AllStdDev_release.mat")
    names = releases.read_mat_vector(names_mat, "AllImages_release")
    mos = releases.read_mat_vector(mos_mat, "AllMOS_release").astype(np.float64)
    std = releases.read_mat_vector(std_mat, "AllStdDev_release").astype(np.float64)
    if not len(names) == len(mos) == len(std):
      raise ValueError(
          f"livec: {names_mat}, {mos_mat} and {std_mat} disagree in length "
          f"({len(names)}, {len(mos)}, {len(std)}).")
    names = [str(n) for n in names[_NUM_TRAINING_IMAGES:]]
    mos, std = mos[_NUM_TRAINING_IMAGES:], std[_NUM_TRAINING_IMAGES:]
    paths = self.locate(root, names, ("Images",))
    return tfds_builder.seeded_entries(names, paths, mos, std)
