"""The input pipeline shared by training, evaluation and scoring.

Sources are random-access sequences of records `{'image': bytes, 'mos': float, 'name': str}`
(`mos` already normalised to [0, 1]; `source.scale` maps it back to the MOS scale):

- `tfds_source(name, split, data_dir)`: a prepared tfds split (array_record via
  `tfds.data_source`; reading needs no TensorFlow), optionally re-split with `split_seed`.
- `reference_split_source(name, split, data_dir)`: the authors' released-code split of a
  prepared data set (`releases.reference_split`; docs/reproducing.md).
- `folder_source(folder, split)`: a folder of images + CSV, without tfds.
- `memory_source(images, mos, names)`: lists in memory (tests, demos).

`Loader` turns a source into numpy batches for *this process*, with grain (a
`grain.MapDataset` over this process's positions, decoded in grain's reader threads or, with
`worker_type='process'`, in its `mp_prefetch` worker processes):

    loader = Loader(source, batch_size=global_batch // jax.process_count(),
                    image_size=(1231, 1907), train=True, seed=3407,
                    process_index=jax.process_index(), process_count=jax.process_count())
    epoch, start = divmod(step, loader.steps_per_epoch)   # resume: the step says where
    for batch in loader.iter_epoch(epoch, start):         # batch: image [b,H,W,3] f32,
      ...                                                 # mos [b] f32, mask [b] bool,
                                                          # index [b] i64

Order: epoch e visits `permutation(n)` from `np.random.default_rng([seed, e])` (training)
or 0..n-1 (evaluation, or training with `shuffle=False`: the released code's
`DataLoader(shuffle=False)`). Global batch s is positions
[s*G, (s+1)*G) of that order with G = batch_size * process_count, and process p takes its
p-th slice of b = batch_size: so the global batch, and hence training, does not depend on how
many processes share it, `jax.make_array_from_process_local_data` puts each slice where it
belongs, and together the processes see every example exactly once per epoch. Training drops
the last partial global batch (drop_remainder); evaluation, and training with
`drop_remainder=False` (PyTorch's default `drop_last=False`, the released recipe), pad it to
the full global batch with zero images and mask=False, so every step has the same shape on
every device (the train step weights the loss and the BatchNorm statistics by the mask).
Flips are drawn per epoch from `default_rng([seed, e, 1])` and crop windows from
`default_rng([seed, e, 2])`, per position, so they depend neither on the workers nor on where
the epoch was entered: a run restarted at batch s of epoch e continues at the same example.
The position is all the state there is, so the trainer checkpoints only its step (no grain
iterator state).

Workers decode in threads by default: PIL releases the GIL while decoding and resizing and
numpy while normalising, so threads scale without copying images between processes
(`benchmarks/input_pipeline.py` measures both).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
from typing import Any, Iterator, Protocol, Sequence

from absl import flags
import grain
import numpy as np
from PIL import Image

from mobileiqa_jax import storage
from mobileiqa_jax.data import releases
from mobileiqa_jax.data import preprocess

# {'image': encoded bytes, or decoded uint8 (H, W, 3) RGB pixels, 'mos': float, 'name': str}
Record = dict


class Source(Protocol):
  """A random-access sequence of records, with the MOS scale of its `mos`."""

  scale: releases.MosScale | None

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Record:
    ...


# ------------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass
class MemorySource:
  """Records held in lists. `mos` are the normalised [0, 1] targets; `images` are encoded
  files or their decoded uint8 RGB pixels."""

  images: Sequence[bytes | np.ndarray]
  mos: Sequence[float]
  names: Sequence[str]
  scale: releases.MosScale | None = None

  def __post_init__(self):
    if not len(self.images) == len(self.mos) == len(self.names):
      raise ValueError(
          f"images, mos and names differ in length: {len(self.images)}, {len(self.mos)}, "
          f"{len(self.names)}.")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> Record:
    return {"image": self.images[index], "mos": float(self.mos[index]),
            "name": self.names[index]}


def memory_source(
    images: Sequence[bytes],
    mos: Sequence[float],
    names: Sequence[str] | None = None,
    scale: releases.MosScale | None = None,
) -> MemorySource:
  """A source from encoded images and their normalised scores (names default to indices)."""
  names = list(names) if names is not None else [f"image_{i:06d}" for i in range(len(images))]
  return MemorySource(list(images), list(mos), names, scale)


@dataclasses.dataclass
class FolderSource:
  """Images read from disk on access; `entries` from `releases.read_folder_labels`."""

  entries: Sequence[releases.Entry]
  scale: releases.MosScale

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> Record:
    e = self.entries[index]
    return {"image": e.path.read_bytes(), "mos": float(self.scale.to_unit(e.mos)),
            "name": e.name}


def folder_source(
    folder: str | os.PathLike,
    split: str | None = "train",
    labels_csv: str | None = None,
    mos_range: tuple[float, float] | None = None,
    split_seed: int | None = None,
) -> FolderSource:
  """A folder of images + CSV `image_name,mos[,mos_std][,set][,group]`, without tfds.

  Args:
    folder: The folder (see `releases.read_folder_labels` for where images may be).
    split: 'train', 'validation', 'test', or None for every image.
    labels_csv: The CSV (default labels.csv or the folder's only .csv).
    mos_range: The scores' documented (low, high); default: the training split's range.
    split_seed: Re-split 80/20 by group with this seed (ignores a `set` column).

  Returns:
    A source with the same labels, split and scale as the prepared `iqa_folder` data set.
  """
  entries = releases.read_folder_labels(folder, labels_csv)
  if split_seed is not None:
    assign = releases.split_by_group([e.group for e in entries], split_seed)
    entries = [dataclasses.replace(e, split=s) for e, s in zip(entries, assign)]
  if mos_range is not None:
    scale = releases.MosScale(float(mos_range[0]), float(mos_range[1]), "documented")
  else:
    scale = releases.train_range_scale(entries)
  if split is not None:
    chosen = [e for e in entries if e.split == split]
    if not chosen:
      raise ValueError(
          f"{folder}: no images in split {split!r} (splits present: "
          f"{sorted({e.split for e in entries})}).")
    entries = chosen
  return FolderSource(entries, scale)


class TfdsSource:
  """Records of a prepared tfds data set, over one split or a re-split of all of them."""

  def __init__(self, data_sources: dict[str, Any], keys: Sequence[tuple[str, int]],
               scale: releases.MosScale, metadata: dict, directory: pathlib.Path):
    self._sources = data_sources
    self._keys = list(keys)
    self.scale = scale
    self.metadata = metadata
    self.directory = directory

  def __len__(self) -> int:
    return len(self._keys)

  def __getitem__(self, index: int) -> Record:
    split, i = self._keys[index]
    r = self._sources[split][i]
    name = r["image_name"]
    return {"image": r["image"], "mos": float(r["mos_norm"]),
            "name": name.decode() if isinstance(name, bytes) else str(name)}


class BucketDataError(releases.MissingDataError):
  """A tfds data set asked for in a bucket, which training and evaluation do not read."""


def check_local(name: str, data_dir: str | os.PathLike | None = None) -> None:
  """Refuses a prepared data set in a bucket, naming the command that copies it to local disk.

  tfds reads prepared splits through array_record's C++ reader, which does not go through
  etils or the storage clients: against a GCS emulator it hung on a gs:// path. So a data set
  in a bucket is staged to each host's disk once (`prepare_data --stage_to`), then read there.

  Raises:
    BucketDataError: `name` or `data_dir` is a gs:// or s3:// URL.
  """
  remote = [str(p) for p in (name, data_dir) if p and storage.is_bucket(p)]
  if not remote:
    return
  dataset = name if not storage.is_bucket(name) else "<name>"
  where = f"--data_dir={data_dir}" if data_dir and storage.is_bucket(data_dir) else (
      f"--data_dir={storage.dirname(storage.dirname(name))}")
  raise BucketDataError(
      f"{remote[0]} is in a bucket: prepared tfds data is read from local disk (tfds's "
      f"array_record reader does not read buckets). Copy it to this host's disk once: "
      f"python launch/prepare_data.py --dataset={dataset.split('/')[0]} {where} "
      f"--stage_to=/mnt/disk/tensorflow_datasets, then pass "
      f"--config.data.data_dir=/mnt/disk/tensorflow_datasets.")


def find_prepared(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder of a prepared data set: `name` ('livec', 'iqa_folder/<config>') or a path."""
  check_local(name, data_dir)
  if os.path.isfile(os.path.join(name, "dataset_info.json")):
    return pathlib.Path(name)
  root = releases.data_dir(data_dir)
  base_dir = root / name
  versions = sorted(
      (d for d in base_dir.glob("*") if (d / "dataset_info.json").is_file()),
      key=lambda d: tuple(int(x) for x in d.name.split(".") if x.isdigit()))
  if not versions and "/" not in name and (base_dir / "default").is_dir():
    return find_prepared(f"{name}/default", data_dir)
  if not versions:
    dataset = name.split("/")[0]
    raise releases.MissingDataError(
        f"Data set {name!r} is not prepared under {root} (looked for "
        f"{base_dir}/<version>/dataset_info.json). Prepare it with: python "
        f"launch/prepare_data.py --dataset={dataset} --data_dir={root} "
        f"--manual_dir=<folder holding the downloaded release>"
        + (f" --config_name={name.split('/')[1]}" if dataset == "iqa_folder" and "/" in name else ""))
  return versions[-1]


def tfds_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    split_seed: int | None = None,
) -> TfdsSource:
  """A split of a prepared data set, read with `tfds.data_source` (no TensorFlow).

  Args:
    name: 'uhd_iqa', 'koniq10k', 'spaq', 'livec', 'bid', 'kadid10k', 'iqa_folder/<config>',
      or the prepared folder itself.
    split: 'train', 'validation' or 'test' (with split_seed: 'train' or 'test').
    data_dir: tfds data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    split_seed: None: the stored split. An int: pool every stored split and re-split 80/20
      by group (by reference image for KADID-10k) with this seed — the "10 random splits"
      protocol uses seeds 0..9; seed 0 gives the stored split of the seeded data sets.

  Returns:
    A source whose `mos` is the stored [0, 1] target and whose `scale` maps it back.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if "tensorflow" in sys.modules:  # Someone imported TF: keep it off the accelerator.
    from mobileiqa_jax.data import datasets  # pylint: disable=g-import-not-at-top
    datasets.hide_gpus_from_tensorflow()
  directory = find_prepared(name, data_dir)
  # Read the metadata file directly: the same on every tfds version and needs no builder.
  meta_path = directory / "metadata.json"
  if not meta_path.is_file():
    raise releases.MissingDataError(
        f"{meta_path} is missing: {directory} was not prepared by mobileiqa_jax's builders. "
        "Prepare it again with launch/prepare_data.py.")
  metadata = json.loads(meta_path.read_text())
  scale = releases.MosScale.from_dict(metadata["mos_scale"])
  builder = tfds.builder_from_directory(str(directory))
  sources = builder.as_data_source()
  sources = {str(k): v for k, v in sources.items()}
  if split_seed is None:
    if split not in sources:
      raise ValueError(f"{directory}: no split {split!r}; it has {sorted(sources)}.")
    keys = [(split, i) for i in range(len(sources[split]))]
  else:
    if split not in ("train", "test"):
      raise ValueError(f"A re-split (split_seed={split_seed}) has 'train' and 'test', not {split!r}.")
    pooled = [(s, i, g) for s in sorted(sources) for i, g in enumerate(metadata["groups"][s])]
    # Order-independent: sort by group then stored position, so the same seed gives the
    # same split whatever the stored splits were.
    pooled.sort(key=lambda t: (t[2], t[0], t[1]))
    assign = releases.split_by_group([g for _, _, g in pooled], split_seed,
                                   metadata.get("train_fraction", releases.TRAIN_FRACTION))
    keys = [(s, i) for (s, i, _), a in zip(pooled, assign) if a == split]
  return TfdsSource(sources, keys, scale, metadata, directory)


def reference_split_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    rows_from: str | None = None,
    seed: int = releases.REFERENCE_SPLIT_SEED,
) -> TfdsSource:
  """The authors' released-code split of a prepared data set (docs/reproducing.md).

  The released code numbers the rows of the data set's label file in file order, shuffles
  those numbers with Python's `random` (`releases.reference_split`) and trains on the first
  80%, testing (and picking its best epoch) on the rest.

  Args:
    name: As for `tfds_source`.
    split: 'train' or 'test' of that split.
    data_dir: As for `tfds_source`.
    rows_from: Number only the rows of this stored split (UHD-IQA: 'train', the 4,269 rows
      of `uhd-iqa-training-metadata.csv` that the released code reads); None: every row of
      the label file (LIVEC, KonIQ-10k, SPAQ, BID).
    seed: The released code's seed.

  Returns:
    A source over that side of the split, in the order the released code visits it (the
    shuffled order; its DataLoader does not reshuffle). `mos` and `scale` are the stored
    ones, not the released code's per-subset min-max (see docs/reproducing.md).
  """
  if split not in ("train", "test"):
    raise ValueError(f"The reference split has 'train' and 'test', not {split!r}.")
  stored = tfds_source(name, rows_from or "train", data_dir)
  order = stored.metadata.get("label_file_order")
  if order is None:
    raise releases.MissingDataError(
        f"{stored.directory}/metadata.json has no label_file_order (prepared before it was "
        "recorded): prepare the data set again with launch/prepare_data.py to use the "
        "reference split.")
  rows = [(str(s), int(i)) for s, i in order if rows_from is None or s == rows_from]
  train, test = releases.reference_split(len(rows), seed)
  keys = [rows[j] for j in (train if split == "train" else test)]
  # pylint: disable-next=protected-access
  return TfdsSource(stored._sources, keys, stored.scale, stored.metadata, stored.directory)


# ------------------------------------------------------------------------------------------
# Loader.


def _load_example(record: Record, size_hw, hflip, vflip, crop=None,
                  pre_resize=None) -> np.ndarray:
  image = record["image"]
  if isinstance(image, np.ndarray) and image.dtype == np.uint8:
    # Decoded RGB pixels (the demo's sources): the same steps as after a decode.
    img = Image.fromarray(image)
  elif isinstance(image, np.ndarray):  # already preprocessed (feed.ArraySource)
    return preprocess.augment_array(image, hflip=hflip, vflip=vflip, crop=crop)
  else:
    img = preprocess.decode_rgb(image, record["name"])
  return preprocess.resize_normalize(img, size_hw, hflip=hflip, vflip=vflip, crop=crop,
                                     pre_resize_hw=pre_resize)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What this process reads in one epoch from batch `start` on, one row per example.

  Position-based, so a row's example, flips and crop window do not depend on which worker
  decodes it or on how many there are.
  """

  index: np.ndarray  # (rows,) source index, -1 on padding
  flips: np.ndarray  # (rows, 2) horizontal, vertical
  crops: np.ndarray | None  # (rows, 2) top, left


@dataclasses.dataclass(frozen=True)
class _Decode:
  """Row r of a `_Plan` -> {'image', 'mos', 'mask', 'index'}: a grain map (picklable)."""

  source: Any
  plan: _Plan
  image_size: tuple[int, int]
  crop_size: tuple[int, int] | None
  pre_resize_size: tuple[int, int] | None

  def __call__(self, row: int) -> dict[str, Any]:
    i = int(self.plan.index[row])
    h, w = self.crop_size or self.image_size
    if i < 0:  # padding of a last partial batch
      return {"image": np.zeros((h, w, 3), np.float32), "mos": np.float32(0),
              "mask": False, "index": np.int64(-1)}
    rec = self.source[i]
    crop = None
    if self.plan.crops is not None:
      crop = (int(self.plan.crops[row, 0]), int(self.plan.crops[row, 1]), h, w)
    image = _load_example(rec, self.image_size, bool(self.plan.flips[row, 0]),
                          bool(self.plan.flips[row, 1]), crop=crop,
                          pre_resize=self.pre_resize_size)
    return {"image": image, "mos": np.float32(rec["mos"]), "mask": True, "index": np.int64(i)}


class Loader:
  """Deterministic, multi-process batches of preprocessed images, read with grain.

  `iter_epoch(epoch, start_step)` is the whole interface: the order, flips and crops are a
  pure function of (seed, epoch) and the position, so a run resumes from its step alone.

  Args:
    source: Random-access records (see the module docstring).
    batch_size: Examples per batch *in this process* (global batch // process_count).
    image_size: (height, width) after resizing, e.g. (1231, 1907).
    train: Shuffle per epoch, random horizontal and vertical flips, drop the last partial
      global batch; else the stored order, no flips, pad-and-mask the last batch.
    shuffle: Training only: False visits 0..n-1 every epoch (flips stay random per epoch).
    pre_resize_size: (height, width) of a bicubic resize before a bilinear one to
      `image_size` (the released code's UHD-IQA path, `preprocess.resize_normalize`'s
      `pre_resize_hw`); None: one bicubic resize to `image_size`. Training and evaluation.
    seed: Seed of the order and flips.
    process_index: This process (`jax.process_index()`).
    process_count: Processes sharing the global batch (`jax.process_count()`).
    num_workers: Parallel decoders; default: the CPUs this process may use.
    worker_type: 'thread' (default; fastest measured) or 'process' (grain's `mp_prefetch`).
    drop_remainder: Override of the last-batch rule (default: `train`). False in training
      keeps the last partial global batch, padded to full size with mask=False.
    prefetch: Batches decoded ahead of the consumer.
    flips: Random flips in training (False for exact reproducibility tests).
    crop_size: (height, width) of a random window cut from each resized training image
      (after the resize, before the flips); None: the whole image. Evaluation always
      sees the whole `image_size` (the models are fully convolutional).
  """

  def __init__(
      self,
      source: Source,
      batch_size: int,
      image_size: tuple[int, int],
      *,
      train: bool,
      seed: int = 0,
      process_index: int = 0,
      process_count: int = 1,
      num_workers: int | None = None,
      worker_type: str = "thread",
      drop_remainder: bool | None = None,
      prefetch: int = 2,
      flips: bool = True,
      crop_size: tuple[int, int] | None = None,
      shuffle: bool = True,
      pre_resize_size: tuple[int, int] | None = None,
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    if worker_type not in ("thread", "process"):
      raise ValueError(f"worker_type must be 'thread' or 'process', got {worker_type!r}.")
    self.source = source
    self.batch_size = batch_size
    self.image_size = tuple(int(x) for x in image_size)
    self.train = train
    self.shuffle = bool(shuffle)
    self.pre_resize_size = (tuple(int(x) for x in pre_resize_size)
                            if pre_resize_size else None)
    self.seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.num_workers = num_workers or _available_cpus()
    self.worker_type = worker_type
    self.drop_remainder = train if drop_remainder is None else drop_remainder
    self.prefetch = max(1, prefetch)
    self.flips = flips and train
    self.crop_size = tuple(int(x) for x in crop_size) if crop_size and train else None
    if self.crop_size is not None and not (
        0 < self.crop_size[0] <= self.image_size[0]
        and 0 < self.crop_size[1] <= self.image_size[1]):
      raise ValueError(f"crop_size {self.crop_size} must be positive and fit in image_size "
                       f"{self.image_size}.")
    self.global_batch = batch_size * process_count
    n = len(source)
    self.steps_per_epoch = (n // self.global_batch if self.drop_remainder
                            else math.ceil(n / self.global_batch))
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"{n} examples make no full global batch of {self.global_batch}; lower the batch "
          "size or set drop_remainder=False.")

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Source indices in the order epoch `epoch` visits them (all processes together)."""
    n = len(self.source)
    if not (self.train and self.shuffle):
      return np.arange(n)
    return np.random.default_rng([self.seed, epoch]).permutation(n)

  def _plan(self, epoch: int, start_step: int) -> _Plan:
    n = len(self.source)
    order = self.epoch_order(epoch)
    # Epoch position of each of this process's rows: its slice of every global batch.
    steps = np.arange(start_step, self.steps_per_epoch)
    pos = (steps[:, None] * self.global_batch + self.process_index * self.batch_size
           + np.arange(self.batch_size)[None, :]).reshape(-1)
    valid = pos < n
    safe = np.minimum(pos, n - 1)
    index = np.where(valid, order[safe], -1)
    if self.flips:
      flips = (np.random.default_rng([self.seed, epoch, 1]).random((n, 2)) < 0.5)[safe]
    else:
      flips = np.zeros((len(pos), 2), bool)
    crops = None
    if self.crop_size is not None:
      rng = np.random.default_rng([self.seed, epoch, 2])
      room = [s - c + 1 for s, c in zip(self.image_size, self.crop_size)]
      crops = np.stack([rng.integers(0, room[0], n), rng.integers(0, room[1], n)], axis=1)[safe]
    return _Plan(index=index, flips=flips, crops=crops)

  def dataset(self, epoch: int, start_step: int = 0) -> grain.IterDataset:
    """The grain pipeline of batches start_step.. of `epoch` (see `iter_epoch`)."""
    plan = self._plan(epoch, start_step)
    ds = grain.MapDataset.range(len(plan.index)).map(
        _Decode(self.source, plan, self.image_size, self.crop_size, self.pre_resize_size))
    buffer = self.prefetch * self.batch_size
    if self.worker_type == "thread":
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_workers,
                                                prefetch_buffer_size=buffer))
    else:
      if not flags.FLAGS.is_parsed():
        # grain reads its worker options from absl flags, parsed by app.run in the
        # commands; a library caller (tests, notebooks) may not have parsed any.
        flags.FLAGS.mark_as_parsed()
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers,
          per_worker_buffer_size=max(1, buffer // self.num_workers)))
    return ds.batch(self.batch_size, drop_remainder=False)

  def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches start_step.. of `epoch`.

    Each batch: image float32 [b, H, W, 3], mos float32 [b], mask bool [b] (False on
    padding), index int64 [b] (source index, -1 on padding).
    """
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(f"step {start_step} outside [0, {self.steps_per_epoch}] of an epoch.")
    if start_step == self.steps_per_epoch:
      return
    it = iter(self.dataset(epoch, start_step))
    try:
      yield from it
    finally:
      close = getattr(it, "close", None)  # stops process workers of an abandoned epoch
      if close is not None:
        close()


def _available_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1
