"""Scoring, checkpoints, locks, data and errors with gs:// (fake-gcs-server) and s3:// (moto).

One session's emulators (conftest.bucket_servers) serve every test. The trainings in buckets
(SIGTERM and kill -9 with resume, distillation from a gs:// teacher) are test_train.py's,
where they share that file's compiled steps; here one small checkpoint, written once into
each bucket (the `ckpts` fixture), is scored from the bucket into the bucket and compared
with the same photos scored from local disk; a damaged checkpoint falls back in the bucket,
a held workdir is refused, a .pkl in the bucket is converted, a prepared data set is staged
from the bucket, and a missing bucket is one line.
"""

from __future__ import annotations

import csv
import io
import json
import logging as std_logging
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import data_fixtures
from mobileiqa_jax import storage
from mobileiqa_jax.models import mobileiqa
from mobileiqa_jax.training import checkpointer
from mobileiqa_jax.training import trainer
from mobileiqa_jax.training import workdir_lock
from mobileiqa_jax.weights import checkpoint
import support
from support import REPO, SMALLEST, run_launcher, tiny_config

GS, S3 = "gs://mobileiqa-test", "s3://mobileiqa-test"
LIVEC = data_fixtures.LIVEC_IMAGES
PHOTO_NAMES = ("1000.JPG", "1001.JPG", "1002.JPG")

pytestmark = pytest.mark.usefixtures("bucket_servers")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, bucket_servers):
  """A small random student saved locally and into both buckets; the photos likewise.

  test_distributed_scoring's model (its scoring programs are in the persistent cache).
  """
  del bucket_servers
  tmp = tmp_path_factory.mktemp("buckets")
  config = mobileiqa.model_config(
      "student", backbone="mobilenetv3_small_050", num_mals=1, width=16, pooled_size=6,
      regressor_pool=2, backbone_kwargs={"depth_multiplier": 0.1})
  variables = support.random_variables(mobileiqa.build_model(config), (32, 32))
  out = {"tmp": tmp, "photos": str(tmp / "photos"), "variables": variables}
  os.makedirs(out["photos"])
  for name, where in (("local", str(tmp / "ckpt")), ("gs", f"{GS}/ckpt"), ("s3", f"{S3}/ckpt")):
    out[name] = checkpoint.save_model(where, variables, config.to_dict(),
                                      extra={"image_size": [32, 32]})
  for name in PHOTO_NAMES:
    data = open(os.path.join(LIVEC, name), "rb").read()
    with open(os.path.join(out["photos"], name), "wb") as f:
      f.write(data)
    for bucket in (GS, S3):
      storage.write_atomic(f"{bucket}/photos/{name}", data)
  return out


def _assert_trees_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if ": error: " in line]


def _scores(text):
  rows = list(csv.reader(io.StringIO(text)))
  assert rows[0] == ["path", "score"], rows[:1]
  return {os.path.basename(r[0]): float(r[1]) for r in rows[1:]}


# ----------------------------------------------------------------------------- checkpoints, lock


def test_a_truncated_latest_step_in_the_bucket_falls_back(caplog):
  import optax  # pylint: disable=g-import-not-at-top
  workdir = f"{GS}/runs/damaged"
  tx = optax.adam(1e-3)
  ck = checkpointer.TrainCheckpointer(workdir, keep=5, async_save=False)
  saved = {}
  for step in (10, 20):
    w = np.random.default_rng(step).random(1000).astype(np.float32)
    v = {"params": {"w": w}, "batch_stats": {}}
    ck.save(step, v, tx.init(v["params"]), {"model_config": {"name": "toy"}}, {"step": step})
    saved[step] = w
  ck.close()
  latest = f"{workdir}/checkpoints/20"
  sizes = storage.file_sizes(latest)
  largest = max(sizes, key=sizes.get)
  data = storage.read_bytes(f"{latest}/{largest}")
  storage.write_atomic(f"{latest}/{largest}", data[:len(data) // 2])  # truncated in place
  target_w = jax.ShapeDtypeStruct((1000,), np.float32,
                                  sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  target = {"params": {"w": target_w}, "batch_stats": {}}
  ck = checkpointer.TrainCheckpointer(workdir, keep=5, async_save=False)
  with caplog.at_level(std_logging.WARNING):
    step, variables, _, _ = ck.restore_latest_good(target, jax.eval_shape(tx.init,
                                                                          target["params"]))
  ck.close()
  assert step == 10
  np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), saved[10])
  assert any("step 20" in r.getMessage() and "resuming from step 10" in r.getMessage()
             for r in caplog.records), caplog.text
  # Set aside in the bucket (a copy and a delete, the step's markers moved last).
  assert checkpoint.list_steps(f"{workdir}/checkpoints") == [10]
  moved = storage.listdir(f"{workdir}/damaged_checkpoints/20")
  assert "variables" in moved and checkpoint.COMMIT_MARKER in moved, moved


def test_a_second_trainer_on_a_held_gs_workdir_is_refused_in_one_line():
  workdir = f"{GS}/runs/held"
  lock = workdir_lock.WorkdirLock(workdir).acquire()
  try:
    proc = run_launcher("launch/train.py", ["--config=configs/teacher.py:demo",
                                            f"--workdir={workdir}"])
    again = workdir_lock.WorkdirLock(workdir)
    with pytest.raises(workdir_lock.WorkdirLockedError):
      again.acquire()
  finally:
    lock.release()
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not storage.exists(workdir)  # nothing written; the lock went with its holder


def test_a_stale_lock_in_gs_is_taken_over_once(caplog):
  """A dead holder's lock object: one taker replaces it (through the create-only token)."""
  workdir = f"{GS}/runs/stale"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = {"host": socket.gethostname(), "pid": dead.pid, "started": time.time(),
           "boot_id": workdir_lock._boot_id()}  # pylint: disable=protected-access
  storage.write_atomic(f"{workdir}/{workdir_lock.LOCK_NAME}", json.dumps(stale))
  with caplog.at_level(std_logging.WARNING):
    first = workdir_lock.WorkdirLock(workdir).acquire()
  try:
    assert any("gone" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir_lock.WorkdirLock(workdir).acquire()  # the new holder is alive: refused
  finally:
    first.release()
  assert storage.listdir(workdir) == [] if storage.isdir(workdir) else True


@pytest.mark.parametrize("bucket", [GS, S3], ids=["gs", "s3"])
def test_another_hosts_fresh_lock_in_a_bucket_is_refused(bucket):
  """The heartbeat is the object's upload time: a lock just written by another host is live."""
  workdir = f"{bucket}/runs/other_host"
  storage.write_atomic(f"{workdir}/{workdir_lock.LOCK_NAME}", json.dumps(
      {"host": "some-other-host", "pid": 12345, "started": time.time(), "boot_id": "other"}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host some-other-host pid 12345"):
    workdir_lock.WorkdirLock(workdir, stale_after_s=60).acquire()
  age = time.time() - storage.mtime_ns(f"{workdir}/{workdir_lock.LOCK_NAME}") / 1e9
  assert -60 < age < 60, age
  storage.rmtree(workdir)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_predict_from_the_bucket_into_the_bucket_equals_local(ckpts, scheme):
  bucket = GS if scheme == "gs" else S3
  local = run_launcher("launch/predict.py", [f"--checkpoint={ckpts['local']}", "--noprogress",
                                             ckpts["photos"]])
  assert local.returncode == 0, local.stderr[-3000:]
  out = f"{bucket}/scores/student.csv"
  remote = run_launcher("launch/predict.py", [f"--checkpoint={ckpts[scheme]}", "--noprogress",
                                              f"--output={out}", f"{bucket}/photos/"])
  assert remote.returncode == 0, remote.stderr[-3000:]
  text = storage.read_text(out)
  assert _scores(text) == _scores(local.stdout) and sorted(_scores(text)) == sorted(PHOTO_NAMES)
  assert [r[0] for r in csv.reader(io.StringIO(text))][1:] == [
      f"{bucket}/photos/{n}" for n in PHOTO_NAMES]


def test_load_from_gs_scores_as_predict(ckpts):
  import mobileiqa_jax  # pylint: disable=g-import-not-at-top
  # The form predict scores 3 photos in.
  scorer = mobileiqa_jax.load(ckpts["gs"], attention="reference")
  assert scorer.source == ckpts["gs"]
  scores = scorer.score([f"{GS}/photos/{n}" for n in PHOTO_NAMES])
  local = run_launcher("launch/predict.py", [f"--checkpoint={ckpts['local']}", "--noprogress",
                                             ckpts["photos"]])
  want = _scores(local.stdout)
  np.testing.assert_allclose(scores, [want[n] for n in PHOTO_NAMES], atol=1e-6)


def test_explain_writes_its_figures_into_gs(ckpts):
  out = f"{GS}/explain"
  proc = run_launcher("launch/explain.py", [f"--checkpoint={ckpts['gs']}", f"--output={out}",
                                            "--noprogress", f"{GS}/photos/{PHOTO_NAMES[0]}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = storage.listdir(out)
  assert "similarity.json" in names and "0000_1000.png" in names, names
  assert storage.read_bytes(f"{out}/0000_1000.png")[:4] == b"\x89PNG"
  assert json.loads(storage.read_text(f"{out}/similarity.json"))["images"][0]["path"] == (
      f"{GS}/photos/{PHOTO_NAMES[0]}")


def test_convert_a_pkl_that_sits_in_gs():
  torch = pytest.importorskip("torch")
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import convert  # pylint: disable=g-import-not-at-top
  config = mobileiqa.model_config("student", pooled_size=8, width=32)
  variables = support.random_variables(mobileiqa.build_model(config))
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in convert.flax_to_torch(variables).items()}, buffer)
  pkl = f"{GS}/weights/MobileNet_IQA.pkl"
  storage.write_atomic(pkl, buffer.getvalue())
  out = f"{GS}/weights/student"
  proc = run_launcher("launch/convert.py", [f"--torch_checkpoint={pkl}", f"--output={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded, meta = checkpoint.load_variables(out)
  assert meta["extra"]["source"] == pkl
  _assert_trees_close(loaded["params"], variables["params"])


def test_a_missing_bucket_is_one_line_naming_it(ckpts):
  for args in (["launch/predict.py", "--checkpoint=gs://no-such-bucket/teacher", ckpts["photos"]],
               ["launch/predict.py", f"--checkpoint={ckpts['gs']}",
                "s3://no-such-bucket/photos/"],
               ["launch/train.py", "--config=configs/teacher.py:demo",
                "--workdir=gs://no-such-bucket/runs/x"]):
    proc = run_launcher(args[0], args[1:])
    errors = _error_lines(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "no-such-bucket" in errors[0] and "does not exist" in errors[0], errors
    assert "Traceback" not in proc.stderr
  proc = run_launcher("launch/predict.py", [f"--checkpoint={GS}/no/such/run", ckpts["photos"]])
  errors = _error_lines(proc.stderr)
  assert proc.returncode == 1 and len(errors) == 1 and f"{GS}/no/such/run" in errors[0], (
      proc.stderr[-3000:])


def test_refused_credentials_are_one_line_naming_the_bucket():
  class HttpError(Exception):  # what gcsfs raises for a 403
    code = 403
  HttpError.__module__ = "gcsfs.retry"
  problem = storage.bucket_problem(f"{GS}/runs/x", HttpError("Forbidden"))
  assert problem is not None and str(problem).startswith(f"{GS}: access refused")
  assert "GOOGLE_APPLICATION_CREDENTIALS" in str(problem)
  assert "credentials" in storage.client_error(HttpError("Forbidden"))
  assert storage.client_error(ValueError("x")) is None


# ----------------------------------------------------------------------------- data


def test_data_prepared_into_gs_is_staged_then_read(tmp_path):
  from mobileiqa_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  (tmp_path / "release").mkdir()
  labels = data_fixtures.make_folder(tmp_path / "release", n=6)
  data_dir = f"{GS}/tensorflow_datasets"
  proc = run_launcher("launch/prepare_data.py", [
      "--dataset=iqa_folder", f"--manual_dir={tmp_path / 'release'}", "--config_name=mine",
      f"--data_dir={data_dir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Training refuses the bucket before it writes anything, naming the lever.
  c = tiny_config("teacher", **SMALLEST)
  c.data.name, c.data.data_dir = "iqa_folder/mine", data_dir
  with pytest.raises(pipeline.BucketDataError, match="--stage_to="):
    trainer.train_and_evaluate(c, str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")
  staged = tmp_path / "tfds"
  proc = run_launcher("launch/prepare_data.py", [
      "--dataset=iqa_folder", "--config_name=mine", f"--data_dir={data_dir}",
      f"--stage_to={staged}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"--config.data.data_dir={staged}" in proc.stdout
  source = pipeline.tfds_source("iqa_folder/mine", "train", str(staged))
  test = pipeline.tfds_source("iqa_folder/mine", "test", str(staged))
  assert len(source) + len(test) == len(labels)
  del datasets


def test_no_local_gs_or_s3_folder_appears():
  for folder in (REPO, os.getcwd()):
    for name in ("gs:", "s3:"):
      assert not os.path.exists(os.path.join(folder, name)), (folder, name)
