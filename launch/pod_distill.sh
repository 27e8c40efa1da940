#!/usr/bin/env bash
# Distils the student on a Cloud TPU pod slice: every worker runs the same commands, the run
# kept in a bucket (README.md, "Run on a pod").
#
#   TPU=my-v5e-32 ZONE=us-west4-a TEACHER=gs://my-bucket/runs/teacher_uhd_iqa \
#   WORKDIR=gs://my-bucket/runs/student_uhd_iqa DATA_DIR=gs://my-bucket/tensorflow_datasets \
#   bash launch/pod_distill.sh
#
# What happens on each worker (host):
#   * The bucket clients are installed with the package (the `buckets` extra: gcsfs, s3fs);
#     the TPU VM's service account is their credential.
#   * The prepared data set (prepared once into DATA_DIR with launch/prepare_data.py
#     --data_dir=gs://...) is copied to the worker's disk (--stage_to=LOCAL_DATA_DIR, skipped
#     for files already there): tfds reads prepared data from local disk only.
#   * --distributed makes train.py call jax.distributed.initialize(); on TPU the coordinator,
#     process count and index are discovered from the TPU metadata, nothing to pass.
#   * The mesh spans every chip of every host (config.mesh: all devices on `data`); add
#     --config.mesh="(('data', -1), ('fsdp', 4))" to split parameters and Adam moments too.
#   * Each host reads only its slice of every global batch (process_index of process_count);
#     the global batch must divide by the chip count.
#   * The teacher checkpoint is read by every host from the bucket; host 0 holds the workdir's
#     lock and writes logs and plots; all hosts write their checkpoint shards to WORKDIR (a
#     gs:// bucket: orbax writes it directly).
#   * Preemption (SIGTERM): every host finishes its step, saves, waits, exits 0; rerunning
#     this script resumes from WORKDIR.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${TEACHER:?set TEACHER}"
: "${WORKDIR:?set WORKDIR (a gs:// bucket path)}" "${DATA_DIR:?set DATA_DIR (gs://.../tensorflow_datasets)}"
CONFIG="${CONFIG:-configs/student.py:uhd_iqa}"
DATASET="${DATASET:-${CONFIG##*:}}"            # the config's variant names its data set
LOCAL_DATA_DIR="${LOCAL_DATA_DIR:-/tmp/tensorflow_datasets}"
EXTRA_ARGS="${*:-}"                           # the repository is expected at ~/mobileiqa_jax

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  cd ~/mobileiqa_jax
  pip install -q -e '.[buckets]' 'jax[tpu]' >/dev/null
  python launch/prepare_data.py --dataset=${DATASET} --data_dir=${DATA_DIR} \
    --stage_to=${LOCAL_DATA_DIR}
  python launch/train.py --distributed \
    --config=${CONFIG} \
    --config.teacher_checkpoint=${TEACHER} \
    --config.data.data_dir=${LOCAL_DATA_DIR} \
    --config.init.backbone=${BACKBONE:-mobilenetv3_large_100.ra_in1k} \
    --config.batch_size=${BATCH_SIZE:-64} \
    --workdir=${WORKDIR} ${EXTRA_ARGS}
"
