"""What the training loop and evaluation read: train and held-out batches of one run.

`Data` is the interface; `LoaderData` is its one implementation, two `pipeline.Loader`s
(train and held-out) over any sources:

- `from_config(config)`: the configured data set (a prepared tfds data set, or the built-in
  demo data);
- `from_arrays(...)`: preprocessed images held as arrays (tests, benchmarks). They go through
  the same Loader, so the same seed gives the same order, flips and crops as a data set of
  encoded images would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from mobileiqa_jax.data import pipeline

Batch = dict[str, np.ndarray]


def local_batch_size(global_batch_size: int) -> int:
  """The slice of the global batch that this process reads."""
  if global_batch_size % jax.process_count():
    raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


class Data:
  """This process's batches of one run (see `pipeline.Loader` for the order).

  `train_epoch(epoch, start)` yields global batches `start..` of epoch `epoch` (this
  process's rows) as dict(image [b, H, W, 3] float32 normalised, mos [b] float32, and, where
  the last partial batch is kept padded, mask [b] bool: False on padding); the order,
  flips and crops are a pure function of (seed, epoch), so the step alone says where a run
  resumes. `eval_batches()` yields dict(image, mos, mask) over the held-out split, the last
  batch padded (mask 0 on padding).
  """

  num_train: int
  num_eval: int
  steps_per_epoch: int
  mos_range: list[float] | None = None

  def train_epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
    raise NotImplementedError

  def eval_batches(self) -> Iterator[Batch]:
    raise NotImplementedError


class LoaderData(Data):
  """`Data` over a train and a held-out `pipeline.Loader`."""

  def __init__(self, train: pipeline.Loader, held_out: pipeline.Loader):
    self.train, self.held_out = train, held_out
    self.num_train, self.num_eval = len(train.source), len(held_out.source)
    self.steps_per_epoch = train.steps_per_epoch
    scale = getattr(train.source, "scale", None)
    self.mos_range = [float(scale.low), float(scale.high)] if scale is not None else None

  def train_epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
    keep_last = not self.train.drop_remainder
    for batch in self.train.iter_epoch(epoch, start):
      out = {"image": batch["image"], "mos": batch["mos"]}
      if keep_last:  # a padded last batch: the step weights loss and BatchNorm by the mask
        out["mask"] = batch["mask"]
      yield out

  def eval_batches(self) -> Iterator[Batch]:
    for batch in self.held_out.iter_epoch(0, 0):
      yield {"image": batch["image"], "mos": batch["mos"], "mask": batch["mask"]}


def loaders(train_source: pipeline.Source, eval_source: pipeline.Source,
            config: ml_collections.ConfigDict, *, flips: bool | None = None,
            shuffle: bool | None = None) -> LoaderData:
  """`LoaderData` over two sources with `config`'s batch sizes, image size, order and
  augmentation; `flips` and `shuffle` override `config.data.flips` / `config.data.shuffle`.
  """
  common = dict(image_size=tuple(config.data.image_size), seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count(),
                num_workers=config.data.num_workers or None,
                pre_resize_size=tuple(config.data.pre_resize) if all(config.data.pre_resize)
                else None)
  crop = tuple(config.data.train_crop)
  train = pipeline.Loader(train_source, local_batch_size(config.batch_size),
                          train=True,
                          shuffle=config.data.shuffle if shuffle is None else shuffle,
                          flips=config.data.flips if flips is None else flips,
                          drop_remainder=config.data.drop_remainder,
                          crop_size=crop if all(crop) else None, **common)
  held_out = pipeline.Loader(eval_source, local_batch_size(config.data.eval_batch_size),
                             train=False, **common)
  return LoaderData(train, held_out)


def check_data_dir(config: ml_collections.ConfigDict) -> None:
  """Refuses, before a run writes anything, a tfds data set in a bucket (names the lever)."""
  if config.data.name != "demo":
    pipeline.check_local(config.data.name, config.data.data_dir or None)


def sources_from_config(config: ml_collections.ConfigDict,
                        split: str | None = None) -> tuple[pipeline.Source, pipeline.Source]:
  """(train source, held-out source) of `config.data` (`split` overrides the held-out split).

  'demo' is the built-in demo data (no files needed); anything else is a prepared tfds data
  set by name (uhd_iqa, koniq10k, livec, spaq, bid, kadid10k, iqa_folder/<config>) or folder.
  A data set that is not prepared raises an error naming the expected files and the command
  that prepares them.
  """
  eval_split = split or config.data.eval_split
  if config.data.name == "demo":
    from mobileiqa_jax.data import demo  # pylint: disable=g-import-not-at-top
    return demo.source("train"), demo.source(eval_split)
  data_dir = config.data.data_dir or None
  if config.data.split == "reference":  # the released code's random.shuffle split
    rows_from = config.data.reference_rows or None
    sources = tuple(pipeline.reference_split_source(config.data.name, s, data_dir, rows_from,
                                                    config.data.reference_split_seed)
                    for s in ("train", eval_split))
    rows = sum(len(s) for s in sources)
    if config.data.reference_count and rows != config.data.reference_count:
      raise ValueError(
          f"config.data.reference_count: the released code splits {config.data.reference_count} "
          f"rows of {config.data.name}'s label file, the prepared data set has {rows}; the "
          "split would differ. Prepare the complete release, or set "
          "--config.data.reference_count=0 to split what is there.")
    return sources
  if config.data.split != "stored":
    raise ValueError(f"config.data.split must be 'stored' or 'reference', got "
                     f"{config.data.split!r}.")
  return (pipeline.tfds_source(config.data.name, config.data.train_split, data_dir),
          pipeline.tfds_source(config.data.name, eval_split, data_dir))


def from_config(config: ml_collections.ConfigDict, split: str | None = None) -> LoaderData:
  """The configured data set (tfds records, or the built-in demo data)."""
  return loaders(*sources_from_config(config, split), config)


@dataclasses.dataclass
class ArraySource:
  """Preprocessed images (float32 [n, H, W, 3], already normalised) and their [0, 1] MOS."""

  images: np.ndarray
  mos: np.ndarray
  scale: Any = None

  def __len__(self) -> int:
    return len(self.mos)

  def __getitem__(self, index: int) -> pipeline.Record:
    return {"image": self.images[index], "mos": float(self.mos[index]),
            "name": f"array_{index:06d}"}


def from_arrays(train_images: np.ndarray, train_mos: np.ndarray, eval_images: np.ndarray,
                eval_mos: np.ndarray, config: ml_collections.ConfigDict, *,
                flips: bool | None = None, shuffle: bool | None = None) -> LoaderData:
  """`LoaderData` over arrays, with `config`'s batch sizes, seed and augmentation.

  The images must already have `config.data.image_size`; `flips` and `shuffle` as in
  `loaders`.
  """
  train = ArraySource(np.asarray(train_images, np.float32), np.asarray(train_mos, np.float32))
  held_out = ArraySource(np.asarray(eval_images, np.float32), np.asarray(eval_mos, np.float32))
  size = tuple(config.data.image_size)
  for name, src in (("train", train), ("eval", held_out)):
    if src.images.shape[1:] != (*size, 3):
      raise ValueError(f"{name} images have shape {src.images.shape[1:]}, config.data."
                       f"image_size asks for {(*size, 3)}")
  return loaders(train, held_out, config, flips=flips, shuffle=shuffle)
