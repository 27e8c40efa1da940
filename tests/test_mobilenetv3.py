"""Parity of the Flax MobileNetV3 with timm's `features_only` models (eval and training)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mobileiqa_jax.models import mobilenetv3

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

RTOL = 1e-5
BATCH = 2


def torch_to_flax(state_dict) -> dict:
  """timm state dict -> Flax variables by the naming rule the converter uses.

  Module path split on '.'; conv OIHW -> HWIO; Linear (out, in) -> (in, out); BN weight ->
  scale, running_mean/var -> batch_stats mean/var; num_batches_tracked dropped.
  """
  params, stats = {}, {}
  for key, tensor in state_dict.items():
    *path, leaf = key.split(".")
    if leaf == "num_batches_tracked":
      continue
    a = tensor.detach().cpu().numpy().copy()  # state_dict tensors alias live buffers.
    if leaf in ("running_mean", "running_var"):
      stats[tuple(path) + (leaf.removeprefix("running_"),)] = a
      continue
    if leaf == "weight":
      if a.ndim == 4:
        a, leaf = a.transpose(2, 3, 1, 0), "kernel"
      elif a.ndim == 2:
        a, leaf = a.T, "kernel"
      else:
        leaf = "scale"
    params[tuple(path) + (leaf,)] = a
  out = {"params": traverse_util.unflatten_dict(params)}
  if stats:
    out["batch_stats"] = traverse_util.unflatten_dict(stats)
  return jax.tree.map(jnp.asarray, out)


def assert_same_tree(converted, reference):
  """Key sets equal both ways (names listed on failure) and shapes equal."""
  for col in ("params", "batch_stats"):
    a = traverse_util.flatten_dict(converted[col], sep=".")
    b = traverse_util.flatten_dict(reference[col], sep=".")
    assert not set(a) - set(b), f"{col} only in torch: {sorted(set(a) - set(b))}"
    assert not set(b) - set(a), f"{col} only in flax: {sorted(set(b) - set(a))}"
    bad = [k for k in a if a[k].shape != b[k].shape]
    assert not bad, f"{col} shape mismatch: {[(k, a[k].shape, b[k].shape) for k in bad]}"


def randomize(model, seed: int = 0):
  """Non-trivial BN statistics and affine params, non-zero biases (fresh 0/1 hide bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
      elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
  return model


@functools.lru_cache(maxsize=None)
def timm_model(variant: str):
  torch.manual_seed(0)
  model = timm.create_model(variant, pretrained=False, features_only=True)
  return randomize(model).eval()


@functools.lru_cache(maxsize=None)
def jitted_apply(variant: str, impl: str, train: bool):
  module = mobilenetv3.create_mobilenetv3(variant, depthwise_impl=impl)
  if train:
    return module, jax.jit(
        lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
  return module, jax.jit(lambda v, x: module.apply(v, x))


def images(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(BATCH, 3, h, w)).astype(np.float32)


def rel_err(jax_nhwc, torch_nchw) -> float:
  ref = torch_nchw.detach().numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax_nhwc)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def check_eval(variant: str, impl: str, h: int, w: int):
  tm = timm_model(variant)
  module, apply = jitted_apply(variant, impl, False)
  x = images(h, w)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x))
  feats = apply(torch_to_flax(tm.state_dict()), jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert len(feats) == len(ref) == 5
  assert tuple(f.shape[-1] for f in feats) == module.feature_channels
  errs = [rel_err(f, r) for f, r in zip(feats, ref)]
  assert max(errs) <= RTOL, f"{variant} {impl} {h}x{w}: {errs}"
  print(f"\n{variant} {impl} {h}x{w} max rel err per feature: "
        + ", ".join(f"{e:.2e}" for e in errs))
  for f, s in zip(feats, module.feature_strides):
    # Symmetric padding: ceil division at each stride-2 layer.
    assert f.shape[1:3] == (-(-h // s), -(-w // s))
  return errs


@pytest.mark.parametrize("variant", sorted(mobilenetv3.VARIANTS))
def test_variable_tree_mirrors_state_dict(variant):
  tm = timm.create_model(variant, pretrained=False, features_only=True)
  module = mobilenetv3.create_mobilenetv3(variant)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert_same_tree(torch_to_flax(tm.state_dict()), shapes)
  assert module.feature_channels == tuple(tm.feature_info.channels())
  assert module.feature_strides == tuple(tm.feature_info.reduction())


@pytest.mark.parametrize("impl", ["conv", "shift"])
@pytest.mark.parametrize("hw", [(256, 256), (250, 378)])
def test_large_100_eval_parity(impl, hw):
  check_eval("mobilenetv3_large_100", impl, *hw)


@pytest.mark.parametrize("variant,hw", [
    ("mobilenetv3_small_100", (97, 65)),
    ("mobilenetv3_large_075", (32, 47)),  # the smallest input side the issue allows
])
def test_other_variants_eval_parity(variant, hw):
  check_eval(variant, "conv", *hw)


def test_large_100_train_mode():
  """Batch statistics in the forward and PyTorch's running-stat update (unbiased var)."""
  variant, impl = "mobilenetv3_large_100", "shift"
  tm = timm.create_model(variant, pretrained=False, features_only=True)
  randomize(tm, seed=1).train()
  variables = torch_to_flax(tm.state_dict())
  _, apply = jitted_apply(variant, impl, True)
  x = images(67, 90, seed=1)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x))
  feats, updated = apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  errs = [rel_err(f, r) for f, r in zip(feats, ref)]
  print(f"\ntrain {impl}: features " + ", ".join(f"{e:.2e}" for e in errs))
  assert max(errs) <= RTOL, errs
  want = traverse_util.flatten_dict(torch_to_flax(tm.state_dict())["batch_stats"], sep=".")
  got = traverse_util.flatten_dict(updated["batch_stats"], sep=".")
  assert set(got) == set(want)
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
