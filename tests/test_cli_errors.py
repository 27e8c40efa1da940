"""Every command in launch/: a user's mistake is one line on stderr, a non-zero exit, no traceback.

Also what must not be lost: convert refuses an existing checkpoint without --overwrite, and
train refuses to resume a workdir's checkpoints with a different config, before writing.

One module fixture runs every command: one case per launcher as a real subprocess (two at a
time), for the exit status and stderr of a fresh interpreter (no traceback, no library log
lines); the others in this process through the launcher's `__main__` (support.run_launcher:
the same code path from flag parsing to SystemExit, without an interpreter start each).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys

import numpy as np
import pytest

import data_fixtures

from mobileiqa_jax.training import checkpointer
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.models import mobileiqa
from support import REPO, run_launcher, run_python as _launch

LIVEC = data_fixtures.LIVEC_IMAGES
PHOTO = os.path.join(LIVEC, "1000.JPG")
DEMO = "configs/teacher.py:demo"


def _fake_train_workdir(path, width):
  """A workdir as a run leaves it: config.json and a (content-free) finished checkpoint."""
  sys.path.insert(0, REPO)
  from configs import teacher  # pylint: disable=g-import-not-at-top
  c = teacher.get_config("demo")
  c.model.width = width
  os.makedirs(os.path.join(path, "checkpoints", "120", "variables"))
  os.makedirs(os.path.join(path, "checkpoints", "120", "meta"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(c.to_dict(), f, indent=2, sort_keys=True)
  return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  (tmp / "empty").mkdir()
  (tmp / "no_images").mkdir()
  (tmp / "no_images" / "labels.csv").write_text("image_name,mos\n")
  (tmp / "a_file").write_text("not a folder")
  # A checkpoint whose model config builds (its weights are never used by these commands).
  config = mobileiqa.model_config("student", pooled_size=8, width=32).to_dict()
  ckpt = checkpoint.save_model(str(tmp / "ckpt"), {"params": {"x": np.ones(3, np.float32)}},
                               config, extra={"image_size": [64, 64]})
  resume = _fake_train_workdir(str(tmp / "resume"), width=32)
  with open(os.path.join(resume, "config.json"), "rb") as f:
    resume_config = f.read()
  teacher_pkl = None
  try:
    import torch  # pylint: disable=g-import-not-at-top
    teacher_pkl = str(tmp / "MobileViT_IQA.pkl")
    torch.save({"global_vit.stem.conv.weight": torch.zeros(3), "LGF1.cnn1.weight":
                torch.zeros(3)}, teacher_pkl)
  except ImportError:
    pass

  cases = {
      "predict_missing_path": (["launch/predict.py", f"--checkpoint={ckpt}",
                                str(tmp / "nope.jpg")], "nope.jpg"),
      "predict_bad_image_size": (["launch/predict.py", f"--checkpoint={ckpt}",
                                  "--image_size=abc", PHOTO], "--image_size"),
      "predict_bad_flag_value": (["launch/predict.py", f"--checkpoint={ckpt}",
                                  "--batch_size=many", PHOTO], "--batch_size"),
      "predict_not_a_checkpoint": (["launch/predict.py", f"--checkpoint={tmp / 'empty'}",
                                    PHOTO], "no checkpoint at"),
      "predict_folder_without_images": (["launch/predict.py", f"--checkpoint={ckpt}",
                                         str(tmp / "no_images")], "holds no image files"),
      "convert_missing_file": (["launch/convert.py", f"--torch_checkpoint={tmp / 'x.pkl'}",
                                f"--output={tmp / 'out'}"], "x.pkl"),
      "convert_refuses_to_overwrite": (["launch/convert.py", f"--torch_checkpoint={tmp / 'x.pkl'}",
                                        f"--output={ckpt}"], "--overwrite"),
      "export_bad_quantize": (["launch/export.py", f"--checkpoint={ckpt}",
                               f"--output={tmp / 'm.tflite'}", "--quantize=int3"], "--quantize"),
      "export_missing_checkpoint": (["launch/export.py", f"--checkpoint={tmp / 'nope'}",
                                     f"--output={tmp / 'm.tflite'}"], "nope"),
      "explain_refuses_a_full_output": (["launch/explain.py", f"--checkpoint={ckpt}",
                                         f"--output={ckpt}", PHOTO], "--overwrite"),
      "evaluate_not_a_checkpoint": (["launch/evaluate.py", f"--checkpoint={tmp / 'empty'}",
                                     f"--config={DEMO}"], "no checkpoint at"),
      "evaluate_data_not_prepared": (["launch/evaluate.py", f"--checkpoint={ckpt}",
                                      "--config=configs/student.py:livec",
                                      f"--config.data.data_dir={tmp / 'empty'}"],
                                     "not prepared"),
      "train_data_not_prepared": (["launch/train.py", "--config=configs/teacher.py:livec",
                                   f"--config.data.data_dir={tmp / 'empty'}",
                                   f"--workdir={tmp / 'livec_run'}"], "not prepared"),
      "train_teacher_missing": (["launch/train.py", "--config=configs/student.py:demo",
                                 f"--config.teacher_checkpoint={tmp / 'no_teacher'}",
                                 f"--workdir={tmp / 'runs' / 'student_run'}"], "no_teacher"),
      "train_unwritable_workdir": (["launch/train.py", f"--config={DEMO}",
                                    f"--workdir={tmp / 'a_file' / 'run'}"], "a_file"),
      "train_refuses_changed_resume": (["launch/train.py", f"--config={DEMO}",
                                        f"--workdir={resume}", "--config.model.width=64",
                                        "--config.num_epochs=20"], "model.width: 32 -> 64"),
  }
  if teacher_pkl:
    cases["convert_teacher_pkl_as_student"] = (
        ["launch/convert.py", f"--torch_checkpoint={teacher_pkl}", "--model=student",
         f"--output={tmp / 'student'}"], "--model=teacher")
    cases["predict_teacher_pkl_as_student"] = (
        ["launch/predict.py", f"--checkpoint={teacher_pkl}", "--model=student", PHOTO],
        "holds the teacher")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    started = {name: pool.submit(_launch, cases[name][0]) for name in SUBPROCESS_CASES}
    # Meanwhile, in this process (one command at a time: they share sys.argv and the flags).
    procs = {name: run_launcher(args[0], args[1:]) for name, (args, _) in cases.items()
             if name not in SUBPROCESS_CASES}
    procs.update({name: p.result() for name, p in started.items()})
  return dict(cases=cases, procs=procs, tmp=tmp, ckpt=ckpt, resume=resume,
              resume_config=resume_config)


# One per launcher runs as a real subprocess.
SUBPROCESS_CASES = ("predict_missing_path", "convert_missing_file", "export_bad_quantize",
                    "explain_refuses_a_full_output", "evaluate_not_a_checkpoint",
                    "train_refuses_changed_resume")
CASES = ["predict_missing_path", "predict_bad_image_size", "predict_bad_flag_value",
         "predict_not_a_checkpoint", "predict_folder_without_images", "convert_missing_file",
         "convert_refuses_to_overwrite", "export_bad_quantize", "export_missing_checkpoint",
         "explain_refuses_a_full_output", "evaluate_not_a_checkpoint",
         "evaluate_data_not_prepared", "train_data_not_prepared", "train_teacher_missing",
         "train_unwritable_workdir",
         "train_refuses_changed_resume", "convert_teacher_pkl_as_student",
         "predict_teacher_pkl_as_student"]


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_line_without_traceback(runs, name):
  if name not in runs["procs"]:
    pytest.skip("needs torch to write the .pkl")
  proc, expected = runs["procs"][name], runs["cases"][name][1]
  assert proc.returncode not in (0, None), proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
  assert len(errors) == 1, proc.stderr
  assert expected in errors[0], errors[0]
  if not name.startswith("train"):  # train keeps its INFO log; the others print only this
    assert [line for line in proc.stderr.splitlines() if line.strip()] == errors, proc.stderr


def test_convert_left_the_existing_checkpoint_alone(runs):
  meta = checkpoint.read_json_item(runs["ckpt"], "meta")
  assert meta["model_config"]["variant"] == "student"
  variables, _ = checkpoint.load_variables(runs["ckpt"])
  np.testing.assert_array_equal(variables["params"]["x"], np.ones(3, np.float32))


def test_a_run_that_cannot_start_leaves_no_files(runs):
  # Neither the workdir nor the folder made for it: no config.json, metrics, events or lock.
  assert not os.path.exists(runs["tmp"] / "livec_run")
  assert not os.path.exists(runs["tmp"] / "runs")


def test_refused_resume_wrote_nothing(runs):
  with open(os.path.join(runs["resume"], "config.json"), "rb") as f:
    assert f.read() == runs["resume_config"]
  assert sorted(os.listdir(runs["resume"])) == ["checkpoints", "config.json"]
  err = runs["procs"]["train_refuses_changed_resume"].stderr
  assert "num_epochs" not in err.split("refusing to resume with")[1].split(". Use")[0]


def test_verbose_shows_the_traceback(tmp_path):
  proc = _launch(["launch/predict.py", f"--checkpoint={tmp_path}", "--verbose", PHOTO])
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "no checkpoint" in proc.stderr


@pytest.mark.slow
def test_safe_override_resumes_and_a_changed_model_is_refused(tmp_path):
  """In-process: a tiny run, resumed with more epochs and other logging; then a wider model."""
  from mobileiqa_jax.training import trainer  # pylint: disable=g-import-not-at-top
  from support import tiny_config, tiny_data  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  c = tiny_config("student", num_epochs=1)
  first = trainer.train_and_evaluate(c, workdir, data=tiny_data(c))
  c2 = tiny_config("student", num_epochs=2)
  c2.log_every_steps, c2.eval_every_epochs, c2.checkpoint.keep = 2, 2, 3
  resumed = trainer.train_and_evaluate(c2, workdir, data=tiny_data(c2))
  assert resumed["step"] == 2 * first["step"] and not resumed["preempted"]
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    stored = f.read()
  assert json.loads(stored)["num_epochs"] == 2
  wide = tiny_config("student", num_epochs=3)
  wide.model.width = 32
  with pytest.raises(checkpointer.ResumeConfigError, match=r"model\.width: 16 -> 32"):
    trainer.train_and_evaluate(wide, workdir, data=tiny_data(wide))
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    assert f.read() == stored
