"""PyTorch-exact building blocks shared by the backbones and the head.

Everything here works in NHWC. Each block reproduces the PyTorch/timm operation it stands for
to float32 rounding; the comments name the PyTorch behaviour that a plain Flax/JAX call would
get wrong.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobileiqa_jax.models import runtime

Dtype = Any

# Named scopes around the operations a MAC counter counts per element rather than per
# multiply (normalisation, pooling, resizing); `profiling/macs.py` reads them. The colon keeps
# them apart from Flax module names such as `norm`.
NORM_SCOPE = "mac:norm"
RESIZE_SCOPE = "mac:resize"
POOL_SCOPE = "mac:pool"


#: Initialisations of the head's Conv/Linear layers: 'torch' (PyTorch's defaults, what the
#: authors' head starts from) or 'flax' (Flax's defaults).
HEAD_INITS = ("torch", "flax")


def _uniform(bound: float) -> Callable[..., jax.Array]:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def dense_initializers(head_init: str, fan_in: int) -> tuple[Callable[..., jax.Array],
                                                              Callable[..., jax.Array]]:
  """(kernel_init, bias_init) of a Conv or Linear layer with `fan_in` inputs per output.

  'torch': `nn.Conv2d` / `nn.Linear`'s `reset_parameters`: `kaiming_uniform_(a=sqrt(5))`
  for the weight, which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias from the same
  U(+-1/sqrt(fan_in)); fan_in = in_channels / groups * kh * kw (conv) or in_features.
  'flax': Flax's `lecun_normal` kernel (std 1/sqrt(fan_in), sqrt(3) times the torch one)
  and zero bias.
  """
  if head_init == "torch":
    bound = 1.0 / float(np.sqrt(fan_in))
    return _uniform(bound), _uniform(bound)
  if head_init == "flax":
    return nn.initializers.lecun_normal(), nn.initializers.zeros
  raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}.")


def torch_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
  """Symmetric padding per side that timm's `create_conv2d(padding='')` uses.

  Flax's 'SAME' pads asymmetrically at stride 2 and shifts the output by whole pixels.
  """
  return ((stride - 1) + dilation * (kernel_size - 1)) // 2


@jax.custom_vjp
def tie_grads(x: Any, params: Any) -> tuple[Any, Any]:
  """The identity on `(x, params)`; in the backward pass x's gradient waits for params'.

  A layer that applies it to its input and its weights before using them hands its input
  gradient to the layer before it only once its own weight gradient is computed, so the
  activations that weight gradient reads (a reduction over the whole map) are freed layer by
  layer (`runtime.Runtime.tie_weight_grads`). Nothing else forces that order: in a
  data-parallel step on GPUs each weight gradient feeds an asynchronous all-reduce, and
  XLA:GPU then scheduled the weight gradients late, keeping the recomputed activations of
  several blocks alive at once.
  """
  return x, params


def _tie_grads_fwd(x, params):
  return (x, params), None


def _tie_grads_bwd(_, cotangents):
  return jax.lax.optimization_barrier(cotangents)


tie_grads.defvjp(_tie_grads_fwd, _tie_grads_bwd)


def _tied_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
  """`jax.lax.conv_general_dilated` with its input and kernel gradients tied (`tie_grads`)."""
  lhs, rhs = tie_grads(lhs, rhs)
  return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


class PointwiseConv(nn.Module):
  """A 1x1 `torch.nn.Conv2d` (stride 1, no groups) as a matmul over channels.

  Variables as `nn.Conv` names and initialises them (kernel (1, 1, in, out) lecun_normal,
  bias zeros), so checkpoints and the converter see no difference. Why not `nn.Conv`: XLA's
  TPU convolution emitter picks its own tiled layout for a 1x1 convolution (batch folded into
  the width, the width padded), so a chain of them with norms and activations between (the
  MobileViTv2 transformer) is wrapped in relayout copies of every map; as a dot_general it
  reads and writes the maps in the layout of the elementwise ops around it. Next to XLA's
  grouped convolution (depthwise impl 'conv'), which keeps the emitter's layout, `nn.Conv`
  measured cheaper (TPU v5e compiles, benchmarks/layer_traffic.py), so the blocks pick the
  1x1 form by their depthwise impl.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  tie: bool = False  # `tie_grads` on the input and the weights

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    if self.tie:
      x, (kernel, bias) = tie_grads(x, (kernel, bias))
    y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    if self.use_bias:
      y = y + bias.astype(self.dtype)
    return y


def conv2d(
    features: int,
    kernel_size: int,
    stride: int = 1,
    *,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    padding: int | None = None,
    dtype: Dtype = jnp.float32,
    tie: bool = False,
    name: str | None = None,
) -> nn.Conv:
  """A `torch.nn.Conv2d` with timm's default symmetric padding (params: kernel HWIO, bias).

  `tie`: the input and kernel gradients are tied (`tie_grads`).
  """
  pad = torch_padding(kernel_size, stride, dilation) if padding is None else padding
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation),
      feature_group_count=groups,
      use_bias=use_bias,
      dtype=dtype,
      conv_general_dilated=_tied_conv_general_dilated if tie else None,
      name=name,
  )


def _space_to_depth_input(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, ceil(H/2) + 1, ceil(W/2) + 1, 4C): the 2x2 pixel blocks of x padded by
  one pixel on top and left (and with zeros to an even size), channel (row, column, c)."""
  _, h, w, _ = x.shape
  hb, wb = (h + 3) // 2, (w + 3) // 2
  x = jnp.pad(x, ((0, 0), (1, 2 * hb - h - 1), (1, 2 * wb - w - 1), (0, 0)))
  # Four strided slices, not a 6-D reshape and transpose: on a TPU the latter's relayout of a
  # 3-channel image did not finish compiling in minutes.
  return jnp.concatenate([x[:, a::2, b::2] for a in (0, 1) for b in (0, 1)], axis=-1)


def _space_to_depth_kernel(kernel: jax.Array) -> jax.Array:
  """(3, 3, C, O) -> (2, 2, 4C, O): tap (2i + a, 2j + b) of the 3x3 kernel (zero past 2) at
  block offset (i, j), channel (a, b, c), matching `_space_to_depth_input`."""
  _, _, c, o = kernel.shape
  k = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0))).reshape(2, 2, 2, 2, c, o)
  return k.transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * c, o)


class SpaceToDepthConv(nn.Module):
  """`conv2d(features, 3, 2, use_bias=False)` (timm's stems) as a 2x2 convolution on the
  space-to-depth image. The same variable (`kernel`, (3, 3, C, O) HWIO, Flax's Conv init) and
  the same function to float32 rounding.

  On a TPU a 3-channel input fills 3 of a tile's 128 lanes, and XLA re-lays the image out
  several times around the 3x3 stride-2 convolution; on 12 channels it does not
  (docs/performance.md). `runtime.Runtime.stem` picks it.
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    return jax.lax.conv_general_dilated(
        _space_to_depth_input(x.astype(self.dtype)),
        _space_to_depth_kernel(kernel).astype(self.dtype), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def stem_conv(features: int, stem: str, *, dtype: Dtype = jnp.float32, tie: bool = False,
              name: str | None = None) -> nn.Module:
  """A backbone's 3x3 stride-2 stem convolution (no bias) in the `stem` form (`runtime.STEMS`).

  Same variables in either form.
  """
  if stem == "space_to_depth":
    if tie:
      raise ValueError("the space-to-depth stem has no tied-gradient form; use stem='conv' "
                       "with tie_weight_grads")
    return SpaceToDepthConv(features, dtype=dtype, name=name)
  if stem != "conv":
    raise ValueError(f"stem must be one of {runtime.STEMS}, got {stem!r}")
  return conv2d(features, 3, 2, use_bias=False, dtype=dtype, tie=tie, name=name)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
  """timm's `make_divisible`: nearest multiple of `divisor`, never more than 10% below `v`."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


#: The depthwise form of a module built without one: `runtime.DEFAULT`'s, host-independent.
#: Entry points choose the platform's form through `runtime.Runtime`.
DEFAULT_DEPTHWISE_IMPL = runtime.DEFAULT.depthwise_impl


def pointwise_as_matmul(depthwise_impl: str) -> bool:
  """Whether the 1x1 convs of a block around a depthwise conv of this impl are matmuls.

  Beside the 'shift' depthwise (elementwise, in the map's own layout) they are
  `PointwiseConv`s, so no op asks for another layout; beside XLA's grouped conv, whose
  layouts `nn.Conv` shares, they stay convs. Measured on TPU v5e (benchmarks/layer_traffic.py,
  MobileViTv2 stage 1 block 1, GB per image): 7.1 conv + conv, 11.9 shift + conv, 4.1 shift +
  matmul.
  """
  return depthwise_impl in ("shift", "shift_slices")


def _grouped_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int,
                  dilation: int = 1) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


def _grouped_conv_input_grad(g: jax.Array, kernel: jax.Array, in_hw: tuple[int, int],
                             stride: int, pad: int, dilation: int = 1) -> jax.Array:
  """The input gradient of `_grouped_conv`: g dilated by the stride, flipped-kernel conv."""
  k, s, d = kernel.shape[0], stride, dilation
  pads = [(d * (k - 1) - pad, n + pad - (s * (o - 1) + 1))
          for n, o in zip(in_hw, g.shape[1:3])]
  return jax.lax.conv_general_dilated(
      g, kernel[::-1, ::-1], window_strides=(1, 1), padding=pads, lhs_dilation=(s, s),
      rhs_dilation=(d, d), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=g.shape[-1])


def _tap(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], stride: int) -> jax.Array:
  """xp[:, i + s*h, j + s*w, :] for every output pixel (h, w): one (strided) slice."""
  (oh, ow), s = out_hw, stride
  return jax.lax.slice(xp, (0, i, j, 0),
                       (xp.shape[0], i + s * (oh - 1) + 1, j + s * (ow - 1) + 1, xp.shape[3]),
                       (1, s, s, 1))


def _kernel_grad(tap: Callable[[int, int], jax.Array], g: jax.Array, k: int) -> jax.Array:
  """dW[i, j, 0, c] = sum over (b, h, w) of tap(i, j)[b, h, w, c] * g[b, h, w, c].

  k*k reductions over the input's taps and g, which XLA fuses into passes that read both
  directly (float32 sums)."""
  taps = [jnp.sum((tap(i, j) * g).astype(jnp.float32), axis=(0, 1, 2))
          for i in range(k) for j in range(k)]
  return jnp.stack(taps).reshape(k, k, 1, g.shape[-1])


def _padded_taps(xp: jax.Array, out_hw: tuple[int, int], stride: int,
                 dilation: int = 1) -> Callable[[int, int], jax.Array]:
  """Tap (i, j) of the padded map xp: a (strided) slice of it per tap."""
  return lambda i, j: _tap(xp, i * dilation, j * dilation, out_hw, stride)


def _pad_hw(x: jax.Array, lo: int, hi: int) -> jax.Array:
  zero = jnp.zeros((), x.dtype)
  return jax.lax.pad(x, zero, ((0, 0, 0), (lo, hi, 0), (lo, hi, 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """Depthwise conv (no dilation) with its kernel gradient as k*k fused reductions.

  XLA's own kernel gradient of a grouped convolution (a `batch_group_count` convolution) on
  TPU first writes the input with its k width taps side by side, k times the map, and reads
  it back: at the paper's resolution that made a depthwise layer's training step several
  times the traffic of the same layer without a kernel gradient (TPU v5e compiles; see
  benchmarks/layer_traffic.py). Here the kernel gradient is `_kernel_grad`'s reductions,
  with g zero-interleaved for stride > 1 so that every tap is an unstrided slice (measured
  cheaper next to the conv's layouts). The input gradient is the transposed convolution.
  """
  return _grouped_conv(x, kernel, stride, pad)


def _depthwise_conv_fwd(x, kernel, stride, pad):
  return _grouped_conv(x, kernel, stride, pad), (x, kernel)


def _depthwise_conv_bwd(stride, pad, res, g):
  x, kernel = res
  k, s = kernel.shape[0], stride
  dx = _grouped_conv_input_grad(g, kernel, x.shape[1:3], s, pad)
  if s > 1:
    g = jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (0, 0, s - 1), (0, 0, s - 1),
                                                (0, 0, 0)))
  dk = _kernel_grad(_padded_taps(_pad_hw(x, pad, pad), g.shape[1:3], 1), g, k)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def _shift_sum(tap: Callable[[int, int], jax.Array], kernel: jax.Array) -> jax.Array:
  """sum over taps (i, j) of tap(i, j) * kernel[i, j]: one fused elementwise pass."""
  k = kernel.shape[0]
  y = None
  for i in range(k):
    for j in range(k):
      term = tap(i, j) * kernel[i, j, 0]
      y = term if y is None else y + term
  return y


def _phases(x: jax.Array, pad: int, k: int, out_hw: tuple[int, int], stride: int
            ) -> dict[tuple[int, int], jax.Array]:
  """The padded map's stride x stride phases: {(a, b): xp[:, a::s, b::s, :]}.

  Tap (i, j) of a stride-s window is then the unstrided slice [i // s:, j // s:] of phase
  (i % s, j % s), so a strided layer reads s*s quarter-size maps instead of k*k strided
  slices of the whole one (each of which a TPU reads whole: its (8, 128) tiles span rows).
  """
  s = stride
  zero = jnp.zeros((), x.dtype)
  out = {}
  for a in range(min(s, k)):
    for b in range(min(s, k)):
      # Phase (a, b) of xp (x padded by `pad`) holds xp[a + s*m] = x[a + s*m - pad]: zeros for
      # the first m0 rows (still in the padding), then every s-th row of x from a + s*m0 - pad;
      # as many rows as the windows reach, ceil((s * (o - 1) + k - a) / s).
      starts, pads = [], []
      for n, o, off in zip(x.shape[1:3], out_hw, (a, b)):
        m0 = max(0, -(-(pad - off) // s))
        start = min(off + s * m0 - pad, n)
        rows = -(-(s * (o - 1) + k - off) // s)
        starts.append(start)
        pads.append((m0, rows - m0 - len(range(start, n, s)), 0))
      strided = jax.lax.slice(x, (0, starts[0], starts[1], 0), x.shape, (1, s, s, 1))
      out[(a, b)] = jax.lax.pad(strided, zero, ((0, 0, 0), pads[0], pads[1], (0, 0, 0)))
  return out


def _phase_taps(x: jax.Array, pad: int, k: int, out_hw: tuple[int, int],
                stride: int) -> Callable[[int, int], jax.Array]:
  """Tap (i, j) of x padded by `pad`, read through `_phases` (stride > 1, no dilation)."""
  phases = _phases(x, pad, k, out_hw, stride)

  def tap(i: int, j: int) -> jax.Array:
    p = phases[(i % stride, j % stride)]
    (oh, ow), di, dj = out_hw, i // stride, j // stride
    return jax.lax.slice(p, (0, di, dj, 0), (p.shape[0], di + oh, dj + ow, p.shape[3]))
  return tap


def _input_taps(x: jax.Array, pad: int, k: int, out_hw: tuple[int, int], stride: int,
                dilation: int, strided_grad: str) -> Callable[[int, int], jax.Array]:
  """The taps `_depthwise_shift` reads x through: its phases where the layer is strided with
  the 'conv' input gradient (TPU), else slices of the padded map."""
  if stride > 1 and dilation == 1 and strided_grad == "conv":
    return _phase_taps(x, pad, k, out_hw, stride)
  return _padded_taps(_pad_hw(x, pad, pad), out_hw, stride, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _depthwise_shift(x: jax.Array, kernel: jax.Array, stride: int, pad: int,
                     dilation: int, strided_grad: str = "conv") -> jax.Array:
  """Depthwise conv as k*k shifted (strided) slices times per-channel weights.

  Autodiff of the slices would transpose each into a padded map of its own (k*k maps
  written in the backward pass). The custom gradient instead computes, in the map's own
  layout: for stride 1 the input gradient as the same shift-sum over g with the flipped
  kernel, and the kernel gradient as `_kernel_grad`'s fused reductions. For stride > 1 the
  input gradient is `strided_grad`'s form: 'conv', the transposed grouped conv (TPU: cheaper
  there than a shift-sum over a zero-interleaved g, 8.5 vs 14.4 GB for a 616x954x256 layer on
  a v5e), or 'slices', the transpose of the strided slices (each tap's g * w padded back into
  place, summed in one fusion: XLA:CPU runs the grouped conv's form naively, 69 ms against
  0.7 ms for 32 x 16 x 16 x 128 at stride 2).

  With the 'conv' input gradient (TPU) a stride-2 layer reads x through its 2 x 2 phases
  (`_phases`), forward and in the kernel gradient: v5e, benchmarks/layer_traffic.py, GB per
  image, MobileViTv2-200 stage 1 block 0's training step 9.25 -> 7.12 and its forward
  3.50 -> 1.75; stage 2 block 0 5.52 -> 4.16 and 1.78 -> 0.80. The 'slices' gradient
  (CPU) transposes the strided slices' form, which XLA:CPU runs fast as it is.
  """
  k = kernel.shape[0]
  out_hw = tuple((n + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for n in x.shape[1:3])
  return _shift_sum(_input_taps(x, pad, k, out_hw, stride, dilation, strided_grad), kernel)


def _depthwise_shift_fwd(x, kernel, stride, pad, dilation, strided_grad):
  return _depthwise_shift(x, kernel, stride, pad, dilation, strided_grad), (x, kernel)


def _depthwise_shift_bwd(stride, pad, dilation, strided_grad, res, g):
  x, kernel = res
  k, s, d = kernel.shape[0], stride, dilation
  if s == 1:
    # y[p] = sum_i x[p - pad + d*i] w[i], so dx[q] = sum_i g[q + pad - d*i] w[i]: the same
    # shift-sum over g padded by d*(k-1) - pad on each side, kernel flipped.
    edge = d * (k - 1) - pad
    dx = _shift_sum(_padded_taps(_pad_hw(g, edge, edge), x.shape[1:3], 1, d),
                    kernel[::-1, ::-1])
  elif strided_grad == "slices":
    shift = lambda x: _shift_sum(_padded_taps(_pad_hw(x, pad, pad), g.shape[1:3], s, d),
                                 kernel)
    dx, = jax.linear_transpose(shift, x)(g)
  else:
    dx = _grouped_conv_input_grad(g, kernel, x.shape[1:3], s, pad, d)
  dk = _kernel_grad(_input_taps(x, pad, k, g.shape[1:3], s, d, strided_grad), g, k)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


class DepthwiseConv2d(nn.Module):
  """Depthwise `Conv2d(C, C, k, groups=C)` with two exact implementations.

  `impl='conv'` is XLA's grouped convolution (cuDNN on GPU); `impl='shift'` sums k*k
  strided, shifted slices times per-channel weights, which XLA fuses into one pass (CPU and
  TPU; see `runtime.depthwise_impl_for`); `impl='shift_slices'` is 'shift' whose stride > 1
  input gradient transposes the slices rather than the convolution (CPU's stride-2 blocks).
  All three read the same parameters, laid out as `nn.Conv` would: kernel (k, k, 1, C).
  """

  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  impl: str = DEFAULT_DEPTHWISE_IMPL
  dtype: Dtype = jnp.float32
  tie: bool = False  # `tie_grads` on the input and the weights

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, d = self.kernel_size, self.stride, self.dilation
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(), (k, k, 1, self.features), jnp.float32
    )
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    if self.tie:
      x, (kernel, bias) = tie_grads(x, (kernel, bias))
    pad = torch_padding(k, s, d)
    impl = self.impl
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if impl == "conv":
      if d == 1:
        y = _depthwise_conv(x, kernel, s, pad)
      else:
        y = _grouped_conv(x, kernel, s, pad, d)
    elif impl in ("shift", "shift_slices"):
      y = _depthwise_shift(x, kernel, s, pad, d, "slices" if impl == "shift_slices" else "conv")
    else:
      raise ValueError(
          f"DepthwiseConv2d impl must be 'conv', 'shift' or 'shift_slices', got {impl!r}.")
    if self.use_bias:
      y = y + bias.astype(self.dtype)
    return y


def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Module:
  """`torch.nn.BatchNorm2d` with its defaults (eps 1e-5, momentum 0.1), training included.

  In training, statistics are taken over every axis but channels of the array the step sees;
  under `jax.jit` with a batch sharded over devices and hosts that is the *global* batch.
  """
  return BatchNorm2d(use_running_average=not train, dtype=dtype, name=name)


def _moments(xf: jax.Array, axes: tuple[int, ...], one_pass: bool,
             keepdims: bool = False) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance of float32 `xf` over `axes`: two passes (as PyTorch) or one
  (E[x^2] - E[x]^2, both sums in one read of x)."""
  mean = jnp.mean(xf, axes, keepdims=True)
  if one_pass:
    var = jnp.maximum(jnp.mean(jnp.square(xf), axes, keepdims=True) - jnp.square(mean), 0.0)
  else:
    var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
  if not keepdims:
    mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
  return mean, var


def _scale_shift(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
                 bias: jax.Array, epsilon: float, dtype: Dtype) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias as one multiply-add per element in `dtype`,
  as PyTorch's CPU kernel does (alpha, beta from the float32 statistics)."""
  # The marker lets the MAC counter (profiling/macs.py) count a norm per element.
  with jax.named_scope(NORM_SCOPE):
    alpha = scale * jax.lax.rsqrt(var + epsilon)
    beta = bias - mean * alpha
    return x.astype(dtype) * alpha.astype(dtype) + beta.astype(dtype)


class GroupNorm1(nn.Module):
  """`torch.nn.GroupNorm(1, C)` as timm's MobileViTv2 uses it: one group, eps 1e-5.

  Statistics over all of (H, W, C) per example, in float32; params `scale`, `bias` (C,), as
  `nn.GroupNorm` names them. Written out rather than `nn.GroupNorm(num_groups=1)`, which
  reshapes the map to (..., groups, C / groups): on TPU that 5-D view is a different tiled
  layout, so every norm paid a relayout copy of the whole map plus a float32 copy of it.
  """

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    # Per-example statistics over (H, W, C), float32; one pass below float32 (see BatchNorm2d).
    mean, var = _moments(x.astype(jnp.float32), tuple(range(1, x.ndim)),
                         one_pass=jnp.dtype(self.dtype) != jnp.float32, keepdims=True)
    return _scale_shift(x, mean, var, scale, bias, self.epsilon, self.dtype)


def group_norm_1(dtype: Dtype = jnp.float32, name: str | None = None) -> GroupNorm1:
  """`torch.nn.GroupNorm(1, C)` as timm's MobileViTv2 uses it (see `GroupNorm1`)."""
  return GroupNorm1(dtype=dtype, name=name)


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """PyTorch's hardsigmoid: relu6(x + 3) / 6 (not Keras' 0.2x + 0.5)."""
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_swish(x: jax.Array) -> jax.Array:
  """PyTorch's hardswish: x * relu6(x + 3) / 6."""
  return x * hard_sigmoid(x)


def gelu(x: jax.Array, form: str = "erf") -> jax.Array:
  """`torch.nn.GELU()` default: the exact erf form, not Flax's tanh approximation.

  Written as PyTorch's CPU and CUDA kernels write it, x / 2 * (1 + erf(x / sqrt 2)), not as
  `jax.nn.gelu(approximate=False)`, which uses erfc(-x / sqrt 2): erfc is the more accurate
  in the far negative tail (where GELU is below 1e-6 anyway) but XLA expands it into an
  exp and two rational polynomials: 5.8x the time of erf on a 2-core CPU (168 against 29 ms
  for 67 M values; the LDAs' hidden activations are the largest arrays of the model).
  `form='jax_nn'` writes the same function as `jax.nn.gelu`, for the ONNX converter, which
  maps that one function to one Gelu op but would spell the erf form out as Erf, Mul and Add
  (`runtime.Runtime.gelu`).
  """
  if form == "jax_nn":
    return nn.gelu(x, approximate=False)
  return x * (0.5 * (1 + jax.lax.erf(x * np.asarray(0.5 ** 0.5, x.dtype))))


def adaptive_windows(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Gather indices (out, K) and averaging weights (out, K) of PyTorch's adaptive pooling.

  Output cell i averages input rows floor(i*in/out) .. ceil((i+1)*in/out) - 1; windows overlap
  when `in_size` is not a multiple of `out_size` and repeat rows when it is smaller.
  """
  starts = (np.arange(out_size) * in_size) // out_size
  ends = -((-(np.arange(out_size) + 1) * in_size) // out_size)
  lengths = ends - starts
  width = int(lengths.max())
  offsets = np.arange(width)
  idx = np.minimum(starts[:, None] + offsets[None, :], in_size - 1)
  weights = np.where(offsets[None, :] < lengths[:, None], 1.0 / lengths[:, None], 0.0)
  return idx.astype(np.int32), weights.astype(np.float32)


def _pool_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """PyTorch adaptive average pooling along one axis.

  When `out_size` divides the axis, a reshape and an unrolled sum of the k rows of each
  window (XLA:CPU runs a reduction over a middle axis ~10x slower: 2.4 s vs 0.2 s on
  616x954x512, measured). Otherwise (overlapping windows, e.g. 954 -> 22) a matmul with the
  0/1 window matrix, sums accumulated in float32, then the 1 / length scaling: one read of
  x. Per-tap gathers would cost the TPU teacher step about 2 GB per step on the first LDA
  alone (v5e compile at 1231x1907).
  """
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  if in_size % out_size == 0:
    k = in_size // out_size
    xr = x.reshape(x.shape[:axis] + (out_size, k) + x.shape[axis + 1:])
    acc = jax.lax.index_in_dim(xr, 0, axis + 1, keepdims=False)
    for j in range(1, k):
      acc = acc + jax.lax.index_in_dim(xr, j, axis + 1, keepdims=False)
    return acc / jnp.asarray(k, x.dtype)
  idx, weights = adaptive_windows(in_size, out_size)
  windows = np.zeros((out_size, in_size), np.float32)
  for o in range(out_size):
    windows[o, idx[o][weights[o] > 0]] = 1.0
  lengths = windows.sum(axis=1)
  letters = "abcdefghijklmnopqrstuvwxyz"[:x.ndim]
  out_letters = letters[:axis] + "Z" + letters[axis + 1:]
  sums = jnp.einsum(f"{letters},Z{letters[axis]}->{out_letters}", x,
                    jnp.asarray(windows, x.dtype), precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)
  shape = [1] * x.ndim
  shape[axis] = out_size
  return (sums / jnp.asarray(lengths).reshape(shape)).astype(x.dtype)


def adaptive_avg_pool2d(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
  """`torch.nn.AdaptiveAvgPool2d` on NHWC input, PyTorch's exact (overlapping) windows."""
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  # Marked for the MAC counter: a pool, even where it is a matmul with 0/1 windows.
  with jax.named_scope(POOL_SCOPE):
    x = _pool_axis(x, 1, output_size[0])
    return _pool_axis(x, 2, output_size[1])


def avg_pool2d(x: jax.Array, kernel_size: int) -> jax.Array:
  """`torch.nn.AvgPool2d(k)` (stride k, no padding, floor mode) on NHWC input."""
  k = kernel_size
  with jax.named_scope(POOL_SCOPE):  # Marked for the MAC counter.
    # window_shape by keyword: jax2onnx (the ONNX export) swaps in a keyword-only nn.avg_pool.
    return nn.avg_pool(x, window_shape=(k, k), strides=(k, k), padding="VALID")


def _align_corners_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  # PyTorch computes the source coordinate in float32: scale * dst_index.
  scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
  src = scale * np.arange(out_size, dtype=np.float32)
  lo = np.floor(src).astype(np.int32)
  lo = np.minimum(lo, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = jnp.asarray(frac, x.dtype).reshape(shape)
  x_lo = _take_static(x, lo, axis)
  x_hi = _take_static(x, hi, axis)
  return x_lo * (1 - frac) + x_hi * frac


def _take_static(x: jax.Array, idx: np.ndarray, axis: int, max_runs: int = 8) -> jax.Array:
  """`jnp.take(x, idx, axis)` for a constant index array, as slices where that is short.

  The resize of an odd map to the next even size (MobileViTv2 blocks) reads rows
  [0, 0, 1, ..., n - 1]: two runs of consecutive indices. A gather (and its scatter-add
  gradient) on TPU costs several times the map; a concatenation of a few slices is a copy.
  """
  starts = np.flatnonzero(np.diff(idx, prepend=idx[0] - 2) != 1)
  if len(starts) > max_runs:
    return jnp.take(x, jnp.asarray(idx), axis=axis)
  ends = np.append(starts[1:], len(idx))
  pieces = [jax.lax.slice_in_dim(x, int(idx[a]), int(idx[a]) + int(b - a), axis=axis)
            for a, b in zip(starts, ends)]
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)


def resize_bilinear_align_corners(x: jax.Array, size_hw: Sequence[int]) -> jax.Array:
  """`F.interpolate(mode='bilinear', align_corners=True)` on NHWC input.

  `jax.image.resize` implements half-pixel (align_corners=False) sampling and does not match.
  """
  with jax.named_scope(RESIZE_SCOPE):  # Marked for the MAC counter.
    x = _align_corners_axis(x, 1, size_hw[0])
    return _align_corners_axis(x, 2, size_hw[1])


class BatchNorm2d(nn.Module):
  """`torch.nn.BatchNorm2d` exactly, training included (variables named as `nn.BatchNorm`'s).

  `nn.BatchNorm` updates its running variance with the biased batch variance; PyTorch
  normalises with the biased one but stores the *unbiased* one (times n / (n - 1)), which
  differs visibly wherever few positions are averaged (the stride-32 layers). Params `scale`,
  `bias`; batch_stats `mean`, `var`. `momentum` is PyTorch's (weight of the new batch).

  In training, `example_mask` (shape [batch], bool or 0/1, traced) makes the statistics count
  only the examples where it is set: a padded last batch (the released recipe keeps PyTorch's
  last small batch) then normalises and updates the running statistics exactly as a batch of
  its real examples alone would (mean, variance and the n / (n - 1) correction). None counts
  every example; with running averages the mask is not read.
  """

  use_running_average: bool = True
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, example_mask: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      # Statistics in float32 whatever the compute dtype. Float32 compute: two passes like
      # PyTorch (parity). Lower precision: one pass (E[x^2] - E[x]^2, both sums fused into one
      # read of x): at the paper's resolution these reads are HBM traffic, and the float32
      # cancellation error is far below the rounding of the bfloat16 activations themselves.
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      one_pass = jnp.dtype(x.dtype) != jnp.float32
      if example_mask is None:
        mean, var = _moments(xf, axes, one_pass)
        n = x.size // c
      else:
        if example_mask.shape != x.shape[:1]:
          raise ValueError(f"BatchNorm2d example_mask shape {example_mask.shape} does not "
                           f"match the batch of its input {x.shape}.")
        w = example_mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        n = jnp.maximum(jnp.sum(w) * (x.size // (c * x.shape[0])), 1.0)
        mean = jnp.sum(xf * w, axes) / n
        if one_pass:
          var = jnp.maximum(jnp.sum(jnp.square(xf) * w, axes) / n - jnp.square(mean), 0.0)
        else:
          var = jnp.sum(jnp.square(xf - mean) * w, axes) / n
      if not self.is_initializing():
        unbiased = var * (n / (max(n - 1, 1) if isinstance(n, int) else jnp.maximum(n - 1, 1)))
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
    return _scale_shift(x, mean, var, scale, bias, self.epsilon, self.dtype)
