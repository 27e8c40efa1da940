#!/usr/bin/env bash
# Distils the student on a Cloud TPU pod slice: every worker runs the same command.
#
#   TPU=my-v5e-32 ZONE=us-west4-a TEACHER=gs://bucket/runs/teacher_uhd_iqa \
#   WORKDIR=gs://bucket/runs/student_uhd_iqa DATA_DIR=gs://bucket/tensorflow_datasets \
#   bash launch/pod_distill.sh
#
# What happens on each worker (host):
#   * --distributed makes train.py call jax.distributed.initialize(); on TPU the coordinator,
#     process count and index are discovered from the TPU metadata, nothing to pass.
#   * The mesh spans every chip of every host (config.mesh: all devices on `data`); add
#     --config.mesh="(('data', -1), ('fsdp', 4))" to split parameters and Adam moments too.
#   * Each host reads only its slice of every global batch (process_index of process_count)
#     from the prepared tfds data set (prepare it once with launch/prepare_data.py and copy the
#     folder to GCS or every host's disk); the global batch must divide by the chip count.
#   * The teacher checkpoint is read by every host; only host 0 writes logs and plots; all
#     hosts write their checkpoint shards to WORKDIR (must be shared storage, e.g. GCS).
#   * Preemption (SIGTERM): every host finishes its step, saves, waits, exits 0; rerunning
#     this script resumes from WORKDIR.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${TEACHER:?set TEACHER}"
: "${WORKDIR:?set WORKDIR (shared storage)}"
CONFIG="${CONFIG:-configs/student.py:uhd_iqa}"
REPO_URL="${REPO_URL:-.}"   # the repository is expected at ~/mobileiqa_jax on every worker
EXTRA_ARGS="${*:-}"

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  cd ~/mobileiqa_jax
  pip install -q -e '.' 'jax[tpu]' >/dev/null
  python launch/train.py --distributed \
    --config=${CONFIG} \
    --config.teacher_checkpoint=${TEACHER} \
    ${DATA_DIR:+--config.data.data_dir=${DATA_DIR}} \
    --config.init.backbone=${BACKBONE:-mobilenetv3_large_100.ra_in1k} \
    --config.batch_size=${BATCH_SIZE:-64} \
    --workdir=${WORKDIR} ${EXTRA_ARGS}
"
