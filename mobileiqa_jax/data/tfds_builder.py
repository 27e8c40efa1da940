"""The shared tfds builder for IQA releases: features, splits, labels, metadata.

Each data set's module only says how to read its release into `releases_lib.Entry` items; this
base turns them into tfds splits. Records keep the image file's bytes exactly as released:
decoding and re-encoding would change the quality that the MOS describes.

Features of every IQA data set here:
  image:       the encoded file, byte-for-byte (bytes; decode with `preprocess.decode_rgb`)
  image_name:  name as the label file gives it
  mos:         score as released (float32, the data set's own scale)
  mos_std:     std of the ratings where released, NaN elsewhere
  mos_norm:    (mos - low) / (high - low), float32; the training target
  width, height: of the stored image, as PIL reads it (before any EXIF rotation)
  group:       the unit splits keep together (image name; reference image for KADID-10k)

Metadata (`builder.info.metadata`, `metadata.json` next to the records):
  mos_scale:   {low, high, source} — mos = low + mos_norm * (high - low)
  split_kind:  'official' or 'seeded' (80/20 by group, seed `split_seed`)
  split_seed, train_fraction, groups: {split: [group per record index]} — lets the
               pipeline re-split with another seed without reading any image.
  label_file_order: [[split, record index] per label-file row, in file order] — the row
               numbering of the authors' released split (`releases_lib.reference_split`).
"""

from __future__ import annotations

import abc
import pathlib
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from mobileiqa_jax.data import releases as releases_lib

_SPLIT_ORDER = ("train", "validation", "test")


def iqa_features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """The record features every IQA data set of this package shares, plus `extra` ones."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(), dtype=np.object_,
                                    doc="Encoded image file, bytes as released."),
      "image_name": tfds.features.Text(),
      "mos": tfds.features.Scalar(np.float32, doc="MOS as released (float32: tf.Example floats)."),
      "mos_std": tfds.features.Scalar(np.float32, doc="Std of ratings; NaN if not released."),
      "mos_norm": tfds.features.Scalar(np.float32, doc="MOS mapped to [0, 1]."),
      "width": tfds.features.Scalar(np.int32),
      "height": tfds.features.Scalar(np.int32),
      "group": tfds.features.Text(doc="Content group; splits keep a group together."),
      **extra,
  })


class IQABuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the IQA builders (manual download; never registered itself)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: original bytes, MOS, splits, scale metadata."}
  # tfds writes records in generation order, so record i of a split is entry i: the
  # metadata's per-record groups rely on it, and it keeps the stored order reproducible.
  # (The pipeline shuffles with its own seed.)

  # Set by each data set.
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""
  # The label file whose presence marks the release's root folder.
  MARKER_FILE = ""
  # The documented MOS scale (low, high), or None to use the training split's range.
  DOCUMENTED_SCALE: tuple[float, float] | None = None
  # Number of labelled images in the full release (a different count is only logged).
  RELEASE_COUNT: int | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self.DESCRIPTION,
        features=iqa_features(),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  # ---------------------------------------------------------------------------------------
  # What each data set provides.

  @abc.abstractmethod
  def _read_entries(self, root: pathlib.Path) -> list[releases_lib.Entry]:
    """Reads the release under `root` into entries; raises MissingDataError if incomplete."""

  def _mos_scale(self, entries: Sequence[releases_lib.Entry]) -> releases_lib.MosScale:
    if self.DOCUMENTED_SCALE is not None:
      lo, hi = self.DOCUMENTED_SCALE
      return releases_lib.MosScale(low=lo, high=hi, source="documented")
    return releases_lib.train_range_scale(entries)

  # ---------------------------------------------------------------------------------------
  # Shared helpers for the data set modules.

  def fix_hint(self, root: pathlib.Path) -> str:
    """What to do about a missing download, with the command that prepares it."""
    return (
        f"Download the {self.name} release by hand ({self.HOMEPAGE}), unpack it so that the "
        f"layout below holds, then run: python launch/prepare_data.py --dataset={self.name} "
        f"--manual_dir={root}\nExpected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )

  def require_file(self, root: pathlib.Path, relative: str) -> pathlib.Path:
    path = root / relative
    if not path.is_file():
      raise releases_lib.MissingDataError(
          f"{self.name}: {path} is missing (the manual download folder is {root}). "
          + self.fix_hint(root)
      )
    return path

  def locate(
      self, root: pathlib.Path, names: Sequence[str], subdirs, recursive_fallback=False
  ) -> list[pathlib.Path]:
    found, tried = releases_lib.locate_images(root, names, subdirs, recursive_fallback)
    releases_lib.missing_report(self.name, root, names, found, tried, self.fix_hint(root))
    return found  # type: ignore[return-value]

  # ---------------------------------------------------------------------------------------
  # tfds hooks.

  def _manual_root(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
    try:
      root = pathlib.Path(dl_manager.manual_dir)
    except AssertionError:
      # tfds says only "does not exist or is empty"; say what belongs there.
      root = pathlib.Path(getattr(dl_manager, "_manual_dir", None) or "<manual_dir>")
      raise releases_lib.MissingDataError(
          f"{self.name}: the manual download folder {root} does not exist or is empty. "
          + self.fix_hint(root)
      ) from None
    # `tfds build` passes <data_dir>/downloads/manual; ours is its <name>/ sub-folder.
    if self.MARKER_FILE and not (root / self.MARKER_FILE).exists() and (root / self.name).is_dir():
      root = root / self.name
    return root

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._manual_root(dl_manager)
    entries = self._read_entries(root)
    if self.RELEASE_COUNT and len(entries) != self.RELEASE_COUNT:
      print(
          f"Note: {self.name} at {root} lists {len(entries)} labelled images; the full release "
          f"has {self.RELEASE_COUNT}."
      )
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
      dup = sorted({n for n in names if names.count(n) > 1})[:5]
      raise ValueError(f"{self.name}: image names repeat in the label file: {dup}.")
    scale = self._mos_scale(entries)
    splits = [s for s in _SPLIT_ORDER if any(e.split == s for e in entries)]
    unknown = {e.split for e in entries} - set(_SPLIT_ORDER)
    if unknown:
      raise ValueError(f"{self.name}: unknown split name(s) {sorted(unknown)}.")
    by_split = {s: [e for e in entries if e.split == s] for s in splits}
    self.info.metadata.update({
        "mos_scale": scale.as_dict(),
        "split_kind": self._split_kind(),
        "split_seed": releases_lib.DEFAULT_SPLIT_SEED,
        "train_fraction": releases_lib.TRAIN_FRACTION,
        "groups": {s: [e.group for e in by_split[s]] for s in splits},
        # (split, record index) of each label-file row in file order: the row numbering
        # the authors' released code splits (`pipeline.reference_split_source`).
        "label_file_order": _label_file_order(entries, by_split),
        "manual_dir": str(root),
    })
    return {s: self._generate_examples(by_split[s], scale) for s in splits}

  def _split_kind(self) -> str:
    return "seeded"

  def _generate_examples(self, entries: Sequence[releases_lib.Entry], scale: releases_lib.MosScale):
    for e, data, w, h in releases_lib.check_images(entries):
      yield e.name, {
          "image": data,
          "image_name": e.name,
          "mos": e.mos,
          "mos_std": e.mos_std,
          "mos_norm": np.float32(scale.to_unit(e.mos)),
          "width": w,
          "height": h,
          "group": e.group,
      }


def _label_file_order(entries: Sequence[releases_lib.Entry],
                      by_split: dict[str, list[releases_lib.Entry]]) -> list[list]:
  position = {id(e): [s, i] for s, es in by_split.items() for i, e in enumerate(es)}
  return [position[id(e)] for e in entries]


def seeded_entries(
    names: Sequence[str],
    paths: Sequence[pathlib.Path],
    mos: Sequence[float],
    std: Sequence[float] | None = None,
    groups: Sequence[str] | None = None,
) -> list[releases_lib.Entry]:
  """Entries with the stored seeded 80/20 split (by group; group defaults to the name)."""
  groups = list(groups) if groups is not None else list(names)
  split = releases_lib.split_by_group(groups, releases_lib.DEFAULT_SPLIT_SEED)
  std = list(std) if std is not None else [float("nan")] * len(names)
  return [
      releases_lib.Entry(name=n, path=p, mos=float(m), mos_std=float(s), split=sp, group=g)
      for n, p, m, s, sp, g in zip(names, paths, mos, std, split, groups)
  ]
