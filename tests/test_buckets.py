"""Runs that live in buckets: gs:// (fake-gcs-server) and s3:// (moto), end to end.

One session's emulators (conftest.bucket_servers) and one small trained workdir (the `runs`
fixture: the tiny teacher trained into gs:// with a SIGTERM half-way and resumed, beside the
same run on local disk) serve every test: training, resume, kill -9, a damaged checkpoint,
a held workdir, distillation from a gs:// teacher, scoring from and into the bucket, the
authors' .pkl converted from the bucket, the same for s3://, and a prepared data set staged
from the bucket. The trainings run in this process with the test_train models' compiled steps
(support.SMALLEST, XLA's optimisations off), so they cost seconds.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging as std_logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import data_fixtures
from mobileiqa_jax import storage
from mobileiqa_jax.training import checkpointer
from mobileiqa_jax.training import metric_writer
from mobileiqa_jax.training import train_data
from mobileiqa_jax.training import trainer
from mobileiqa_jax.training import workdir_lock
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.weights import integrity
import support
from support import REPO, SMALLEST, python_env, run_launcher, tiny_config, tiny_data

GS, S3 = "gs://mobileiqa-test", "s3://mobileiqa-test"
LIVEC = data_fixtures.LIVEC_IMAGES
PHOTO_NAMES = ("1000.JPG", "1001.JPG", "1002.JPG")

pytestmark = pytest.mark.usefixtures("bucket_servers")


@contextlib.contextmanager
def _shared_fast_steps():
  """conftest's shared_train_steps and fast_compile, for a module fixture."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "build_steps", support.memoized_build_steps(trainer.build_steps))
    try:
      yield
    finally:
      jax.config.update("jax_disable_most_optimizations", before)


class _SigtermAt(train_data.Data):
  """Wraps data; sends SIGTERM to this process while batch `at` of the first epoch is in use."""

  def __init__(self, data, at):
    self._data, self._at, self._sent = data, at, False
    self.num_train, self.num_eval = data.num_train, data.num_eval
    self.steps_per_epoch, self.mos_range = data.steps_per_epoch, data.mos_range

  def train_epoch(self, epoch, start=0):
    for i, b in enumerate(self._data.train_epoch(epoch, start), start):
      if not self._sent and i == self._at:
        self._sent = True
        os.kill(os.getpid(), signal.SIGTERM)
      yield b

  def eval_batches(self):
    return self._data.eval_batches()


def _teacher_config(every_steps=100):
  """test_train's SIGTERM test's config (its compiled steps are reused); by default only the
  preemption and epoch-end saves."""
  c = tiny_config("teacher", num_epochs=2, **SMALLEST)
  c.checkpoint.every_steps = every_steps
  return c


def _sigterm_then_resume(workdir, uploads):
  """Trains into `workdir` with a SIGTERM at the second step, then resumes: (first, resumed)."""
  c = _teacher_config()
  first = trainer.train_and_evaluate(c, workdir, data=_SigtermAt(tiny_data(c), at=1))
  resumed = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  return first, resumed, uploads.get(storage.join(workdir, "metrics.jsonl"), 0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bucket_servers):
  """The tiny teacher on local disk, and in gs:// and s3:// preempted (SIGTERM) and resumed."""
  del bucket_servers
  tmp = tmp_path_factory.mktemp("buckets")
  uploads: dict[str, int] = {}
  write_atomic = storage.write_atomic

  def counting(path, data):
    uploads[os.fspath(path)] = uploads.get(os.fspath(path), 0) + 1
    return write_atomic(path, data)

  with _shared_fast_steps(), pytest.MonkeyPatch.context() as mp:
    mp.setattr(storage, "write_atomic", counting)
    c = _teacher_config()
    ref = trainer.train_and_evaluate(c, str(tmp / "ref"), data=tiny_data(c))
    gs = _sigterm_then_resume(f"{GS}/runs/teacher", uploads)
    s3 = _sigterm_then_resume(f"{S3}/runs/teacher", uploads)
  photos = tmp / "photos"
  photos.mkdir()
  for name in PHOTO_NAMES:
    data = open(os.path.join(LIVEC, name), "rb").read()
    (photos / name).write_bytes(data)
    for bucket in (GS, S3):
      storage.write_atomic(f"{bucket}/photos/{name}", data)
  return dict(tmp=tmp, ref=ref, ref_dir=str(tmp / "ref"), gs=gs, s3=s3, photos=str(photos),
              gs_teacher=f"{GS}/runs/teacher", s3_teacher=f"{S3}/runs/teacher")


def _rows(path):
  return [json.loads(line) for line in storage.read_text(path).splitlines()]


def _assert_trees_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if ": error: " in line]


def _scores(text):
  rows = list(csv.reader(io.StringIO(text)))
  assert rows[0] == ["path", "score"], rows[:1]
  return {os.path.basename(r[0]): float(r[1]) for r in rows[1:]}


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_sigterm_then_resume_in_a_bucket_equals_the_local_run(runs, scheme):
  first, resumed, uploads = runs[scheme]
  ref, workdir = runs["ref"], runs[f"{scheme}_teacher"]
  assert first["preempted"] and first["step"] == 2
  assert resumed["step"] == ref["step"] == 6 and not resumed["preempted"]
  _assert_trees_close(resumed["final_params"], ref["final_params"])
  assert resumed["best_eval"]["srocc"] == pytest.approx(ref["best_eval"]["srocc"], abs=1e-6)
  rows = _rows(f"{workdir}/metrics.jsonl")
  ref_rows = _rows(os.path.join(runs["ref_dir"], "metrics.jsonl"))
  assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in ref_rows]
  # No append in a bucket: metrics.jsonl is uploaded at checkpoints and evaluations (one
  # flush each when there are new rows), never once per step.
  train_rows = sum(r["kind"] == "train" for r in rows)
  assert 0 < uploads <= 3 < train_rows, (uploads, train_rows)
  names = storage.listdir(workdir)
  for name in ("config.json", "summary.json", "best_predictions.csv", "checkpoints"):
    assert name in names, names
  assert any(n.startswith("events.out.tfevents") for n in names), names
  assert workdir_lock.LOCK_NAME not in names  # released
  assert checkpoint.list_steps(f"{workdir}/checkpoints") == [3, 6]


def test_the_gs_checkpoints_are_orbaxs_own_and_sealed(runs):
  step = f"{runs['gs_teacher']}/checkpoints/6"
  names = storage.listdir(step)
  assert checkpoint.COMMIT_MARKER in names and integrity.MANIFEST in names, names
  assert integrity.verify(step)


_KILL_SCRIPT = r"""
import os, signal, sys
sys.path[:0] = [sys.argv[2]]
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.training import train_data, trainer
from support import SMALLEST, tiny_config, tiny_data

class KillAfterTwoCheckpoints(train_data.Data):
  def __init__(self, data, root):
    self._data, self._root = data, root
    self.num_train, self.num_eval = data.num_train, data.num_eval
    self.steps_per_epoch, self.mos_range = data.steps_per_epoch, data.mos_range
  def train_epoch(self, epoch, start=0):
    for b in self._data.train_epoch(epoch, start):
      if len(checkpoint.list_steps(self._root)) >= 2:
        os.kill(os.getpid(), signal.SIGKILL)
      yield b
  def eval_batches(self):
    return self._data.eval_batches()

c = tiny_config("teacher", num_epochs=2, **SMALLEST)
c.checkpoint.every_steps = 2
c.checkpoint.async_save = True
workdir = sys.argv[1]
trainer.train_and_evaluate(c, workdir, data=KillAfterTwoCheckpoints(
    tiny_data(c), workdir + "/checkpoints"))
"""


def test_kill_9_in_gs_then_resume_is_exact(runs, tmp_path):
  """A real kill -9: its stale lock is taken over, its rows past the checkpoint re-done."""
  workdir = f"{GS}/runs/killed"
  # The same compiled program as this process's runs (XLA's optimisations off), from the
  # persistent cache.
  proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, workdir, os.path.join(REPO, "tests")],
                        cwd=tmp_path, env=python_env(JAX_DISABLE_MOST_OPTIMIZATIONS="1"),
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert storage.exists(f"{workdir}/{workdir_lock.LOCK_NAME}")  # left by the killed run
  steps = checkpoint.list_steps(f"{workdir}/checkpoints")
  assert len(steps) >= 2 and max(steps) < 6, steps
  with _shared_fast_steps():
    c = _teacher_config(every_steps=2)
    resumed = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  assert resumed["step"] == 6
  _assert_trees_close(resumed["final_params"], runs["ref"]["final_params"])
  keys = [(r["kind"], r["step"]) for r in _rows(f"{workdir}/metrics.jsonl")]
  ref_keys = [(r["kind"], r["step"])
              for r in _rows(os.path.join(runs["ref_dir"], "metrics.jsonl"))]
  assert keys == ref_keys
  assert not os.path.exists(tmp_path / "gs:")


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
  # Set aside in the bucket (a copy and a delete, orbax's commit marker moved last).
  assert checkpoint.list_steps(f"{workdir}/checkpoints") == [10]
  moved = storage.listdir(f"{workdir}/damaged_checkpoints/20")
  assert "variables" in moved and checkpoint.COMMIT_MARKER in moved, moved


def test_a_second_trainer_on_a_held_gs_workdir_is_refused_in_one_line(runs):
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
  del runs


def test_a_stale_lock_in_gs_is_taken_over_once(caplog):
  """A dead holder's lock object: one taker replaces it (through the create-only token)."""
  workdir = f"{GS}/runs/stale"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  import socket  # pylint: disable=g-import-not-at-top
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


# ----------------------------------------------------------------------------- distillation


def test_distil_from_a_gs_teacher_into_gs(runs):
  c = tiny_config("student", num_epochs=1, max_steps=2, **SMALLEST)
  c.teacher_checkpoint = runs["gs_teacher"]
  workdir = f"{GS}/runs/student"
  with _shared_fast_steps():
    summary = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  assert summary["step"] == 2
  rows = [r for r in _rows(f"{workdir}/metrics.jsonl") if r["kind"] == "train"]
  assert len(rows) == 2 and all(np.isfinite(r["loss_x"]) for r in rows)
  _, _, meta = checkpoint.load_model(workdir)
  assert meta["extra"]["distilled_from"] == runs["gs_teacher"]
  assert meta["path"].startswith(f"{workdir}/checkpoints/")


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_predict_from_the_bucket_into_the_bucket_equals_local(runs, scheme):
  bucket = GS if scheme == "gs" else S3
  ckpt = runs[f"{scheme}_teacher"]
  local = run_launcher("launch/predict.py", [f"--checkpoint={ckpt}", "--noprogress",
                                             runs["photos"]])
  assert local.returncode == 0, local.stderr[-3000:]
  out = f"{bucket}/scores/teacher.csv"
  remote = run_launcher("launch/predict.py", [f"--checkpoint={ckpt}", "--noprogress",
                                              f"--output={out}", f"{bucket}/photos/"])
  assert remote.returncode == 0, remote.stderr[-3000:]
  got, want = _scores(storage.read_text(out)), _scores(local.stdout)
  assert got == want and sorted(got) == sorted(PHOTO_NAMES)
  assert all(p.startswith(f"{bucket}/photos/") for p in
             (r[0] for r in csv.reader(io.StringIO(storage.read_text(out))) if r[0] != "path"))
  # The same model trained on local disk scores the same (the runs are equal).
  ref = run_launcher("launch/predict.py", [f"--checkpoint={runs['ref_dir']}", "--noprogress",
                                           runs["photos"]])
  for name, score in _scores(ref.stdout).items():
    assert got[name] == pytest.approx(score, abs=1e-5)


def test_load_from_gs_scores_as_predict(runs):
  import mobileiqa_jax  # pylint: disable=g-import-not-at-top
  scorer = mobileiqa_jax.load(runs["gs_teacher"])
  assert scorer.source.startswith(f"{runs['gs_teacher']}/checkpoints/")
  scores = scorer.score([f"{GS}/photos/{n}" for n in PHOTO_NAMES])
  local = mobileiqa_jax.load(runs["ref_dir"]).score(
      [os.path.join(runs["photos"], n) for n in PHOTO_NAMES])
  np.testing.assert_allclose(scores, local, atol=1e-5)


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


def test_a_missing_bucket_is_one_line_naming_it(runs):
  for args in (["launch/predict.py", "--checkpoint=gs://no-such-bucket/teacher", runs["photos"]],
               ["launch/predict.py", f"--checkpoint={runs['gs_teacher']}",
                "s3://no-such-bucket/photos/"],
               ["launch/train.py", "--config=configs/teacher.py:demo",
                "--workdir=gs://no-such-bucket/runs/x"]):
    proc = run_launcher(args[0], args[1:])
    errors = _error_lines(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "no-such-bucket" in errors[0] and "does not exist" in errors[0], errors
    assert "Traceback" not in proc.stderr
  proc = run_launcher("launch/predict.py", [f"--checkpoint={GS}/no/such/run", runs["photos"]])
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
