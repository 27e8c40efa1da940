"""The IQA data sets by name, and `prepare`, which turns a manual download into tfds records.

Importing this module registers the tfds builders (`uhd_iqa`, `koniq10k`, `spaq`, `livec`,
`bid`, `kadid10k`, `iqa_folder`). Preparing needs TensorFlow (CPU build) because tfds
serialises records with it; reading them back (`pipeline.tfds_source`) does not.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

from mobileiqa_jax import storage
from mobileiqa_jax.data import tfds_builder
from mobileiqa_jax.data import bid
from mobileiqa_jax.data import iqa_folder
from mobileiqa_jax.data import kadid10k
from mobileiqa_jax.data import releases
from mobileiqa_jax.data import koniq10k
from mobileiqa_jax.data import livec
from mobileiqa_jax.data import spaq
from mobileiqa_jax.data import uhd_iqa

BUILDERS: dict[str, type[tfds_builder.IQABuilder]] = {
    "uhd_iqa": uhd_iqa.UhdIqa,
    "koniq10k": koniq10k.Koniq10k,
    "spaq": spaq.Spaq,
    "livec": livec.Livec,
    "bid": bid.Bid,
    "kadid10k": kadid10k.Kadid10k,
    "iqa_folder": iqa_folder.IqaFolder,
}


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow (used by tfds to write records) off the accelerators JAX uses."""
  if "tensorflow" not in sys.modules:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TF already initialised its devices; nothing more can be done here.


def default_manual_dir(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """<data_dir>/downloads/manual/<name>/, where a download is expected by default."""
  return releases.data_dir(data_dir) / "downloads" / "manual" / name


def make_builder(
    name: str,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    config_name: str | None = None,
    labels_csv: str | None = None,
    mos_range: tuple[float, float] | None = None,
) -> tfds_builder.IQABuilder:
  """The tfds builder of data set `name` (array_record files under data_dir)."""
  if name not in BUILDERS:
    raise ValueError(f"Unknown data set {name!r}; choose one of {sorted(BUILDERS)}.")
  data_dir = releases.data_dir(data_dir)
  kwargs = {}
  if name == "iqa_folder":
    folder = manual_dir or default_manual_dir(name, data_dir)
    kwargs["config"] = iqa_folder.config_for(
        folder, config_name, labels_csv=labels_csv,
        mos_range=tuple(mos_range) if mos_range else None)
  elif config_name or labels_csv or mos_range:
    raise ValueError("config_name, labels_csv and mos_range apply to iqa_folder only.")
  return BUILDERS[name](data_dir=str(data_dir), file_format="array_record", **kwargs)


def prepare(
    name: str,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    config_name: str | None = None,
    labels_csv: str | None = None,
    mos_range: tuple[float, float] | None = None,
) -> pathlib.Path:
  """Prepares data set `name` from its manual download; a no-op if already prepared.

  Args:
    name: One of BUILDERS.
    manual_dir: The folder holding the release (default <data_dir>/downloads/manual/<name>).
    data_dir: Where tfds writes (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    config_name: iqa_folder only: the config's name (default: the folder's name).
    labels_csv: iqa_folder only: the label CSV (default labels.csv or the only .csv).
    mos_range: iqa_folder only: the scores' documented (low, high) scale.

  A `data_dir` in a bucket (gs://, s3://) is prepared in a local temporary folder (tfds's
  array_record writer writes local files) and uploaded; read it back after `stage`.

  Returns:
    The prepared data set's folder (pass it, or name + data_dir, to `pipeline.tfds_source`).

  Raises:
    releases.MissingDataError: the download is absent or incomplete (lists what is missing).
    preprocess.ImageDecodeError: an image does not decode (names the file).
  """
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(
        "Preparing a tfds data set needs TensorFlow to write records: pip install "
        "tensorflow-cpu (reading prepared data does not)."
    ) from e
  hide_gpus_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if data_dir is not None and storage.is_bucket(data_dir):
    if manual_dir is None:
      raise ValueError(f"--data_dir={data_dir} is a bucket: name the downloaded release "
                       f"with --manual_dir (a local folder).")
    storage.check_bucket(data_dir)
    with tempfile.TemporaryDirectory(prefix="mobileiqa_jax-prepare-") as local:
      folder = prepare(name, manual_dir, local, config_name, labels_csv, mos_range)
      rel = os.path.relpath(folder, local).replace(os.sep, "/")
      target = storage.join(os.fspath(data_dir), rel)
      if storage.exists(storage.join(target, "dataset_info.json")):
        raise FileExistsError(f"{target} is already prepared; remove it first to prepare it "
                              f"again.")
      storage.upload_tree(folder, target, last="dataset_info.json")
    return target
  manual = pathlib.Path(manual_dir or default_manual_dir(name, data_dir)).expanduser()
  builder = make_builder(name, data_dir, manual, config_name, labels_csv, mos_range)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return pathlib.Path(builder.data_dir)


def stage(name: str, data_dir: str | os.PathLike, stage_to: str | os.PathLike) -> str:
  """Copies prepared data set `name` from `data_dir` (a bucket, or any folder) to `stage_to`.

  The tfds layout is kept (`<stage_to>/<name>/<version>/...`), so training then reads it with
  `--config.data.data_dir=<stage_to>`. Files already there with the same size are kept (a
  copy that was cut short resumes); a file of another size is refused, not overwritten.

  Returns:
    The staged data set's version folder.

  Raises:
    releases.MissingDataError: `name` is not prepared under `data_dir`.
    FileExistsError: `stage_to` holds other files of the same names.
  """
  source = storage.join(storage.absolute(data_dir), *name.split("/"))
  storage.check_bucket(source)
  sizes = storage.file_sizes(source) if storage.isdir(source) else {}
  versions = sorted({rel.rsplit("/", 1)[0] for rel in sizes
                     if rel.endswith("/dataset_info.json") or rel == "dataset_info.json"})
  if not versions:
    raise releases.MissingDataError(
        f"Data set {name!r} is not prepared under {data_dir} (no {source}/<version>/"
        f"dataset_info.json). Prepare it there first: python launch/prepare_data.py "
        f"--dataset={name.split('/')[0]} --data_dir={data_dir} --manual_dir=<release folder>")
  target = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(stage_to))),
                        *name.split("/"))
  version = versions[-1]
  todo = []
  for rel, size in sorted(sizes.items()):
    if not rel.startswith(version + "/"):
      continue
    local = os.path.join(target, *rel.split("/"))
    if os.path.exists(local):
      if os.path.getsize(local) != size:
        raise FileExistsError(f"{local} exists with another size than {source}/{rel}: remove "
                              f"{os.path.join(target, version)} or stage elsewhere.")
      continue
    todo.append(rel)
  for rel in todo:
    local = os.path.join(target, *rel.split("/"))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    storage.write_atomic(local, storage.read_bytes(storage.join(source, rel)))
  return os.path.join(target, *version.split("/"))
