"""The model card (mobileiqa_jax/profiling/model_card.py, launch/model_card.py) on small checkpoints."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.profiling import model_card
from mobileiqa_jax.models import mobileiqa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
  """An orbax checkpoint of a student with a small head (S = 12, C = 32), weights all ones
  (the card does not depend on them; initialising would compile the model)."""
  cfg = mobileiqa.model_config("student", pooled_size=12, width=32)
  model = mobileiqa.build_model(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  variables = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), shapes)
  path = str(tmp_path_factory.mktemp("card") / "student")
  checkpoint.save_model(path, variables, cfg.to_dict(), {"image_size": [64, 64]})
  return path, variables


def test_card_of_a_checkpoint_folder(student_dir):
  path, variables = student_dir
  card = model_card.profile(path, measure=False)
  assert card["model"] == "student" and card["image_size"] == [64, 64]
  assert card["params"] == mobileiqa.count_params(variables)
  assert card["params"] == card["params_backbone"] + card["params_head"]
  count = model_card.count_model_macs(mobileiqa.model_config(
      "student", pooled_size=12, width=32).to_dict(), (64, 64))
  assert card["gmacs"] == count.total / 1e9
  assert card["within_aim2024_budget"] is True
  json.dumps(card)  # One JSON line.
  assert any("MACs" in line for line in model_card.table(card))


@pytest.mark.torch
def test_card_of_a_state_dict_counts_the_reference_parameters(tmp_path):
  """The authors' kind of file: a .pkl state dict, parameters as PyTorch counts them."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from mobileiqa_jax.weights import torch_reference  # pylint: disable=g-import-not-at-top

  ref = torch_reference.student_reference(pooled_size=12, width=32)
  path = str(tmp_path / "MobileNet_IQA.pkl")
  torch.save(ref.state_dict(), path)
  card = model_card.profile(path, (64, 64), measure=False)
  assert card["params"] == sum(p.numel() for p in ref.parameters())
  assert card["params_backbone"] == sum(p.numel() for p in ref.local_cnn.parameters())


@pytest.mark.slow
def test_profile_command_measures_in_a_child(student_dir):
  path, _ = student_dir
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "launch/model_card.py", f"--checkpoint={path}",
                        "--repeats=1"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  card = json.loads(out.stdout.strip().splitlines()[-1])
  assert card["jax_latency_s"] > 0 and card["jax_peak_rss_gb"] > 0
  # XLA's FLOPs include elementwise work: at least the two per MAC of the matmuls.
  assert card["gflops"] >= card["macs_by_kind"]["dot"] * 2 / 1e9 * 0.9
  assert "JAX latency" in out.stdout


def test_profile_command_refuses_a_missing_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "launch/model_card.py",
                        f"--checkpoint={tmp_path / 'nope'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.count("\n") == 1 and "does not exist" in out.stderr


@pytest.mark.slow  # an ONNX export and a child process; the export tests check the ONNX file
def test_card_measures_the_onnx_export(student_dir, monkeypatch):
  """--exports=onnx: the export's run in its own process; the card prints its row.

  The conversion runs in this process here (a child would import jax and jax2onnx again);
  the slow TFLite test goes through the child, as launch/model_card.py does.
  """
  pytest.importorskip("onnxruntime")
  pytest.importorskip("jax2onnx")
  monkeypatch.setattr(model_card, "measure_export_in_child", model_card.measure_export)
  path, _ = student_dir
  card = model_card.profile(path, measure=False, exports=("onnx",))
  e = card["exports"]["onnx"]
  assert e["runtime"] == "CPUExecutionProvider" and e["num_threads"] == 2
  assert e["latency_s"] > 0 and 0.01 < e["peak_rss_gb"] < 4, e
  # The file holds the float32 parameters (BatchNorm statistics too).
  assert e["file_mb"] > 4 * card["params"] / 1e6, (e, card["params"])
  lines = model_card.table(card)
  assert any(line.startswith("onnx export") and "ONNX Runtime" in line for line in lines)
  json.dumps(card)


@pytest.mark.slow
def test_card_measures_the_tflite_export(student_dir):
  pytest.importorskip("tensorflow")
  pytest.importorskip("ai_edge_litert")
  path, _ = student_dir
  card = model_card.profile(path, measure=False, exports=("tflite",))
  e = card["exports"]["tflite"]
  assert e["runtime"] == "XNNPACK" and e["latency_s"] > 0 and e["peak_rss_gb"] > 0.01
  assert any(line.startswith("tflite export") for line in model_card.table(card))


def test_card_refuses_an_unknown_export(student_dir):
  with pytest.raises(ValueError, match="--exports takes tflite, onnx"):
    model_card.profile(student_dir[0], measure=False, exports=("coreml",))
