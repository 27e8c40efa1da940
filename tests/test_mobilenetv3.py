"""Parity of the Flax MobileNetV3 with timm's `features_only` models (eval and training)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mobileiqa_jax.weights import convert
from mobileiqa_jax.models import mobilenetv3
import support

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

RTOL = 1e-5
BATCH = 2


@functools.lru_cache(maxsize=None)
def template(name: str, impl: str = "conv"):
  """Shapes of the Flax module's variables: the strict converter's target."""
  module = mobilenetv3.BACKBONES[name](depthwise_impl=impl)
  return convert.variables_template(module, (32, 32))


def to_flax(model, name: str, impl: str = "conv") -> dict:
  """timm state dict -> Flax variables via the project's converter.

  Strict: raises `ConversionError` on any missing, unexpected or mis-shaped key. The converter
  copies (state_dict tensors alias the live BatchNorm buffers).
  """
  variables = convert.torch_to_flax(model.state_dict(), template(name, impl), source=name)
  return jax.tree.map(jnp.asarray, variables)


def shapes_of(tree) -> dict:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep=".").items()}


@functools.lru_cache(maxsize=None)
def timm_model(name: str):
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, features_only=True)
  return support.randomize_torch(model).eval()


@functools.lru_cache(maxsize=None)
def jitted_apply(name: str, impl: str, train: bool):
  module = mobilenetv3.BACKBONES[name](depthwise_impl=impl)
  if train:
    return module, jax.jit(
        lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
  return module, jax.jit(lambda v, x: module.apply(v, x))


def images(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH, 3, h, w)).astype(np.float32)


def rel_err(jax_nhwc, torch_nchw) -> float:
  return support.rel_err(jax_nhwc, support.nchw_to_nhwc(torch_nchw))


def check_eval(name: str, impl: str, h: int, w: int):
  tm = timm_model(name)
  module, apply = jitted_apply(name, impl, False)
  x = images(h, w)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x))
  feats = apply(to_flax(tm, name, impl), jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert len(feats) == len(ref) == 5
  assert tuple(f.shape[-1] for f in feats) == module.feature_channels
  errs = [rel_err(f, r) for f, r in zip(feats, ref)]
  assert max(errs) <= RTOL, f"{name} {impl} {h}x{w}: {errs}"
  print(f"\n{name} {impl} {h}x{w} max rel err per feature: "
        + ", ".join(f"{e:.2e}" for e in errs))
  for f, s in zip(feats, module.feature_strides):
    # Symmetric padding: ceil division at each stride-2 layer.
    assert f.shape[1:3] == (-(-h // s), -(-w // s))
  return errs


@pytest.mark.parametrize("name", sorted(mobilenetv3.BACKBONES))
def test_variable_tree_mirrors_state_dict(name):
  """The strict converter maps every timm key onto the Flax init tree, shapes included."""
  tm = timm.create_model(name, pretrained=False, features_only=True)
  module = mobilenetv3.BACKBONES[name]()
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  variables = convert.torch_to_flax(tm.state_dict(), shapes, source=name)  # raises on diff
  assert set(variables) == set(shapes) == {"params", "batch_stats"}
  assert shapes_of(variables) == shapes_of(shapes)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables))
  assert module.feature_channels == tuple(tm.feature_info.channels())
  assert module.feature_strides == tuple(tm.feature_info.reduction())


@pytest.mark.parametrize("impl", ["conv", "shift"])
@pytest.mark.parametrize("hw", [(256, 256), (250, 378)])
def test_large_100_eval_parity(impl, hw):
  check_eval("mobilenetv3_large_100", impl, *hw)


@pytest.mark.parametrize("name,hw", [
    ("mobilenetv3_small_100", (97, 65)),
    ("mobilenetv3_large_075", (32, 47)),  # the smallest input side the backbone takes
])
def test_other_variants_eval_parity(name, hw):
  check_eval(name, "conv", *hw)


def test_large_100_train_mode():
  """Batch statistics in the forward and PyTorch's running-stat update (unbiased var)."""
  name, impl = "mobilenetv3_large_100", "shift"
  tm = timm.create_model(name, pretrained=False, features_only=True)
  support.randomize_torch(tm, seed=1).train()
  variables = to_flax(tm, name, impl)  # a copy: the forward below updates the buffers
  _, apply = jitted_apply(name, impl, True)
  x = images(67, 90, seed=1)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x))
  feats, updated = apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  errs = [rel_err(f, r) for f, r in zip(feats, ref)]
  print(f"\ntrain {impl}: features " + ", ".join(f"{e:.2e}" for e in errs))
  assert max(errs) <= RTOL, errs
  want = traverse_util.flatten_dict(to_flax(tm, name, impl)["batch_stats"], sep=".")
  got = traverse_util.flatten_dict(updated["batch_stats"], sep=".")
  assert set(got) == set(want)
  # The converted inputs did not alias the buffers that the torch forward updated in place.
  before = traverse_util.flatten_dict(variables["batch_stats"], sep=".")
  assert all(not np.array_equal(before[k], want[k]) for k in want)
  # The 960-channel layer sees 2x3x3 positions: the n/(n-1) correction is 6% there.
  stat_errs = {k: float(np.max(np.abs(np.asarray(got[k]) - np.asarray(want[k])))
                        / np.max(np.abs(np.asarray(want[k])))) for k in want}
  worst = max(stat_errs, key=stat_errs.get)
  print(f"running stats worst {worst}: {stat_errs[worst]:.2e}")
  assert stat_errs[worst] <= RTOL, (worst, stat_errs[worst])


def test_bfloat16_compute_keeps_float32_params():
  # Shapes and dtypes only: XLA:CPU takes tens of seconds to compile the bf16 network.
  module = mobilenetv3.mobilenetv3_small_100(dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  feats = jax.eval_shape(module.apply, variables, x)
  assert all(f.dtype == jnp.bfloat16 for f in feats)


def _remat_units(granularity) -> int:
  """How many rematerialised calls the training gradient of mobilenetv3_small_050 traces."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  module = mobilenetv3.mobilenetv3_small_050(depthwise_impl="shift", remat=granularity)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)

  def loss(params, batch_stats, images):
    feats, _ = module.apply({"params": params, "batch_stats": batch_stats}, images,
                            train=True, mutable=["batch_stats"])
    return sum(jnp.mean(f ** 2) for f in feats)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"], x)
  # jax.checkpoint's primitive (printed 'checkpoint' or, by older jax, 'remat2').
  return len(re.findall(r"= (?:checkpoint|remat2)\[", str(jaxpr)))


@pytest.mark.slow  # traces the model per granularity (~12 CPU s); test_mobilevitv2 checks remat too
def test_remat_wraps_each_stage_or_block():
  # Tracing only (seconds); the numbers are compared in the slow test below.
  stages = len(mobilenetv3.build_blocks("small", 0.5, 1.0)[1])
  blocks = sum(len(s) for s in mobilenetv3.build_blocks("small", 0.5, 1.0)[1])
  assert _remat_units(False) == 0
  assert _remat_units("stage") == stages
  assert _remat_units(True) == stages
  assert _remat_units("block") == blocks > stages


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["stage", "block"])
def test_remat_same_tree_forward_and_gradients(granularity):
  """Backward compiles of the backbone take minutes on 2 CPU cores: slow only."""
  # Random weights of the smallest variant at 64x64: remat is a property of the backward
  # pass, so the gradients are the test; the values must be those of the plain module.
  x = jnp.asarray(images(64, 64, seed=2).transpose(0, 2, 3, 1))
  plain = mobilenetv3.mobilenetv3_small_050(depthwise_impl="shift")
  remat = mobilenetv3.mobilenetv3_small_050(depthwise_impl="shift", remat=granularity)
  variables = plain.init(jax.random.key(3), x)
  assert (jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(3), x))
          == jax.tree.structure(variables))

  def loss(module, params):
    feats, _ = module.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return sum(jnp.mean(f ** 2) for f in feats)

  want = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(variables["params"])
  got = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(variables["params"])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(want[1]))
  assert scale > 0
  diff = max(float(np.max(np.abs(a - b)))
             for a, b in zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1])))
  assert diff <= 1e-5 * scale, (diff, scale)


def test_remat_rejects_unknown_granularity():
  module = mobilenetv3.mobilenetv3_small_050(remat="layer")
  with pytest.raises(ValueError, match="remat must be"):
    module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
