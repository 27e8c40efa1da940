r"""Prepares an IQA data set from its manual download as tfds records (array_record).

  python launch/prepare_data.py --dataset=livec --manual_dir=~/Downloads/ChallengeDB_release
  python launch/prepare_data.py --dataset=iqa_folder --manual_dir=~/my_photos \
      [--config_name=my_photos] [--labels_csv=labels.csv] [--mos_range=1,5]

  python launch/prepare_data.py --dataset=livec --manual_dir=... --data_dir=gs://bucket/tfds
  python launch/prepare_data.py --dataset=livec --data_dir=gs://bucket/tfds \
      --stage_to=/mnt/disk/tensorflow_datasets

--dataset: uhd_iqa, koniq10k, spaq, livec, bid, kadid10k or iqa_folder. Without
--manual_dir the release is expected in <data_dir>/downloads/manual/<dataset>/. Preparing
an already prepared data set does nothing. Needs TensorFlow (CPU build) to write records;
training reads them without it.

--data_dir may be a bucket (gs://, s3://): the data set is prepared in a local temporary
folder and uploaded. Training reads prepared data from local disk only (tfds's array_record
reader does not read buckets), so each host copies it once with --stage_to=DIR (no
TensorFlow needed) and trains with --config.data.data_dir=DIR.
"""

from absl import app
from absl import flags

from mobileiqa_jax.commands import errors
from mobileiqa_jax.data import datasets

_DATASET = flags.DEFINE_enum("dataset", None, sorted(datasets.BUILDERS), "Data set to prepare.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder holding the downloaded release (default "
    "<data_dir>/downloads/manual/<dataset>/).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
_CONFIG_NAME = flags.DEFINE_string(
    "config_name", None, "iqa_folder: name of this folder's data set (default: folder name).")
_LABELS_CSV = flags.DEFINE_string(
    "labels_csv", None, "iqa_folder: the CSV image_name,mos[,mos_std] (default labels.csv).")
_MOS_RANGE = flags.DEFINE_list(
    "mos_range", None, "iqa_folder: documented score scale 'low,high' (default: the "
    "training split's range).")
_STAGE_TO = flags.DEFINE_string(
    "stage_to", None, "Copy the data set already prepared under --data_dir (e.g. a bucket) to "
    "this local tfds data dir, for training to read (--config.data.data_dir=DIR).")
flags.mark_flag_as_required("dataset")


def main(argv):
  del argv
  if _STAGE_TO.value:
    if not _DATA_DIR.value:
      raise app.UsageError("--stage_to copies from --data_dir: name it (e.g. gs://bucket/tfds).")
    path = datasets.stage(_DATASET.value if _DATASET.value != "iqa_folder" or
                          not _CONFIG_NAME.value else f"iqa_folder/{_CONFIG_NAME.value}",
                          _DATA_DIR.value, _STAGE_TO.value)
    print(f"Staged: {path} (train with --config.data.data_dir={_STAGE_TO.value})")
    return
  mos_range = None
  if _MOS_RANGE.value:
    if len(_MOS_RANGE.value) != 2:
      raise app.UsageError("--mos_range takes two numbers: low,high.")
    try:
      mos_range = tuple(float(x) for x in _MOS_RANGE.value)
    except ValueError:
      raise app.UsageError(f"--mos_range takes two numbers: low,high; got "
                           f"{','.join(_MOS_RANGE.value)}.") from None
  # A missing download (MissingDataError) or a corrupt image is one line naming what to do.
  path = datasets.prepare(
      _DATASET.value, manual_dir=_MANUAL_DIR.value, data_dir=_DATA_DIR.value,
      config_name=_CONFIG_NAME.value, labels_csv=_LABELS_CSV.value, mos_range=mos_range)
  print(f"Prepared: {path}")


if __name__ == "__main__":
  errors.run(main, quiet=False)
