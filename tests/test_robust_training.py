"""Training that survives what clusters do: one writer per workdir, damaged checkpoints that
fall back, a full disk and divergence as one line, kill -9 that stays exact, a readable log.

Most tests work on the lock, the checkpointer and the log filter directly (no model, no
compile: seconds). The subprocess trainings are marked slow.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from mobileiqa_jax.training import checkpointer
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.weights import integrity
from mobileiqa_jax.commands import errors as errors_lib
from mobileiqa_jax.training import metric_writer
from mobileiqa_jax.training import workdir_lock
from support import REPO, free_port, python_env, run_peers



def _launch(args, timeout=600, **kwargs):
  env = python_env()
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout, **kwargs)


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if ": error: " in line]


def _write_lock(workdir, pid, host=None, age_s=0.0):
  """A lock file as another holder leaves it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lock.LOCK_NAME)
  with open(path, "w") as f:
    json.dump({"host": host or socket.gethostname(), "pid": pid, "started": time.time(),
               "boot_id": workdir_lock._boot_id() if host is None else "other"}, f)
  if age_s:
    t = time.time() - age_s
    os.utime(path, (t, t))
  return path


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# ----------------------------------------------------------------------------- one writer


def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as err:
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert f"host {socket.gethostname()} pid {os.getpid()}" in str(err.value)
    assert "--workdir" in str(err.value)
  finally:
    first.release()
  assert not os.path.exists(first.path)  # released: the next run may start
  workdir_lock.WorkdirLock(str(tmp_path)).acquire().release()


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = _dead_pid()
  _write_lock(str(tmp_path), pid)
  with caplog.at_level(std_logging.WARNING):
    lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  try:
    assert any(f"pid {pid}" in r.getMessage() and "gone" in r.getMessage()
               for r in caplog.records), caplog.text
    with open(lock.path) as f:
      assert json.load(f)["pid"] == os.getpid()
  finally:
    lock.release()


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_stopped(tmp_path):
  _write_lock(str(tmp_path), 12345, host="some-other-host")
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host some-other-host pid 12345"):
    workdir_lock.WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
  _write_lock(str(tmp_path), 12345, host="some-other-host", age_s=120)
  workdir_lock.WorkdirLock(str(tmp_path), stale_after_s=60).acquire().release()


def test_the_heartbeat_keeps_a_live_lock_fresh(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05).acquire()
  try:
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert time.time() - os.stat(lock.path).st_mtime < 100
  finally:
    lock.release()


def test_a_second_trainer_exits_before_writing_anything(tmp_path):
  """launch/train.py on a workdir a live run holds: one line naming it, nothing changed."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "10").mkdir(parents=True)
  (workdir / "config.json").write_text('{"first": "run"}\n')
  (workdir / "metrics.jsonl").write_text('{"step": 10, "kind": "train", "loss": 1.0}\n')
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
  try:
    _write_lock(str(workdir), holder.pid)
    before = {p: open(os.path.join(workdir, p), "rb").read()
              for p in ("config.json", "metrics.jsonl", workdir_lock.LOCK_NAME)}
    proc = _launch(["launch/train.py", "--config=configs/teacher.py:demo",
                    f"--workdir={workdir}"], timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1 and f"pid {holder.pid}" in errors[0], proc.stderr
  assert socket.gethostname() in errors[0]
  for p, data in before.items():
    assert open(os.path.join(workdir, p), "rb").read() == data, p
  assert sorted(os.listdir(workdir)) == sorted(["checkpoints", *before])
  assert os.listdir(workdir / "checkpoints") == ["10"]


# ----------------------------------------------------------------------------- damaged checkpoints


def _save_steps(workdir, steps, size=1000, async_save=False):
  tx = optax.adam(1e-3)
  ck = checkpointer.TrainCheckpointer(str(workdir), keep=5, async_save=async_save)
  saved = {}
  for step in steps:
    w = np.random.default_rng(step).random(size).astype(np.float32)
    v = {"params": {"w": w}, "batch_stats": {}}
    ck.save(step, v, tx.init(v["params"]), {"model_config": {"name": "toy"}}, {"step": step})
    saved[step] = w
  ck.close()
  return saved


def _largest_file(path):
  files = [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]
  return max(files, key=os.path.getsize)


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _targets():
  tx = optax.adam(1e-3)
  w = jax.ShapeDtypeStruct((1000,), np.float32,
                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  v = {"params": {"w": w}, "batch_stats": {}}
  return v, jax.eval_shape(tx.init, v["params"])


@pytest.mark.parametrize("sealed", [True, False], ids=["checksums", "no_checksums"])
def test_resume_falls_back_from_a_truncated_latest_step(tmp_path, caplog, sealed):
  saved = _save_steps(tmp_path, [10, 20])
  latest = os.path.join(tmp_path, "checkpoints", "20")
  assert integrity.is_sealed(latest)
  if not sealed:  # a step killed between orbax's commit and the seal: found by the restore
    os.remove(os.path.join(latest, integrity.MANIFEST))
  _truncate(_largest_file(latest))
  ck = checkpointer.TrainCheckpointer(str(tmp_path), keep=5, async_save=False)
  with caplog.at_level(std_logging.WARNING):
    step, variables, _, train = ck.restore_latest_good(*_targets())
  ck.close()
  assert step == 10 and train["step"] == 10
  np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), saved[10])
  warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  assert len(warnings) == 1 and "step 20" in warnings[0] and "resuming from step 10" in (
      warnings[0]), caplog.text
  # Kept for inspection, out of orbax's way; the good step is untouched.
  assert checkpoint.list_steps(os.path.join(tmp_path, "checkpoints")) == [10]
  assert os.path.isdir(os.path.join(tmp_path, "damaged_checkpoints", "20", "variables"))


def test_an_intact_step_that_does_not_fit_the_target_is_an_error_not_damage(tmp_path):
  _save_steps(tmp_path, [10, 20])
  ck = checkpointer.TrainCheckpointer(str(tmp_path), keep=5, async_save=False)
  variables, opt = _targets()
  wrong = {"params": {"w": jax.ShapeDtypeStruct((7,), np.float32,
                                                 sharding=variables["params"]["w"].sharding)},
           "batch_stats": {}}
  with pytest.raises(Exception) as err:
    ck.restore_latest_good(wrong, opt)
  ck.close()
  assert not isinstance(err.value, checkpoint.CheckpointDamagedError)
  assert checkpoint.list_steps(os.path.join(tmp_path, "checkpoints")) == [10, 20]
  assert not os.path.exists(os.path.join(tmp_path, "damaged_checkpoints"))


def test_reading_a_damaged_checkpoint_names_the_file(tmp_path):
  path = checkpoint.save_model(str(tmp_path / "m"), {"params": {"w": np.ones(500, np.float32)}},
                               {"name": "toy"})
  victim = _largest_file(os.path.join(path, "variables"))
  _truncate(victim)
  with pytest.raises(checkpoint.CheckpointDamagedError, match="truncated") as err:
    checkpoint.load_variables(path)
  assert victim in str(err.value)
  path = checkpoint.save_model(str(tmp_path / "m2"), {"params": {"w": np.ones(500, np.float32)}},
                               {"name": "toy"})
  victim = _largest_file(os.path.join(path, "variables"))
  with open(victim, "r+b") as f:  # the same size, other bytes
    first = f.read(1)
    f.seek(0)
    f.write(bytes([first[0] ^ 0xFF]))
  with pytest.raises(checkpoint.CheckpointDamagedError, match="does not match its checksum"):
    checkpoint.load_variables(path)


def test_scoring_needs_only_the_weights_to_be_intact(tmp_path):
  saved = _save_steps(tmp_path, [10])
  step = os.path.join(tmp_path, "checkpoints", "10")
  _truncate(_largest_file(os.path.join(step, "opt_state")))
  variables, _ = checkpoint.load_variables(step)  # predict, evaluate, export read these
  np.testing.assert_array_equal(variables["params"]["w"], saved[10])
  with pytest.raises(checkpoint.CheckpointDamagedError, match="opt_state"):
    integrity.verify(step)  # a resume needs the optimizer state too


def test_predict_on_a_damaged_checkpoint_is_one_line(tmp_path):
  _save_steps(tmp_path / "run", [10])
  sealed = os.path.join(tmp_path, "run", "checkpoints", "10")
  unsealed = str(tmp_path / "unsealed")
  shutil.copytree(sealed, unsealed)
  os.remove(os.path.join(unsealed, integrity.MANIFEST))
  for path in (sealed, unsealed):
    _truncate(_largest_file(path))
  # A readable photo of the test's own, so only the checkpoint can be at fault.
  photo = str(tmp_path / "photo.png")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(photo)
  for path, expected in ((sealed, _largest_file(sealed)), (unsealed, unsealed)):
    proc = _launch(["launch/predict.py", f"--checkpoint={path}", photo], timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], proc.stderr
    assert "is damaged" in lines[0] and expected in lines[0], lines[0]


# ----------------------------------------------------------------------------- a full disk


def _state(size, seed=0):
  w = np.random.default_rng(seed).random(size).astype(np.float32)  # random: no compression
  v = {"params": {"w": w}, "batch_stats": {}}
  return v, optax.sgd(1e-3).init(v["params"])


def test_a_save_that_cannot_fit_is_refused_and_earlier_steps_stay(tmp_path, monkeypatch):
  ck = checkpointer.TrainCheckpointer(str(tmp_path), keep=5, async_save=False)
  v, opt = _state(1000)
  ck.save(1, v, opt, {"model_config": {}}, {"step": 1})
  monkeypatch.setattr(checkpointer.shutil, "disk_usage",
                      lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
  with pytest.raises(checkpointer.CheckpointDiskFullError) as err:
    ck.save(2, v, opt, {"model_config": {}}, {"step": 2})
  message = errors_lib._message(err.value)
  assert message.startswith(str(tmp_path)) and "100 are free" in message
  assert "step 1 is the newest checkpoint" in message and "bytes" in message
  ck.close()
  assert checkpoint.list_steps(ck.directory) == [1]
  checkpoint.load_variables(os.path.join(ck.directory, "1"))


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 2 MB tmpfs, where this process may mount one."""
  mnt = tmp_path / "tmpfs"
  mnt.mkdir()
  if shutil.which("mount") is None or os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root and mount(8)")
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
  yield str(mnt)
  subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_save_is_one_error(small_tmpfs, monkeypatch, async_save):
  """The disk fills inside orbax's write (the free-space check is fooled)."""
  ck = checkpointer.TrainCheckpointer(small_tmpfs, keep=5, async_save=async_save)
  v, opt = _state(300_000)  # 1.2 MB: the second does not fit in 2 MB
  ck.save(1, v, opt, {"model_config": {}}, {"step": 1})
  ck.wait()
  monkeypatch.setattr(checkpointer.shutil, "disk_usage",
                      lambda _: shutil._ntuple_diskusage(10**12, 0, 10**12))
  with pytest.raises(checkpointer.CheckpointDiskFullError, match="out of disk space saving "
                     "checkpoint step 2"):
    ck.save(2, v, opt, {"model_config": {}}, {"step": 2})
    ck.wait()
  ck.close()
  assert checkpoint.list_steps(ck.directory) == [1]
  variables, _ = checkpoint.load_variables(os.path.join(ck.directory, "1"))
  np.testing.assert_array_equal(variables["params"]["w"], v["params"]["w"])
  assert os.listdir(ck.directory) == ["1"]  # the half-written step is gone, space is free


# ----------------------------------------------------------------------------- the log


def _record(pathname, level, exc_info=None):
  return std_logging.LogRecord("absl", level, pathname, 1, "message", None, exc_info)


def test_the_training_log_keeps_the_projects_lines_only():
  # The filter the train command installs, with the folders it computes itself: every
  # subpackage's records (the trainer's log is the run's record) and launch/'s pass.
  only = errors_lib.project_logs_only()
  package = os.path.dirname(os.path.dirname(checkpoint.__file__))
  for sub in ("training/trainer.py", "weights/convert.py", "data/pipeline.py"):
    assert only.filter(_record(os.path.join(package, sub), std_logging.INFO)), sub
  orbax = os.path.join(os.path.dirname(optax.__file__), "..", "orbax", "checkpoint",
                       "checkpoint_manager.py")
  assert only.filter(_record(os.path.join(package, "train.py"), std_logging.INFO))
  assert only.filter(_record(os.path.join(REPO, "launch", "train.py"), std_logging.INFO))
  assert not only.filter(_record(orbax, std_logging.INFO))
  assert only.filter(_record(orbax, std_logging.WARNING))
  try:
    raise ValueError("RESOURCE_EXHAUSTED")
  except ValueError:
    assert not only.filter(_record(orbax, std_logging.ERROR, sys.exc_info()))


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
  w = metric_writer.MetricWriter(str(tmp_path))
  for s in range(1, 6):
    w.write(s, {"loss": float(s)}, "train")
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "kind": "tr')  # torn by a kill -9
  w = metric_writer.MetricWriter(str(tmp_path))
  w.rewind(3)
  w.write(4, {"loss": 4.0}, "train")
  w.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- end to end (slow)

TINY = ["--config=configs/teacher.py:demo", "--config.model.backbone=mobilenetv3_small_050",
        "--config.depthwise_impl=conv", "--config.data.image_size=(32,32)",
        "--config.data.train_crop=(0,0)", "--config.model.width=16",
        "--config.model.pooled_size=6", "--config.model.regressor_pool=2",
        "--config.batch_size=8", "--config.data.eval_batch_size=8",
        "--config.progress_bar=False", "--config.scatter_plot=False"]


@pytest.mark.slow
def test_cli_log_is_the_projects_and_divergence_is_one_line(tmp_path):
  proc = _launch(["launch/train.py", *TINY, f"--workdir={tmp_path / 'ok'}",
                  "--config.max_steps=4", "--config.checkpoint.every_steps=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert not [l for l in lines if "orbax" in l.lower() or "checkpoint_manager" in l], proc.stderr
  assert [l for l in lines if "checkpoint step 2 ->" in l], proc.stderr
  # --verbose brings the libraries' lines back (a finished run: restore, final report only).
  proc = _launch(["launch/train.py", *TINY, f"--workdir={tmp_path / 'ok'}",
                  "--config.max_steps=4", "--config.checkpoint.every_steps=2", "--verbose"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint_manager.py" in proc.stderr, proc.stderr[-3000:]
  proc = _launch(["launch/train.py", *TINY, f"--workdir={tmp_path / 'nan'}",
                  "--config.max_steps=6", "--config.optimizer.lr=1e30"])
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1 and "non-finite loss" in errors[0], proc.stderr
  assert "--config.optimizer.lr=1e+29" in errors[0] and (
      "checkpoint" in errors[0]), errors[0]


KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.training import trainer
from mobileiqa_jax.training import train_data
from support import tiny_config, tiny_data

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

c = tiny_config("student", num_epochs=3)
c.checkpoint.async_save = True
workdir = sys.argv[1]
trainer.train_and_evaluate(c, workdir, data=KillAfterTwoCheckpoints(
    tiny_data(c), os.path.join(workdir, "checkpoints")))
"""


@pytest.mark.slow
def test_kill_9_after_two_checkpoints_then_resume_is_exact(tmp_path):
  from mobileiqa_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from support import tiny_config, tiny_data  # pylint: disable=g-import-not-at-top
  c = tiny_config("student", num_epochs=3)
  c.checkpoint.async_save = True
  ref = trainer.train_and_evaluate(c, str(tmp_path / "ref"), data=tiny_data(c))
  workdir = str(tmp_path / "killed")
  proc = _launch(["-c", KILL_SCRIPT, workdir, os.path.join(REPO, "tests")])
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  steps = checkpoint.list_steps(os.path.join(workdir, "checkpoints"))
  assert len(steps) >= 2 and max(steps) < ref["step"], steps
  resumed = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  assert resumed["step"] == ref["step"]
  for a, b in zip(jax.tree.leaves(resumed["final_params"]), jax.tree.leaves(ref["final_params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
  assert resumed["best"]["selection"] == pytest.approx(ref["best"]["selection"])
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  keys = [(r["kind"], r["step"]) for r in rows]
  assert len(keys) == len(set(keys)), keys
  ref_rows = [json.loads(line) for line in open(tmp_path / "ref" / "metrics.jsonl")]
  assert keys == [(r["kind"], r["step"]) for r in ref_rows]
  last = [r for r in rows if r["kind"] == "eval"][-1]
  ref_last = [r for r in ref_rows if r["kind"] == "eval"][-1]
  assert last["selection"] == pytest.approx(ref_last["selection"])


_POD_SCRIPT = r"""
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
workdir, pid, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
from mobileiqa_jax.training import workdir_lock
lock = workdir_lock.acquire_for_job(workdir + "/free", jax.process_index() == 0, 2)
print("FREE", lock is not None, flush=True)
if lock is not None:
  lock.release()
try:
  workdir_lock.acquire_for_job(workdir + "/held", jax.process_index() == 0, 2)
  print("HELD-TAKEN")
except workdir_lock.WorkdirLockedError as e:
  print("REFUSED", e)
"""


def test_on_a_pod_process_0_decides_for_every_process(tmp_path):
  """Two processes: process 0 alone holds the lock; a refusal reaches both, none hangs."""
  port = str(free_port())
  held = workdir_lock.WorkdirLock(str(tmp_path / "held")).acquire()  # a live holder: this test
  try:
    procs = run_peers([[sys.executable, "-c", _POD_SCRIPT, str(tmp_path), str(i), port]
                       for i in range(2)], [python_env()] * 2, tmp_path, timeout=300)
  finally:
    held.release()
  for i, p in enumerate(procs):
    out = p.stdout
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"FREE {i == 0}" in out, out
    refused = [line for line in out.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 1 and f"pid {os.getpid()}" in refused[0], out
