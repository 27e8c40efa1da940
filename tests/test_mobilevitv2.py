"""models/mobilevitv2.py against timm's `mobilevitv2_*` features_only models.

Every feature is compared in float32 with non-trivial weights (random BatchNorm statistics and
affine, GroupNorm affine and conv biases), eval mode. The variable tree is checked for every
width; the forward pass on the smallest and the largest width (the teacher's), each in both
depthwise implementations at one size where the MobileViTv2 blocks see even maps (250x378 for
the 200: not a multiple of 32 either) and one where they see odd ones (65x97: the block input is
resized up with align_corners=True), plus one training-mode forward. The other widths differ
from these only in channel counts, which the variable-tree test pins.

XLA's optimisations are off for the forward comparisons (`fast_compile`): compiling the
200-wide backbone is most of this file's time, and the float32 tolerance holds unoptimised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mobileiqa_jax.weights import convert
from mobileiqa_jax.models import mobilevitv2
import support

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.torch

RTOL = 1e-5
WIDTHS = ("050", "075", "100", "125", "150", "175", "200")


def build_timm(name: str, seed: int = 0):
  """A timm features model with randomised norms and biases (eval mode)."""
  torch.manual_seed(seed)
  model = timm.create_model(
      name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3, 4))
  return support.randomize_torch(model, seed).eval()


@functools.lru_cache(maxsize=None)
def template(name: str, impl: str = "conv"):
  """Shapes of the Flax module's variables: the strict converter's target."""
  return convert.variables_template(mobilevitv2.BACKBONES[name](depthwise_impl=impl), (64, 64))


def to_flax(model, name: str, impl: str = "conv") -> dict:
  """timm state dict -> Flax variables via the project's converter (float32 numpy).

  Strict: raises `ConversionError` on any missing, unexpected or mis-shaped key. The converter
  copies (state_dict tensors alias the live BatchNorm buffers).
  """
  return convert.torch_to_flax(model.state_dict(), template(name, impl), source=name)


def shapes_of(tree) -> dict:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep=".").items()}


def images(h: int, w: int, seed: int = 0, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, 3, h, w)).astype(np.float32)


def rel_err(got, ref) -> float:
  return support.rel_err(got, support.nchw_to_nhwc(ref))


@functools.lru_cache(maxsize=None)
def jitted_apply(name: str, impl: str, train: bool = False):
  module = mobilevitv2.BACKBONES[name](depthwise_impl=impl)
  if train:
    return module, jax.jit(
        lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
  return module, jax.jit(lambda v, x: module.apply(v, x))


@functools.lru_cache(maxsize=None)
def timm_case(name: str):
  model = build_timm(name)
  return model, to_flax(model, name)


@functools.lru_cache(maxsize=None)
def timm_features(name: str, h: int, w: int):
  model, _ = timm_case(name)
  with torch.no_grad():
    return model(torch.from_numpy(images(h, w)))


def check_eval(name: str, impl: str, h: int, w: int) -> list[float]:
  model, variables = timm_case(name)
  module, apply = jitted_apply(name, impl)
  ref = timm_features(name, h, w)
  feats = apply(variables, jnp.asarray(images(h, w).transpose(0, 2, 3, 1)))
  assert len(feats) == 5
  assert tuple(f.shape[-1] for f in feats) == module.feature_channels
  assert tuple(f.shape[-1] for f in feats) == tuple(model.feature_info.channels())
  errs = [rel_err(f, r) for f, r in zip(feats, ref)]
  assert max(errs) <= RTOL, errs
  return errs


@pytest.mark.parametrize("name", [f"mobilevitv2_{w}" for w in WIDTHS])
def test_variable_tree_mirrors_state_dict(name):
  """Same keys and shapes both ways, for every width (no forward pass).

  The converter is strict: a key on one side only, or a shape mismatch, raises.
  """
  model = timm.create_model(name, pretrained=False, features_only=True,
                            out_indices=(0, 1, 2, 3, 4))
  module = mobilevitv2.BACKBONES[name](depthwise_impl="conv")
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  variables = convert.torch_to_flax(model.state_dict(), shapes, source=name)
  assert set(variables) == set(shapes) == {"params", "batch_stats"}
  assert shapes_of(variables) == shapes_of(shapes)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables))
  assert module.feature_channels == tuple(model.feature_info.channels())
  assert module.feature_strides == tuple(model.feature_info.reduction())


# Per width and depthwise form one even and one odd size at the blocks. 250x378 gives 32x48,
# 16x24 and 8x12 at the three MobileViTv2 blocks, 128x192 gives 16x24, 8x12 and 4x6; 65x97
# gives 9x13, 5x7 and 3x4 (resized up, kept), 32x33 (the smallest input) 4x5, 2x3 and 1x2.
@pytest.mark.parametrize("name,impl,hw", [
    ("mobilevitv2_200", "conv", (250, 378)), ("mobilevitv2_200", "shift", (250, 378)),
    ("mobilevitv2_200", "conv", (65, 97)), ("mobilevitv2_200", "shift", (65, 97)),
    ("mobilevitv2_050", "conv", (128, 192)), ("mobilevitv2_050", "shift", (128, 192)),
    ("mobilevitv2_050", "conv", (65, 97)), ("mobilevitv2_050", "shift", (32, 33)),
])
def test_eval_parity(name, impl, hw, fast_compile):
  errs = check_eval(name, impl, *hw)
  print(f"{name} {impl} {hw}: " + " ".join(f"{e:.2e}" for e in errs))


def test_train_mode_batch_stats(fast_compile):
  """Batch statistics in the forward and PyTorch's running-stat update (unbiased var)."""
  name = "mobilevitv2_050"
  model = build_timm(name, seed=1).train()
  variables = to_flax(model, name, "shift")  # a copy: the forward below updates the buffers
  _, apply = jitted_apply(name, "shift", True)
  x = images(65, 97, seed=1)
  with torch.no_grad():
    ref = model(torch.from_numpy(x))
  feats, updated = apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  errs = [rel_err(f, r) for f, r in zip(feats, ref)]
  assert max(errs) <= RTOL, errs
  want = traverse_util.flatten_dict(to_flax(model, name, "shift")["batch_stats"], sep=".")
  got = traverse_util.flatten_dict(updated["batch_stats"], sep=".")
  assert set(got) == set(want)
  # The converted inputs did not alias the buffers that the torch forward updated in place.
  before = traverse_util.flatten_dict(variables["batch_stats"], sep=".")
  assert all(not np.array_equal(before[k], want[k]) for k in want)
  stat_errs = {k: float(np.max(np.abs(np.asarray(got[k]) - want[k])) / np.max(np.abs(want[k])))
               for k in want}
  worst = max(stat_errs, key=stat_errs.get)
  assert stat_errs[worst] <= RTOL, (worst, stat_errs[worst])


def _remat_case(granularity=True):
  # 64x64, batch 2: at 32x32, batch 1, stage 4 normalises four copies of one pixel (var 0), which
  # makes gradients ill-conditioned enough that recomputation noise shows.
  x = jnp.asarray(images(64, 64).transpose(0, 2, 3, 1))
  plain = mobilevitv2.mobilevitv2_050(depthwise_impl="shift")
  remat = mobilevitv2.mobilevitv2_050(depthwise_impl="shift", remat=granularity)
  _, variables = timm_case("mobilevitv2_050")
  return x, plain, remat, variables


def _train_forward(module, x, variables):
  return jax.jit(lambda v: module.apply(v, x, train=True, mutable=["batch_stats"]))(variables)


@functools.lru_cache(maxsize=None)
def _plain_train_forward():
  """The remat tests' reference: compiled once for both granularities."""
  x, plain, _, variables = _remat_case()
  return _train_forward(plain, x, variables)


@pytest.mark.parametrize("granularity", [True, "block"])
def test_remat_same_tree_and_forward(granularity):
  x, _, remat, variables = _remat_case(granularity)
  shapes = jax.eval_shape(remat.init, jax.random.key(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  want, got = _plain_train_forward(), _train_forward(remat, x, variables)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("granularity", [True, "block"])
def test_remat_same_gradients(granularity):
  """Backward compiles are slow on CPU (~20 s each): deselected by default."""
  x, plain, remat, variables = _remat_case(granularity)

  def loss(module, params):
    feats, _ = module.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return sum(jnp.mean(f ** 2) for f in feats)

  g_plain = jax.jit(jax.grad(functools.partial(loss, plain)))(variables["params"])
  g_remat = jax.jit(jax.grad(functools.partial(loss, remat)))(variables["params"])
  # Recomputation reorders float32 sums, and some leaves (a GroupNorm bias feeding a 1x1 conv
  # and a training-mode BatchNorm) have a true gradient of 0: compare on the global scale.
  scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(g_plain))
  diff = max(float(np.max(np.abs(a - b)))
             for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)))
  assert diff <= 1e-4 * scale, (diff, scale)


def test_bfloat16_compute_keeps_float32_params():
  module = mobilevitv2.mobilevitv2_050(depthwise_impl="shift", dtype=jnp.bfloat16)
  x = jnp.zeros((1, 33, 47, 3))
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
  _, variables = timm_case("mobilevitv2_050")
  feats = jax.jit(module.apply)(variables, x)
  assert all(f.dtype == jnp.bfloat16 for f in feats)
  assert [f.shape[1:3] for f in feats] == [(17, 24), (9, 12), (6, 6), (4, 4), (2, 2)]
