"""The released code's recipe (docs/reproducing.md): last partial batch, split, init, resize."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileiqa_jax import sharding
from mobileiqa_jax import train
from mobileiqa_jax.data import layout
from mobileiqa_jax.models import layers
from test_train_helpers import tiny_config, use_compilation_cache


def _step_results(config, batch):
  """(loss, params, batch_stats) after one jitted train step from the seeded init."""
  mesh = sharding.make_mesh(config.mesh)
  setup = train.build_setup(config, mesh, steps_per_epoch=2)
  state = setup.init_state()
  state, m = setup.train_step(state, sharding.host_to_global(batch, mesh), None)
  return jax.device_get((m["loss"], m["score_mse"], m["grad_norm"], state.params,
                         state.batch_stats))


def test_masked_batch_norm_equals_batch_norm_of_the_real_examples():
  """BatchNorm2d under a mask: outputs, running statistics and gradients of the real rows."""
  rng = np.random.default_rng(1)
  real = rng.normal(2.0, 3.0, size=(3, 2, 2, 4)).astype(np.float32)
  padded = np.concatenate([real, np.zeros((5, 2, 2, 4), np.float32)])
  mask = np.arange(8) < 3
  bn = layers.BatchNorm2d(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(0), real)
  variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
               "batch_stats": variables["batch_stats"]}

  def run(x, m):
    def f(params):
      with layers.batch_norm_example_mask(m):
        y, new = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                          mutable=["batch_stats"])
      # A loss over the real rows only, weighting them differently so gradients are not 0.
      return jnp.sum(jnp.square(y[:3]) * jnp.arange(1.0, 4.0)[:, None, None, None]), (y, new)
    (_, (y, new)), g = jax.value_and_grad(f, has_aux=True)(variables["params"])
    return y[:3], new["batch_stats"], g

  got = run(jnp.asarray(padded), jnp.asarray(mask))
  want = run(jnp.asarray(real), None)
  unmasked = run(jnp.asarray(padded), None)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # The padding does change plain BatchNorm, so the mask is what makes them agree.
  assert not np.allclose(unmasked[0], want[0], atol=1e-2)
  # PyTorch's reference numbers for the real rows alone (unbiased running variance).
  torch = pytest.importorskip("torch")
  tbn = torch.nn.BatchNorm2d(4)
  with torch.no_grad():
    tbn.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["scale"])))
    tbn.bias.copy_(torch.from_numpy(np.asarray(variables["params"]["bias"])))
  ty = tbn.train()(torch.from_numpy(real.transpose(0, 3, 1, 2))).detach().numpy()
  np.testing.assert_allclose(got[0], ty.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1]["var"], tbn.running_var.numpy(), rtol=1e-5)
  np.testing.assert_allclose(got[1]["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_padded_last_batch_step_equals_the_small_batch_step():
  """Padding + mask gives exactly PyTorch's smaller last batch: loss, BN statistics, update.

  Slow (two train-step compiles, minutes on the shared 2-core VM). The parameters agree to
  float32 rounding of a backward pass through BatchNorm over 5 examples (about 1e-4 relative
  on the smallest gradients); without the mask the loss itself differs at the first digit.
  """
  use_compilation_cache()
  # No dropout (its masks depend on the batch shape). Adam with eps 1 and lr 1 makes the
  # first update g / (|g| + 1): the parameters then carry the gradients, not their signs.
  c = tiny_config("teacher", **{"model.dropout_rate": 0.0, "optimizer.lr": 1.0,
                                "optimizer.eps": 1.0, "optimizer.weight_decay": 0.0})
  rng = np.random.default_rng(0)
  h, w = c.data.image_size
  real = 5
  images = rng.normal(size=(real, h, w, 3)).astype(np.float32)
  mos = rng.uniform(size=(real,)).astype(np.float32)
  pad = c.batch_size - real
  padded = {"image": np.concatenate([images, np.zeros((pad, h, w, 3), np.float32)]),
            "mos": np.concatenate([mos, np.zeros((pad,), np.float32)]),
            "mask": np.arange(c.batch_size) < real}
  small = {"image": images, "mos": mos}
  got = _step_results(c, padded)
  want = _step_results(c, small)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
  np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
  for g, e in zip(jax.tree.leaves(got[3:]), jax.tree.leaves(want[3:])):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_reference_split_is_the_released_codes():
  train_idx, test_idx = layout.reference_split(4269)
  assert (len(train_idx), len(test_idx)) == (3415, 854)
  # The first ten train indices the released code's training log prints.
  assert train_idx[:10] == [3361, 3322, 485, 1182, 1743, 136, 3641, 702, 2429, 2448]
  assert sorted(train_idx + test_idx) == list(range(4269))
  # An independent computation, as the released train.py does it (global random state).
  state = random.getstate()
  try:
    for n in (4269, 1162, 586):
      random.seed(3407)
      order = list(range(n))
      random.shuffle(order)
      cut = int(round(0.8 * n))
      assert layout.reference_split(n) == (order[:cut], order[cut:])
  finally:
    random.setstate(state)
  assert layout.reference_split(10, seed=1) != layout.reference_split(10)
