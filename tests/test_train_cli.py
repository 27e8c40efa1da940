"""The command-line entry points: config overrides, unknown keys, end-to-end demo + evaluate."""

from __future__ import annotations

import json
import os

import pytest

from support import run_launcher, run_python as _launch


def test_unknown_config_key_is_an_error(tmp_path):
  # The command's main in this process (test_cli_errors starts train as a real process).
  proc = run_launcher("launch/train.py", ["--config=configs/teacher.py:demo",
                                          "--config.optimiser.lr=3e-5", f"--workdir={tmp_path}"])
  assert proc.returncode != 0
  assert "optimiser" in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, "config.json"))


@pytest.mark.slow
def test_demo_cli_train_then_evaluate(tmp_path):
  """launch/train.py on the built-in demo data for a few steps, then launch/evaluate.py."""
  workdir = str(tmp_path / "run")
  proc = _launch(["launch/train.py", "--config=configs/teacher.py:demo",
                  f"--workdir={workdir}", "--config.max_steps=3",
                  "--config.model.backbone=mobilenetv3_small_050",
                  "--config.depthwise_impl=conv", "--config.data.image_size=(32,32)",
                  "--config.model.width=16", "--config.model.pooled_size=6"])
  assert proc.returncode == 0, proc.stderr[-5000:]
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["max_steps"] == 3 and cfg["data"]["image_size"] == [32, 32]
  assert "RANDOM" not in proc.stderr  # the demo trains from scratch on purpose: no banner
  proc = _launch(["launch/evaluate.py", f"--checkpoint={workdir}", "--split=test",
                  f"--output_dir={tmp_path / 'eval'}"])
  assert proc.returncode == 0, proc.stderr[-5000:]
  metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
  from mobileiqa_jax.data import demo  # pylint: disable=g-import-not-at-top
  assert metrics["split"] == "test"
  assert metrics["num_examples"] == len(demo.source("test"))
  assert os.path.isfile(tmp_path / "eval" / "scatter.png")


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/teacher.py:demo", "--config.optimizer.lrr=1e-3"],
     ['--config.optimizer.lrr', 'Did you mean "lr"']),
    (["--config=configs/teacher.py:dmeo"], ["unknown config argument 'dmeo'", "demo"]),
])
def test_a_config_mistake_is_one_line_with_the_suggestion(tmp_path, args, expected):
  proc = run_launcher("launch/train.py", [*args, f"--workdir={tmp_path / 'run'}"])
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr and 'File "' not in proc.stderr, (
      proc.stderr)
  assert all(e in lines[0] for e in expected), lines[0]
  assert not (tmp_path / "run").exists()


def test_random_backbone_warns_unless_the_config_trains_from_scratch(caplog):
  import logging  # pylint: disable=g-import-not-at-top
  from configs import teacher  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import convert  # pylint: disable=g-import-not-at-top
  demo, uhd = teacher.get_config("demo"), teacher.get_config()
  assert demo.init.from_scratch and not demo.init.backbone
  assert not uhd.init.from_scratch
  with caplog.at_level(logging.INFO):
    assert convert.fetch_timm_backbone(demo.init.backbone, "mobilevitv2_050",
                                       from_scratch=demo.init.from_scratch) is None
  assert "RANDOM" not in caplog.text and "from_scratch" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert convert.fetch_timm_backbone("", "mobilevitv2_200",
                                       from_scratch=uhd.init.from_scratch) is None
  assert "RANDOM" in caplog.text
