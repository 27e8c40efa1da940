"""Training and distillation on tiny settings: a few steps, finite losses, logs, checkpoints,
NaN handling, backbone initialisation, SIGTERM + resume; the same runs in gs:// and s3://
buckets (the emulators of conftest.bucket_servers): SIGTERM + resume, kill -9 + resume and
distillation from a gs:// teacher, each equal to the run on local disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import jax
import numpy as np
import pytest

from mobileiqa_jax import storage
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.weights import integrity
from mobileiqa_jax.training import metric_writer
from mobileiqa_jax.training import trainer
from mobileiqa_jax.training import train_data
from mobileiqa_jax.training import workdir_lock
from support import REPO, SMALLEST, python_env, tiny_config, tiny_data

# Runs of the same model and optimizer share their compiled steps, compiled with XLA's
# optimisations off (see conftest): these tests check the loop's logic, logs and checkpoints,
# and the resumed-equals-uninterrupted comparison runs one program both ways. The models are
# support.SMALLEST (every part of the model, fewest operations): the architecture and its
# parity are the model tests'; here compile time is most of each test's time.
pytestmark = pytest.mark.usefixtures("shared_train_steps", "fast_compile")
# The buckets of conftest.bucket_servers' emulators.
_GS, _S3 = "gs://mobileiqa-test", "s3://mobileiqa-test"


def _read_jsonl(workdir):
  text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines()]


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backbone", [
    "mobilenetv3_small_050",
    # The real teacher backbone family; its compile alone takes minutes on 2 cores.
    pytest.param("mobilevitv2_050", marks=pytest.mark.slow),
])
def test_teacher_trains_logs_and_checkpoints(tmp_path, backbone):
  smallest = SMALLEST if backbone.startswith("mobilenetv3") else {}
  c = tiny_config("teacher", backbone=backbone, num_epochs=1, max_steps=3, **smallest)
  c.scatter_plot = True
  workdir = str(tmp_path / "teacher")
  summary = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  assert summary["step"] == 3 and not summary["preempted"]
  rows = _read_jsonl(workdir)
  train_rows = [r for r in rows if r["kind"] == "train"]
  eval_rows = [r for r in rows if r["kind"] == "eval"]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  for r in train_rows:
    assert np.isfinite(r["loss"]) and np.isfinite(r["images_per_sec"]) and r["lr"] > 0
  assert len(eval_rows) == 1
  for k in ("srocc", "plcc", "krocc", "rmse", "mae", "selection"):
    assert np.isfinite(eval_rows[0][k]), k
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["backbone"] == backbone
  assert os.path.isfile(os.path.join(workdir, "best_scatter.png"))
  assert os.path.isfile(os.path.join(workdir, "best_predictions.csv"))
  # A workdir is a checkpoint for load_model (the predict/convert/student path).
  model, variables, meta = checkpoint.load_model(workdir)
  assert meta["train"]["step"] == 3 and meta["extra"]["image_size"] == [32, 32]
  _assert_trees_close(variables["params"], summary["final_params"])
  # Jitted: eagerly, the forward pass compiles each of its ~400 operations on its own (15 s).
  images = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
  scores = jax.jit(model.apply)(variables, images)
  assert scores.shape == (2,) and np.all(np.isfinite(scores))


def _teacher_checkpoint(tmp_path, directory=None):
  """A random tiny teacher saved as a standalone checkpoint (like launch/convert.py output),
  in `tmp_path`, or in `directory` (e.g. a bucket URL)."""
  t = tiny_config("teacher", **SMALLEST)
  # 3 steps per epoch as the teacher test's data: its steps (and init) are reused.
  steps = trainer.build_steps(t, trainer.sharding.make_mesh(t.mesh), steps_per_epoch=3)
  variables = jax.device_get(steps.init_variables())
  return checkpoint.save_model(directory or str(tmp_path / "teacher_ckpt"), variables,
                               steps.model_config.to_dict(), extra={"image_size": [32, 32]})


@pytest.mark.parametrize("where", ["local", "gs"])
def test_distillation_logs_three_terms_and_monitor(tmp_path, request, where):
  c = tiny_config("student", num_epochs=1, max_steps=2, **SMALLEST)
  if where == "local":
    c.teacher_checkpoint = _teacher_checkpoint(tmp_path)
    workdir = str(tmp_path / "student")
  else:  # the teacher in a gs:// bucket, the student's run into it
    request.getfixturevalue("bucket_servers")
    c.teacher_checkpoint = _teacher_checkpoint(tmp_path, f"{_GS}/distil/teacher_ckpt")
    workdir = f"{_GS}/distil/student"
  summary = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  assert summary["step"] == 2
  train_rows = [r for r in _read_jsonl(workdir) if r["kind"] == "train"]
  assert len(train_rows) == 2
  for r in train_rows:
    for k in ("loss", "loss_x", "loss_dof", "loss_score", "monitor_teacher_regressor_mse"):
      assert np.isfinite(r[k]), (k, r)
    np.testing.assert_allclose(r["loss"], r["loss_x"] + r["loss_dof"] + r["loss_score"],
                               rtol=1e-5)
  eval_rows = [r for r in _read_jsonl(workdir) if r["kind"] == "eval"]
  assert np.isfinite(eval_rows[-1]["srocc"])
  # The student's checkpoint names its teacher and never contains it.
  _, variables, meta = checkpoint.load_model(workdir)
  assert meta["extra"]["distilled_from"] == c.teacher_checkpoint
  assert "local_cnn" in variables["params"] and "global_vit" not in variables["params"]
  assert meta["path"].startswith(storage.join(workdir, "checkpoints"))


# The NaN and SIGTERM tests check the loop, not the model: they train the teacher test's model
# (the same config up to loop-only keys), so they run its compiled steps.


def test_nan_loss_stops_naming_the_step_and_keeps_last_good(tmp_path):
  c = tiny_config("teacher", num_epochs=2, **SMALLEST)
  data = tiny_data(c, shuffle=False)
  data.train.source.mos[8:16] = np.nan  # the second batch of epoch 0
  workdir = str(tmp_path / "nan")
  with pytest.raises(metric_writer.NonFiniteLossError, match="at step 2") as err:
    trainer.train_and_evaluate(c, workdir, data=data)
  # The step, that there is nothing to resume from, and the lever.
  assert "No checkpoint yet" in str(err.value), err.value
  assert "--config.optimizer.lr=0.0001 (now 0.001)" in str(err.value), err.value
  # No checkpoint was written after the bad step (every_steps=2 would have saved step 2).
  assert checkpoint.list_steps(os.path.join(workdir, "checkpoints")) == []


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


_REFERENCE: dict[str, Any] = {}


def _reference_run(tmp_path_factory):
  """The uninterrupted tiny teacher run on local disk, trained once for the tests that
  compare an interrupted run with it: (summary, workdir)."""
  if not _REFERENCE:
    c = tiny_config("teacher", num_epochs=2, **SMALLEST)
    workdir = str(tmp_path_factory.mktemp("reference") / "ref")
    _REFERENCE.update(summary=trainer.train_and_evaluate(c, workdir, data=tiny_data(c)),
                      workdir=workdir)
  return _REFERENCE["summary"], _REFERENCE["workdir"]


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path, tmp_path_factory):
  c = tiny_config("teacher", num_epochs=2, **SMALLEST)
  c.checkpoint.every_steps = 100  # only the preemption and epoch-end saves
  ref, _ = _reference_run(tmp_path_factory)
  workdir = str(tmp_path / "pre")
  first = trainer.train_and_evaluate(c, workdir, data=_SigtermAt(tiny_data(c), at=1))
  assert first["preempted"] and first["step"] == 2  # batch 1 is the second step
  assert checkpoint.list_steps(os.path.join(workdir, "checkpoints")) == [2]
  resumed = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  assert resumed["step"] == ref["step"] == 6 and not resumed["preempted"]
  _assert_trees_close(resumed["final_params"], ref["final_params"], rtol=1e-6, atol=1e-8)
  assert resumed["best"]["selection"] == pytest.approx(ref["best"]["selection"])


# ----------------------------------------------------------------------------- in a bucket


@pytest.mark.parametrize("bucket", [_GS, pytest.param(_S3, marks=pytest.mark.slow)],
                         ids=["gs", "s3"])
def test_sigterm_then_resume_in_a_bucket_equals_the_local_run(tmp_path, tmp_path_factory,
                                                               bucket_servers, bucket,
                                                               monkeypatch):
  """The SIGTERM test with its workdir in a bucket; metrics.jsonl is never appended there."""
  del bucket_servers
  uploads = []
  write_atomic = storage.write_atomic

  def counting(path, data):
    uploads.append(os.fspath(path))
    return write_atomic(path, data)
  monkeypatch.setattr(storage, "write_atomic", counting)
  # Only the flush points are counted: no time-based upload on a slow (loaded) host.
  monkeypatch.setattr(metric_writer.MetricWriter, "BUCKET_FLUSH_S", float("inf"))
  c = tiny_config("teacher", num_epochs=2, **SMALLEST)
  c.checkpoint.every_steps = 100  # only the preemption and epoch-end saves
  ref, ref_dir = _reference_run(tmp_path_factory)
  workdir = f"{bucket}/runs/{tmp_path.name}"
  first = trainer.train_and_evaluate(c, workdir, data=_SigtermAt(tiny_data(c), at=1))
  assert first["preempted"] and first["step"] == 2
  assert checkpoint.list_steps(f"{workdir}/checkpoints") == [2]
  assert not storage.exists(f"{workdir}/{workdir_lock.LOCK_NAME}")  # released on preemption
  resumed = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  assert resumed["step"] == ref["step"] == 6 and not resumed["preempted"]
  _assert_trees_close(resumed["final_params"], ref["final_params"], rtol=1e-6, atol=1e-8)
  assert resumed["best_eval"]["srocc"] == pytest.approx(ref["best_eval"]["srocc"], abs=1e-6)
  rows = _read_jsonl(workdir)
  assert [(r["kind"], r["step"]) for r in rows] == [
      (r["kind"], r["step"]) for r in _read_jsonl(ref_dir)]
  # No append in a bucket: metrics.jsonl is uploaded whole at checkpoints and evaluations
  # that follow new rows (here 3 times), never once per step.
  metric_uploads = uploads.count(f"{workdir}/metrics.jsonl")
  assert 0 < metric_uploads <= 3 < sum(r["kind"] == "train" for r in rows), metric_uploads
  names = storage.listdir(workdir)
  for name in ("config.json", "summary.json", "best_predictions.csv", "checkpoints"):
    assert name in names, names
  assert any(n.startswith("events.out.tfevents") for n in names), names
  assert checkpoint.list_steps(f"{workdir}/checkpoints") == [3, 6]
  if bucket == _GS:  # orbax wrote the bucket itself: its commit marker, then our checksums
    step = f"{workdir}/checkpoints/6"
    assert checkpoint.COMMIT_MARKER in storage.listdir(step) and integrity.verify(step)


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
trainer.train_and_evaluate(c, sys.argv[1], data=KillAfterTwoCheckpoints(
    tiny_data(c), sys.argv[1] + "/checkpoints"))
"""


@pytest.mark.slow  # test_buckets takes over a stale lock in gs; the local kill -9 test is slow too
def test_kill_9_in_gs_then_resume_is_exact(tmp_path, tmp_path_factory, bucket_servers):
  """A real kill -9 of a run in gs://: its stale lock is taken over, its rows past the last
  checkpoint are re-done, and the resumed run equals the uninterrupted one."""
  del bucket_servers
  workdir = f"{_GS}/runs/killed"
  # The subprocess compiles the same program as this file's runs (XLA's optimisations off):
  # the persistent compilation cache has it. It runs in a fresh folder: no `gs:` folder.
  proc = subprocess.run(
      [sys.executable, "-c", _KILL_SCRIPT, workdir, os.path.join(REPO, "tests")],
      cwd=tmp_path, env=python_env(JAX_DISABLE_MOST_OPTIMIZATIONS="1"), capture_output=True,
      text=True, timeout=600, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert storage.exists(f"{workdir}/{workdir_lock.LOCK_NAME}")  # left by the killed run
  steps = checkpoint.list_steps(f"{workdir}/checkpoints")
  assert len(steps) >= 2 and max(steps) < 6, steps
  c = tiny_config("teacher", num_epochs=2, **SMALLEST)
  c.checkpoint.every_steps = 2
  # How often a run saves does not change its numbers: the reference saves at epoch ends.
  ref, ref_dir = _reference_run(tmp_path_factory)
  resumed = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  assert resumed["step"] == ref["step"] == 6
  _assert_trees_close(resumed["final_params"], ref["final_params"], rtol=1e-6, atol=1e-8)
  assert [(r["kind"], r["step"]) for r in _read_jsonl(workdir)] == [
      (r["kind"], r["step"]) for r in _read_jsonl(ref_dir)]
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(os.path.join(REPO, "gs:"))


def test_backbone_init_from_mocked_hub(tmp_path, monkeypatch):
  """config.init.backbone as a timm hub name: the download is mocked to a local file.

  The model has backbone_kwargs (SMALLEST's depth multiplier): the file is read into that
  backbone, not the name's default one.
  """
  timm = pytest.importorskip("timm")
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  # SMALLEST in both: timm's builder takes the same depth multiplier as ours.
  net = timm.create_model("mobilenetv3_small_050", pretrained=False,
                          **SMALLEST["model.backbone_kwargs"])
  path = str(tmp_path / "model.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
  calls = []

  def fake_download(repo_id, filename, **kwargs):
    calls.append((repo_id, filename))
    return path
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
  c = tiny_config("student", **SMALLEST)
  c.init.backbone = "mobilenetv3_small_050.lamb_in1k"
  steps = trainer.build_steps(c, trainer.sharding.make_mesh(c.mesh), steps_per_epoch=1)
  variables = jax.device_get(steps.init_variables())
  assert calls == [("timm/mobilenetv3_small_050.lamb_in1k", "model.safetensors")]
  want = net.state_dict()["conv_stem.weight"].numpy().transpose(2, 3, 1, 0)
  stem = [v for k, v in _flat(variables["params"]["local_cnn"]).items()
          if "stem" in k and v.shape == want.shape]
  assert stem and any(np.allclose(s, want) for s in stem)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out
