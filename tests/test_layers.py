"""The PyTorch-exact blocks of models/layers.py against PyTorch itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileiqa_jax.models import layers

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("in_hw,out", [((44, 44), 22), ((16, 16), 22), ((77, 119), 22),
                                       ((616, 954), 22), ((5, 3), 4),
                                       ((4, 3), 22), ((30, 22), 22), ((13, 29), 22)])
def test_adaptive_avg_pool_matches_torch(in_hw, out):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  ref = _nhwc(F.adaptive_avg_pool2d(_nchw(x), out))
  got = layers.adaptive_avg_pool2d(jnp.asarray(x), out)
  assert got.shape == ref.shape
  # Summation order differs from PyTorch's: float32 rounding, not a window error.
  assert _rel(got, ref) <= 5e-6


@pytest.mark.parametrize("in_hw,out_hw", [((7, 9), (8, 10)), ((33, 48), (34, 48)),
                                          ((5, 5), (6, 6))])
def test_align_corners_resize_matches_torch(in_hw, out_hw):
  x = np.random.default_rng(1).normal(size=(2, *in_hw, 4)).astype(np.float32)
  ref = _nhwc(F.interpolate(_nchw(x), size=out_hw, mode="bilinear", align_corners=True))
  got = layers.resize_bilinear_align_corners(jnp.asarray(x), out_hw)
  assert _rel(got, ref) <= 1e-6


@pytest.mark.parametrize("impl", ["conv", "shift"])
@pytest.mark.parametrize("k,s,d,hw", [(3, 1, 1, (9, 11)), (3, 2, 1, (9, 11)),
                                      (5, 2, 1, (10, 13)), (3, 1, 2, (8, 8))])
def test_depthwise_conv_matches_torch(impl, k, s, d, hw):
  c = 6
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, *hw, c)).astype(np.float32)
  w = rng.normal(size=(c, 1, k, k)).astype(np.float32)
  ref = _nhwc(F.conv2d(_nchw(x), torch.from_numpy(w), stride=s,
                       padding=layers.torch_padding(k, s, d), dilation=d, groups=c))
  mod = layers.DepthwiseConv2d(c, k, s, d, impl=impl)
  params = {"params": {"kernel": jnp.asarray(np.transpose(w, (2, 3, 1, 0)))}}
  got = mod.apply(params, jnp.asarray(x))
  assert got.shape == ref.shape
  assert _rel(got, ref) <= 1e-6


@pytest.mark.parametrize("impl", ["conv", "shift", "shift_slices"])
@pytest.mark.parametrize("k,s,d,hw", [(3, 1, 1, (9, 11)), (3, 2, 1, (9, 11)),
                                      (3, 2, 1, (10, 12)), (5, 1, 1, (8, 7)),
                                      (5, 2, 1, (10, 13)), (3, 1, 2, (9, 10)),
                                      (3, 2, 2, (11, 9)), (3, 2, 1, (1, 4)),
                                      (5, 2, 1, (2, 3))])
def test_depthwise_conv_gradients_match_torch(impl, k, s, d, hw):
  # Every impl takes its gradients from custom VJPs ('conv' its kernel gradient, 'shift'
  # both; 'shift_slices' another stride-2 input gradient); each must equal autograd.
  # ('conv' with dilation is XLA's own gradient.)
  c = 5
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, *hw, c)).astype(np.float32)
  w = rng.normal(size=(c, 1, k, k)).astype(np.float32)
  xt = _nchw(x).requires_grad_(True)
  wt = torch.from_numpy(w).requires_grad_(True)
  yt = F.conv2d(xt, wt, stride=s, padding=layers.torch_padding(k, s, d), dilation=d,
                groups=c)
  cot = rng.normal(size=_nhwc(yt).shape).astype(np.float32)
  yt.backward(_nchw(cot))
  mod = layers.DepthwiseConv2d(c, k, s, d, impl=impl)

  def loss(kernel, xx):
    return jnp.sum(mod.apply({"params": {"kernel": kernel}}, xx) * cot)

  gk, gx = jax.grad(loss, (0, 1))(jnp.asarray(np.transpose(w, (2, 3, 1, 0))), jnp.asarray(x))
  assert _rel(gx, _nhwc(xt.grad)) <= 1e-5
  assert _rel(gk, np.transpose(wt.grad.numpy(), (2, 3, 1, 0))) <= 1e-5


def _strided_slices(jaxpr) -> list:
  """Every slice with a stride > 1 in `jaxpr` and the jaxprs inside it (custom VJPs, jits)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "slice" and any(s > 1 for s in eqn.params["strides"] or ()):
      found.append(eqn)
    for v in eqn.params.values():
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        found += _strided_slices(inner)
  return found


@pytest.mark.parametrize("k", [3, 5])
def test_stride_two_shift_reads_the_map_through_its_four_phases(k):
  # The TPU form ('shift' at stride 2): four strided slices of the map itself, the k*k taps
  # unstrided slices of those, forward and in the kernel gradient; not k*k strided slices of
  # the padded map, which a TPU reads whole each time (docs/performance.md).
  x = jnp.ones((2, 9, 11, 4))
  mod = layers.DepthwiseConv2d(4, k, 2, impl="shift")
  params = mod.init(jax.random.PRNGKey(0), x)
  forward = _strided_slices(jax.make_jaxpr(lambda v: mod.apply(params, v))(x).jaxpr)
  assert len(forward) == 4 and all(e.invars[0].aval.shape == x.shape for e in forward)
  kernel_grad = jax.make_jaxpr(jax.grad(
      lambda p: jnp.sum(mod.apply(p, x) ** 2)))(params).jaxpr
  strided = _strided_slices(kernel_grad)
  assert len(strided) == 8 and all(e.invars[0].aval.shape == x.shape for e in strided)


def test_group_norm_1_matches_torch():
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(3, 7, 9, 16)) * 3 + 1).astype(np.float32)
  scale, bias = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
  gn = torch.nn.GroupNorm(1, 16)
  with torch.no_grad():
    gn.weight.copy_(torch.from_numpy(scale))
    gn.bias.copy_(torch.from_numpy(bias))
    ref = _nhwc(gn(_nchw(x)))
  got = layers.group_norm_1().apply(
      {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}, jnp.asarray(x))
  assert _rel(got, ref) <= 2e-6


def test_activations_match_torch():
  x = np.linspace(-6, 6, 1001).astype(np.float32)
  t = torch.from_numpy(x)
  np.testing.assert_allclose(layers.hard_swish(jnp.asarray(x)), F.hardswish(t), atol=1e-6)
  np.testing.assert_allclose(layers.hard_sigmoid(jnp.asarray(x)), F.hardsigmoid(t), atol=1e-6)
  np.testing.assert_allclose(layers.gelu(jnp.asarray(x)), F.gelu(t), atol=1e-6)


def test_gelu_is_the_erf_form_and_the_export_form_is_jax_nn_gelu():
  # The erf form (PyTorch's own) rather than jax.nn.gelu's erfc, which XLA expands into an
  # exp and two polynomials (5.8x slower on CPU); the ONNX export asks for jax.nn.gelu, which
  # jax2onnx maps to one Gelu op. Both are the same function to float32 rounding.
  x = jnp.asarray(np.random.default_rng(0).normal(size=4096).astype(np.float32) * 4)
  primitives = {e.primitive.name for e in jax.make_jaxpr(layers.gelu)(x).eqns}
  assert "erf" in primitives and "erfc" not in primitives, primitives
  exported = {e.primitive.name for e in jax.make_jaxpr(lambda v: layers.gelu(v, "jax_nn"))(x).eqns}
  np.testing.assert_allclose(layers.gelu(x, "jax_nn"), F.gelu(torch.from_numpy(np.asarray(x))),
                             atol=2e-6)
  assert "erfc" in exported, exported
  np.testing.assert_allclose(layers.gelu(x), F.gelu(torch.from_numpy(np.asarray(x))), atol=2e-6)


def test_torch_padding_is_symmetric_timm_rule():
  assert layers.torch_padding(3, 2) == 1
  assert layers.torch_padding(5, 2) == 2
  assert layers.torch_padding(1, 2) == 0
  assert layers.torch_padding(3, 1, 2) == 2


@pytest.mark.parametrize("hw", [(9, 11), (16, 16), (1, 2)])
def test_space_to_depth_stem_is_the_3x3_stride_2_conv(hw):
  """The TPU stem form against the stem convolution as torch runs it: forward and gradients."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *hw, 3)).astype(np.float32)
  g = rng.standard_normal((2, (hw[0] + 1) // 2, (hw[1] + 1) // 2, 8)).astype(np.float32)
  stem = layers.stem_conv(8, "space_to_depth", name="conv_stem")
  variables = stem.init(jax.random.PRNGKey(0), jnp.asarray(x))
  kernel = np.asarray(variables["params"]["kernel"])
  assert kernel.shape == (3, 3, 3, 8)  # the 3x3 form's variable, unchanged
  y, vjp = jax.vjp(lambda v, xx: stem.apply(v, xx), variables, jnp.asarray(x))
  dv, dx = vjp(jnp.asarray(g))

  xt = _nchw(x).requires_grad_()
  wt = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).requires_grad_()
  yt = F.conv2d(xt, wt, stride=2, padding=1)
  yt.backward(_nchw(g))
  assert _rel(y, _nhwc(yt)) < 1e-6
  assert _rel(dx, _nhwc(xt.grad)) < 1e-6
  assert _rel(dv["params"]["kernel"], wt.grad.numpy().transpose(2, 3, 1, 0)) < 1e-6
  # The 3x3 form builds the same variable from the same key.
  conv = layers.stem_conv(8, "conv", name="conv_stem").init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(conv["params"]["kernel"], kernel)
  with pytest.raises(ValueError, match="stem"):
    layers.stem_conv(8, "pixel_shuffle")
