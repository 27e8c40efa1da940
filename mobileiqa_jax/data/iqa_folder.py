"""Any folder of images with a CSV of scores — users' own data — as a tfds data set.

Layout (`--manual_dir=FOLDER`):

    FOLDER/labels.csv    image_name,mos[,mos_std][,set][,group]   (or the folder's only .csv)
    FOLDER/<image_name>  (or FOLDER/images/<image_name>; image_name may hold sub-folders)

Splits: the `set` column (train/validation/test) if present, else a seeded 80/20 split by
`group` (default: by image), seed 0. Scale: `mos_range=(low, high)` if given (the scale
your scores were collected on), else the training split's min and max.

Several folders can live side by side in one data_dir: each is a config named after the
folder (or `config_name`), read back with `pipeline.tfds_source('iqa_folder/<name>', ...)`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from mobileiqa_jax.data import tfds_builder
from mobileiqa_jax.data import releases

import tensorflow_datasets as tfds


@dataclasses.dataclass
class IqaFolderConfig(tfds.core.BuilderConfig):
  """Config of one folder.

  Attributes:
    labels_csv: The CSV, relative to the folder or absolute; None: labels.csv or the only
      .csv in the folder.
    mos_range: The documented (low, high) scale of the scores; None: the training range.
  """

  labels_csv: str | None = None
  mos_range: tuple[float, float] | None = None


def config_for(folder: str | pathlib.Path, name: str | None = None, **kwargs) -> IqaFolderConfig:
  """A config named after the folder (letters, digits and _ only), or `name`."""
  name = name or re.sub(r"[^0-9A-Za-z_]+", "_", pathlib.Path(folder).expanduser().resolve().name)
  return IqaFolderConfig(name=name, description=f"Images and scores from {folder}", **kwargs)


class IqaFolder(tfds_builder.IQABuilder):
  """A folder of images with a CSV of mean opinion scores."""

  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/"  # users' data: no home page
  MARKER_FILE = ""
  BUILDER_CONFIGS = [IqaFolderConfig(name="default")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  <manual_dir>/labels.csv   (image_name,mos[,mos_std][,set][,group])
  <manual_dir>/<image_name> (or <manual_dir>/images/<image_name>)
  """

  def fix_hint(self, root: pathlib.Path) -> str:
    return releases.folder_fix_hint(root)

  def _split_kind(self) -> str:
    return self._kind

  def _read_entries(self, root: pathlib.Path) -> list[releases.Entry]:
    csv_path = releases.find_labels_csv(root, self.builder_config.labels_csv)
    entries = releases.read_folder_labels(root, str(csv_path))
    with open(csv_path, encoding="utf-8-sig") as f:
      header = {h.strip() for h in f.readline().split(",")}
    self._kind = "official" if header & {"set", "split"} else "seeded"
    return entries

  def _mos_scale(self, entries):
    if self.builder_config.mos_range is not None:
      lo, hi = self.builder_config.mos_range
      return releases.MosScale(low=float(lo), high=float(hi), source="documented")
    return releases.train_range_scale(entries)
