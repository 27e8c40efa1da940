"""Checkpoint format: standalone save/load, training manager keep-last-K + best, resolution."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mobileiqa_jax.training import checkpointer
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.models import runtime


def _variables(v=1.0):
  return {"params": {"dense": {"kernel": jnp.full((3, 4), v), "bias": jnp.zeros(4)}},
          "batch_stats": {"bn": {"mean": jnp.arange(4.0)}}}


def test_save_model_roundtrip(tmp_path):
  path = checkpoint.save_model(str(tmp_path / "m"), _variables(2.0), {"name": "toy", "width": 3},
                               extra={"image_size": (32, 48), "mos_range": None})
  assert checkpoint.resolve_checkpoint(path) == path
  variables, meta = checkpoint.load_variables(path)
  np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], np.full((3, 4), 2.0))
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], np.arange(4.0))
  assert isinstance(variables["params"]["dense"]["kernel"], np.ndarray)
  assert meta["model_config"] == {"name": "toy", "width": 3}
  assert meta["extra"]["image_size"] == [32, 48]
  assert meta["format"] == checkpoint.FORMAT


def test_train_checkpointer_keeps_last_and_best(tmp_path):
  tx = optax.adam(1e-3)
  ck = checkpointer.TrainCheckpointer(str(tmp_path), keep=2, async_save=False)
  selections = {2: 1.0, 4: 2.5, 6: 0.5}  # steps with epoch-end metrics; 4 is best
  for step in range(1, 9):
    v = _variables(float(step))
    metrics = {"selection": selections[step]} if step in selections else None
    ck.save(step, v, tx.init(v["params"]), {"model_config": {"name": "toy"}},
            {"step": step, "epoch": step // 2, "data_state": {"pos": step}}, metrics=metrics)
  ck.wait()
  steps = checkpoint.list_steps(ck.directory)
  assert steps == [4, 7, 8], steps
  # load_model-style resolution of a workdir: best by selection, or latest.
  assert checkpoint.resolve_checkpoint(str(tmp_path)).endswith("/4")
  assert checkpoint.resolve_checkpoint(str(tmp_path), which="latest").endswith("/8")
  variables, _ = checkpoint.load_variables(checkpoint.resolve_checkpoint(str(tmp_path)))
  np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], np.full((3, 4), 4.0))

  # Sharded restore into abstract targets (the training resume path).
  v = _variables()
  opt = tx.init(v["params"])
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), t)
  rv, ro, train = ck.restore(8, abstract(v), abstract(opt))
  assert train["data_state"] == {"pos": 8} and train["metrics"] is None
  np.testing.assert_array_equal(rv["params"]["dense"]["kernel"], np.full((3, 4), 8.0))
  assert type(ro) is type(opt)
  ck.close()


def test_missing_checkpoint_message(tmp_path):
  with pytest.raises(FileNotFoundError, match="variables/ and meta/"):
    checkpoint.resolve_checkpoint(str(tmp_path))


def _old_format_checkpoint(path, model_config):
  """A checkpoint as written before training settings were stored apart from the model."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  meta = {"format": checkpoint.FORMAT, "model_config": model_config,
          "extra": {"image_size": [64, 64]}}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, ocp.args.Composite(variables=ocp.args.PyTreeSave(_variables()),
                                        meta=ocp.args.JsonSave(meta)))
  return path


def test_model_config_stores_the_architecture_and_old_checkpoints_still_load(tmp_path):
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  arch = mobileiqa.model_config("teacher", backbone="mobilevitv2_050", width=16,
                                pooled_size=6).to_dict()
  # How older checkpoints stored their run's runtime: inside the model config.
  trained = dict(arch, dtype="bfloat16", depthwise_impl="conv", backbone_kwargs={"remat": True})
  new = checkpoint.save_model(str(tmp_path / "new"), _variables(), trained)
  stored = checkpoint.read_json_item(new, "meta")
  assert "dtype" not in stored["model_config"] and stored["model_config"]["backbone_kwargs"] == {}
  assert "depthwise_impl" not in stored["model_config"]
  assert stored["training"] == {"compute_dtype": "bfloat16", "remat": True,
                                "depthwise_impl": "conv", "head_init": "torch"}
  old = _old_format_checkpoint(str(tmp_path / "old"), trained)
  assert checkpoint.read_json_item(old, "meta")["model_config"]["dtype"] == "bfloat16"
  for path in (new, old):
    model, _, meta = checkpoint.load_model(path)
    assert model.dtype == jnp.float32 and model.backbone.dtype == jnp.float32
    assert not getattr(model.backbone, "remat", False)
    assert meta["model_config"] == {k: v for k, v in arch.items()
                                    if k not in ("dtype", "head_init")}
    assert meta["training"] == {"compute_dtype": "bfloat16", "remat": True,
                                "depthwise_impl": "conv", "head_init": "torch"}
    # How it runs is the caller's runtime, not what the run stored.
    assert model.backbone.depthwise_impl == "shift"
    model, _, _ = checkpoint.load_model(
        path, runtime=runtime.Runtime(compute_dtype="bfloat16", depthwise_impl="conv"))
    assert model.dtype == jnp.bfloat16 and model.backbone.depthwise_impl == "conv"


def _write_workdir(path, config):
  import json  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(path, "checkpoints", "7", "variables"))
  os.makedirs(os.path.join(path, "checkpoints", "7", "meta"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


def test_resume_check_allows_safe_fields_and_lists_the_others(tmp_path):
  stored = {"num_epochs": 10, "max_steps": -1, "mesh": [["data", -1]],
            "checkpoint": {"keep": 2}, "model": {"width": 32, "pooled_size": 6},
            "data": {"image_size": [32, 32], "num_workers": 4}, "optimizer": {"lr": 1e-3}}
  _write_workdir(str(tmp_path / "run"), stored)
  safe = {**stored, "num_epochs": 20, "max_steps": 5, "mesh": [["data", 1], ["fsdp", -1]],
          "checkpoint": {"keep": 5}, "data": {"image_size": (32, 32), "num_workers": 1}}
  checkpointer.check_resume_config(str(tmp_path / "run"), safe)  # no error
  bad = {**safe, "model": {"width": 64, "pooled_size": 6}, "optimizer": {"lr": 1e-3, "wd": 1}}
  with pytest.raises(checkpointer.ResumeConfigError) as err:
    checkpointer.check_resume_config(str(tmp_path / "run"), bad)
  msg = str(err.value)
  assert "model.width: 32 -> 64" in msg and "optimizer.wd: (absent) -> 1" in msg
  assert "num_epochs" not in msg.split("refusing to resume with")[1].split(". Use")[0]
  # No checkpoints yet: a new run, anything goes.
  os.makedirs(tmp_path / "fresh")
  checkpointer.check_resume_config(str(tmp_path / "fresh"), bad)
