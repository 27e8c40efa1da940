"""The weight converter: PyTorch checkpoints -> Flax -> PyTorch, strictness, timm backbones."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_fixtures
from support import randomize_torch, rel_err as _rel, run_launcher

from mobileiqa_jax.weights import convert
from mobileiqa_jax.models import mobileiqa

LIVEC = data_fixtures.LIVEC_IMAGES
# A small head keeps these tests fast; key names do not depend on its size.
SMALL = dict(pooled_size=12, width=32)


def _flax_variables(variant: str, seed: int = 0, **overrides):
  """The model and random variables of its shapes (no compilation: conversion is about names,
  layouts and values, not what the model computes)."""
  model = mobileiqa.build_model(mobileiqa.model_config(variant, **overrides))
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), convert.variables_template(model))
  return model, variables


def test_flax_to_torch_to_flax_is_identity_without_torch():
  model, variables = _flax_variables("student", **SMALL)
  state = convert.flax_to_torch(variables)
  assert "LDA1.cnn1.weight" in state and "MALs.0.attention_module.4.gamma" in state
  assert "local_cnn.bn1.num_batches_tracked" in state
  back = convert.torch_to_flax(state, convert.variables_template(model))
  flat_a = jax.tree_util.tree_leaves_with_path(variables)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(back))
  assert len(flat_a) == len(flat_b)
  for path, value in flat_a:
    np.testing.assert_array_equal(flat_b[path], value)


def test_renamed_and_misshaped_keys_are_errors_that_name_them():
  model, variables = _flax_variables("student", **SMALL)
  template = convert.variables_template(model)
  state = convert.flax_to_torch(variables)
  renamed = dict(state)
  renamed["LDA1.conv1.weight"] = renamed.pop("LDA1.cnn1.weight")
  with pytest.raises(convert.ConversionError) as err:
    convert.torch_to_flax(renamed, template, source="renamed.pkl")
  assert "LDA1.cnn1.weight" in str(err.value) and "LDA1.conv1.weight" in str(err.value)
  assert "renamed.pkl" in str(err.value)

  misshaped = dict(state)
  misshaped["fc_score.0.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(convert.ConversionError, match=r"fc_score\.0\.weight.*\(3, 3\)"):
    convert.torch_to_flax(misshaped, template)

  extra = dict(state, **{"head.fc.weight": np.zeros((2, 2), np.float32)})
  # A whole-model checkpoint never drops keys, not even a classifier's.
  with pytest.raises(convert.ConversionError, match=r"unexpected: head\.fc\.weight"):
    convert.torch_to_flax(extra, template)


def _timm_style(state, prefix):
  """A full timm classification checkpoint: `stages.N` names plus a classifier."""
  out = {}
  for k, v in state.items():
    if k.startswith(prefix):
      out[k[len(prefix):].replace("stages_", "stages.")] = v
  return out


def test_safetensors_backbone_loads_without_torch_and_drops_only_the_classifier(tmp_path):
  from safetensors.numpy import save_file
  _, variables = _flax_variables("teacher", **SMALL)
  timm_state = _timm_style(convert.flax_to_torch(variables), "global_vit.")
  assert any(k.startswith("stages.2.") for k in timm_state)
  timm_state["head.fc.weight"] = np.ones((10, 1024), np.float32)
  timm_state["head.fc.bias"] = np.ones((10,), np.float32)
  path = str(tmp_path / "mobilevitv2_200.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in timm_state.items()
             if not k.endswith("num_batches_tracked")}, path)
  loaded = convert.load_timm_backbone(path, "mobilevitv2_200.cvnets_in22k_ft_in1k")
  for (p, a), (q, b) in zip(
      jax.tree_util.tree_leaves_with_path({"params": variables["params"]["global_vit"],
                                           "batch_stats": variables["batch_stats"]["global_vit"]}),
      jax.tree_util.tree_leaves_with_path(loaded)):
    assert p == q
    np.testing.assert_array_equal(a, b)

  timm_state["stages.9.conv.weight"] = np.ones((1,), np.float32)
  save_file({k: np.ascontiguousarray(v) for k, v in timm_state.items()
             if not k.endswith("num_batches_tracked")}, path)
  with pytest.raises(convert.ConversionError, match=r"stages_9\.conv\.weight"):
    convert.load_timm_backbone(path, "mobilevitv2_200")


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["teacher", "student"])
def test_pkl_round_trip_and_parity_with_pytorch(variant, tmp_path, fast_compile):
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from mobileiqa_jax.weights import torch_reference as ref_mod
  ctor = ref_mod.teacher_reference if variant == "teacher" else ref_mod.student_reference
  torch.manual_seed(0)
  ref = randomize_torch(ctor(pooled_size=12, width=32), conv_bias=False).eval()
  path = str(tmp_path / f"{variant}.pkl")
  torch.save(ref.state_dict(), path)

  model, variables, config = convert.load_mobileiqa(path, variant, **SMALL)
  assert config["backbone_name"] == ("global_vit" if variant == "teacher" else "local_cnn")

  images = np.random.default_rng(0).normal(size=(2, 70, 90, 3)).astype(np.float32)
  with torch.no_grad():
    x_t, dof_t, score_t, _ = ref(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                 return_features=True)
  # One jitted program, XLA's optimisations off (fast_compile; the 1e-4 bounds hold: measured
  # 0 on the score): run op by op, the full backbones took 140 s of dispatch and small compiles.
  x, dof, score = jax.jit(lambda v, i: model.apply(v, i, return_features=True))(
      variables, jnp.asarray(images))
  # Flax features are NHWC-last: (V, B, S, S, C) vs PyTorch (V, B, C, S, S).
  assert _rel(np.moveaxis(np.asarray(x), -1, 2), x_t.numpy()) <= 1e-4
  assert _rel(np.moveaxis(np.asarray(dof), -1, 2), dof_t.numpy()) <= 1e-4
  assert _rel(score, score_t.numpy()) <= 1e-4

  back = {k: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in convert.flax_to_torch(variables).items()}
  fresh = ctor(pooled_size=12, width=32)
  fresh.load_state_dict(back, strict=True)
  for key, value in ref.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.torch
def test_full_timm_pth_initialises_the_backbone(tmp_path):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  full = timm.create_model("mobilenetv3_large_100", pretrained=False)
  path = str(tmp_path / "mnv3.pth")
  torch.save(full.state_dict(), path)
  loaded = convert.load_timm_backbone(path, "mobilenetv3_large_100")
  feats = timm.create_model("mobilenetv3_large_100", pretrained=False, features_only=True)
  feats.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in convert.flax_to_torch(loaded).items()}, strict=True)
  for key, value in feats.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      assert torch.equal(value, full.state_dict()[key]), key


@pytest.mark.slow  # four command processes; the commands' errors are test_cli_errors'
@pytest.mark.torch
def test_convert_and_predict_commands(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from mobileiqa_jax.weights import torch_reference as ref_mod
  if not os.path.isdir(LIVEC):
    pytest.skip("../shared/data/livec_jpg is not present")
  torch.manual_seed(0)
  ref = randomize_torch(ref_mod.student_reference(), conv_bias=False).eval()
  pkl = str(tmp_path / "MobileNet_IQA.pkl")
  torch.save(ref.state_dict(), pkl)
  ckpt = str(tmp_path / "student")
  # The commands run in this process (support.run_launcher); test_cli_errors runs each
  # launcher once as a real subprocess.
  run = run_launcher("launch/convert.py", [f"--torch_checkpoint={pkl}", "--model=student",
                                           f"--output={ckpt}"])
  assert run.returncode == 0, run.stderr[-3000:]

  photos = sorted(os.listdir(LIVEC))[:3]
  folder = tmp_path / "photos"
  folder.mkdir()
  for name in photos:
    os.symlink(os.path.join(LIVEC, name), folder / name)
  (folder / "broken.jpg").write_bytes(b"not a jpeg")
  (folder / "notes.txt").write_text("not an image, not an image extension: not scored")
  run = run_launcher("launch/predict.py", [f"--checkpoint={ckpt}", "--image_size=96,128",
                                           "--batch_size=2", "--noprogress", str(folder)])
  assert run.returncode == 1, run.stderr
  lines = run.stdout.strip().splitlines()
  assert lines[0] == "path,score"
  assert [os.path.basename(l.split(",")[0]) for l in lines[1:]] == sorted(photos)
  assert "broken.jpg" in run.stderr and "notes.txt" not in run.stderr

  # Same scores as the PyTorch model on the same preprocessing.
  from mobileiqa_jax.data import preprocess
  for line in lines[1:]:
    path, score = line.split(",")
    with open(path, "rb") as f:
      img = preprocess.resize_normalize(preprocess.decode_rgb(f.read(), path), (96, 128))
    with torch.no_grad():
      want = ref(torch.from_numpy(img.transpose(2, 0, 1)[None].copy())).item()
    assert abs(float(score) - want) <= 1e-4 * max(1.0, abs(want))

  # And back to a PyTorch state dict the reference loads strictly.
  out = str(tmp_path / "back.pkl")
  run = run_launcher("launch/convert.py", [f"--checkpoint={ckpt}", f"--output={out}"])
  assert run.returncode == 0, run.stderr[-3000:]
  fresh = ref_mod.student_reference()
  fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
