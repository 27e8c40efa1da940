"""Checkpoint format: standalone save/load, training manager keep-last-K + best, resolution."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mobileiqa_jax import checkpoint


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
  ck = checkpoint.TrainCheckpointer(str(tmp_path), keep=2, async_save=False)
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
