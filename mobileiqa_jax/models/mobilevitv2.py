"""MobileViTv2 backbone, numerically equal to timm's `mobilevitv2_*` with `features_only=True`.

The module returns the five stage outputs (strides 2, 4, 8, 16, 32) of
`timm.create_model('mobilevitv2_XXX', features_only=True, out_indices=(0, 1, 2, 3, 4))`
as NHWC arrays. The stem is not a feature; the last feature is stage 4's output (timm's
`final_conv` is an identity for these models).

The Flax variable tree mirrors the PyTorch state dict of that timm model: the torch key
`stages_2.1.transformer.0.attn.qkv_proj.weight` lives at
`params['stages_2']['1']['transformer']['0']['attn']['qkv_proj']['kernel']`. Convolution
kernels are HWIO, norms hold `scale`/`bias`, BatchNorm statistics are `batch_stats` `mean`/`var`.
The weight converter relies on this one-to-one naming.

Layout note: timm unfolds the MobileViTv2 block's map [B, C, H, W] into 2x2 patches
[B, C, P=4, N] before the transformer and folds it back afterwards. Every transformer operation
except the attention's softmax/sum over N acts per position (1x1 convs, activations) or over all
positions at once (GroupNorm with one group), so here the map stays NHWC and is only *viewed*
as (B, n_h, p_h, n_w, p_w, C) (a free reshape) where the softmax over N needs it: the same
numbers without the two transposes.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileiqa_jax.models import layers

Dtype = Any

# timm `_mobilevitv2_cfg`: stage widths at multiplier 1, stem width, blocks per stage and the
# transformer depth of the stage's MobileViTv2 block (0: no such block).
_BASE_CHANNELS = (64, 128, 256, 384, 512)
_BASE_STEM = 32
_STAGE_DEPTHS = (1, 2, 1, 1, 1)
_STAGE_STRIDES = (1, 2, 2, 2, 2)
_TRANSFORMER_DEPTHS = (0, 0, 2, 4, 3)
_BOTTLE_RATIO = 2.0  # inverted residual expansion, applied to the block's input channels
_TRANSFORMER_RATIO = 0.5  # transformer dim = make_divisible(0.5 * in_chs)
_MLP_RATIO = 2.0
_PATCH = 2

# `nn.remat` of a block or stage called as (x, train, example_mask): arg 0 is the module
# itself, so `train` (a Python bool that picks the program) is static arg 2; the mask is a
# traced array (or None) and stays an ordinary argument.
_REMAT_STATIC = (2,)


def stage_channels(width_multiplier: float) -> tuple[int, ...]:
  """Output channels of stages 0..4 (= the five features), derived as timm does."""
  chs = _BASE_CHANNELS
  if width_multiplier != 1.0:
    chs = tuple(int(c * width_multiplier) for c in chs)
  # ByobNet applies make_divisible(c * width_factor) with width_factor 1.
  return tuple(layers.make_divisible(c) for c in chs)


def stem_channels(width_multiplier: float) -> int:
  """Stem width: ByobNet's int(round(int(32 * multiplier)))."""
  return int(round(int(_BASE_STEM * width_multiplier)))


class ConvNormAct(nn.Module):
  """timm `ConvNormAct`: conv (no bias) -> BatchNorm -> optional SiLU.

  Submodules are named `conv` and `bn` like timm's. Depthwise convs (groups == channels) use
  `layers.DepthwiseConv2d`, whose kernel (k, k, 1, C) is the torch (C, 1, k, k) in HWIO.
  This and every block above it take `(x, train, example_mask)`: `example_mask` ([batch] or
  None) is the examples the training BatchNorm statistics count (`layers.BatchNorm2d`).
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  depthwise: bool = False
  apply_act: bool = True
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  dtype: Dtype = jnp.float32
  as_matmul: bool = False  # a 1x1 conv as `layers.PointwiseConv` (same variables)
  tie: bool = False  # the conv's input and weight gradients tied (`layers.tie_grads`)
  stem: str = ""  # a 3x3 stride-2 stem in this form (`layers.stem_conv`); '' = not a stem

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> jax.Array:
    if self.stem:
      if (self.kernel_size, self.stride, self.depthwise) != (3, 2, False):
        raise ValueError("ConvNormAct(stem=...) is a 3x3 stride-2 dense convolution")
      x = layers.stem_conv(self.features, self.stem, dtype=self.dtype, tie=self.tie,
                           name="conv")(x)
    elif self.as_matmul:
      x = layers.PointwiseConv(self.features, use_bias=False, dtype=self.dtype, tie=self.tie,
                               name="conv")(x)
    elif self.depthwise:
      x = layers.DepthwiseConv2d(
          self.features, self.kernel_size, self.stride, impl=self.depthwise_impl,
          dtype=self.dtype, tie=self.tie, name="conv")(x)
    else:
      x = layers.conv2d(
          self.features, self.kernel_size, self.stride, use_bias=False, dtype=self.dtype,
          tie=self.tie, name="conv")(x)
    # BatchNorm2d, not nn.BatchNorm: PyTorch stores the unbiased batch variance in training.
    x = layers.BatchNorm2d(use_running_average=not train, dtype=self.dtype, name="bn")(
        x, example_mask)
    return nn.silu(x) if self.apply_act else x


class BottleneckBlock(nn.Module):
  """timm `BottleneckBlock` as MobileViTv2 configures it: an inverted residual.

  1x1 expand (x2 of the input channels) + SiLU -> depthwise 3x3 (stride) + SiLU -> 1x1 linear
  projection; identity residual only when the shape is unchanged (timm's `downsample=''` gives
  no shortcut at all otherwise), no activation after the sum.
  """

  features: int
  stride: int = 1
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  dtype: Dtype = jnp.float32
  tie: bool = False  # `layers.tie_grads` in every conv

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> jax.Array:
    in_chs = x.shape[-1]
    mid = layers.make_divisible(in_chs * _BOTTLE_RATIO)
    shortcut = x
    impl = self.depthwise_impl
    as_matmul = layers.pointwise_as_matmul(impl)
    x = ConvNormAct(mid, 1, dtype=self.dtype, as_matmul=as_matmul, tie=self.tie,
                    name="conv1_1x1")(x, train, example_mask)
    x = ConvNormAct(
        mid, 3, self.stride, depthwise=True, depthwise_impl=impl,
        dtype=self.dtype, tie=self.tie, name="conv2_kxk")(x, train, example_mask)
    x = ConvNormAct(self.features, 1, apply_act=False, dtype=self.dtype, as_matmul=as_matmul,
                    tie=self.tie, name="conv3_1x1")(x, train, example_mask)
    if in_chs == self.features and self.stride == 1:
      x = x + shortcut
    return x


def _conv1x1(features: int, dtype: Dtype, name: str, tie: bool = False) -> layers.PointwiseConv:
  """A torch `Conv2d(k=1, bias=True)` (kernel (1, 1, in, out)) of the transformer."""
  return layers.PointwiseConv(features, use_bias=True, dtype=dtype, tie=tie, name=name)


def _patch_view(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, n_h, p_h, n_w, p_w, C): patch pixel (p_h, p_w), patch (n_h, n_w).

  timm's P axis is p_h * 2 + p_w and its N axis is n_h * n_w_count + n_w; reductions over N
  are reductions over axes (1, 3) of this view.
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // _PATCH, _PATCH, w // _PATCH, _PATCH, c)


class _Conv1x1Variables(nn.Module):
  """The variables of a torch `Conv2d(k=1, bias=True)` as `nn.Conv` makes them (kernel
  (1, 1, in, out) lecun_normal, bias zeros), returned as a (in, out) matrix and a bias."""

  features: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return kernel[0, 0], bias


class LinearSelfAttention(nn.Module):
  """timm `LinearSelfAttention` (separable self-attention of MobileViTv2).

  qkv_proj makes 1 + 2d channels = query (1), key (d), value (d). For every patch pixel P the
  query is softmaxed over the N patches, the context vector is sum_N key * softmax(query), and
  the output is relu(value) * context -> out_proj.

  Layout, and why this is not timm's unfold: patch pixel P is (h % 2, w % 2). Row parity is a
  free reshape of H, a major axis. Column parity is not: W and C are the two tiled minor axes
  of a TPU array, and a (..., n_w, 2, C) view pads the 2 to a whole tile, a relayout of every
  map it touches. So the query is its own (B, H, W) map (as (B, H, W, 1) its one channel
  would fill a 128-lane tile), the softmax runs on that small map, and column parity enters
  the context sums as a mask on W. Query, key and value are the column blocks of
  `qkv_proj`'s kernel (same parameters, same products), so the (1 + 2d)-wide activation is
  never written or sliced. Measured on the TPU v5e compile of stage 2's block at the paper's
  resolution: benchmarks/layer_traffic.py.
  """

  dtype: Dtype = jnp.float32
  tie: bool = False  # `layers.tie_grads` on each projection's input and weights

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bsz, h, w, d = x.shape
    kernel, bias = _Conv1x1Variables(1 + 2 * d, name="qkv_proj")(d)
    if self.tie:
      x, (kernel, bias) = layers.tie_grads(x, (kernel, bias))
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    x = x.astype(self.dtype)
    query = jnp.einsum("bhwc,c->bhw", x, kernel[:, 0]) + bias[0]
    key = jnp.einsum("bhwc,cd->bhwd", x, kernel[:, 1:1 + d]) + bias[1:1 + d]
    value = jnp.einsum("bhwc,cd->bhwd", x, kernel[:, 1 + d:]) + bias[1 + d:]
    # Softmax over the patches of each patch pixel, on the small (B, n_h, 2, n_w, 2) view.
    scores = jax.nn.softmax(_patch_view(query[..., None])[..., 0], axis=(1, 3))
    scores = scores.reshape(bsz, h // _PATCH, _PATCH, w)  # rows: (n_h, p_h); columns flat
    even_col = (jnp.arange(w) % _PATCH) == 0  # p_w == 0
    key = key.reshape(bsz, h // _PATCH, _PATCH, w, d)  # free: H is a major axis
    # context[b, p_h, p_w] = sum over patches of key * score, the column parity as a mask.
    ctx_even = jnp.sum(key * jnp.where(even_col, scores, 0)[..., None], axis=(1, 3))
    ctx_odd = jnp.sum(key * jnp.where(even_col, 0, scores)[..., None], axis=(1, 3))
    context = jnp.where(even_col[None, None, :, None], ctx_even[:, :, None], ctx_odd[:, :, None])
    out = nn.relu(value).reshape(key.shape) * context[:, None]  # (B, n_h, p_h, W, d)
    return _conv1x1(d, self.dtype, "out_proj", self.tie)(out.reshape(bsz, h, w, d))


class ConvMlp(nn.Module):
  """timm `ConvMlp`: 1x1 conv (fc1) -> SiLU -> 1x1 conv (fc2); norm and dropout are identities."""

  hidden: int
  dtype: Dtype = jnp.float32
  tie: bool = False  # `layers.tie_grads` in fc1 and fc2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.silu(_conv1x1(self.hidden, self.dtype, "fc1", self.tie)(x))
    return _conv1x1(d, self.dtype, "fc2", self.tie)(x)


class LinearTransformerBlock(nn.Module):
  """timm `LinearTransformerBlock`: pre-norm (GroupNorm, 1 group) attention and MLP residuals."""

  dtype: Dtype = jnp.float32
  tie: bool = False  # `layers.tie_grads` in every projection

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = x + LinearSelfAttention(self.dtype, self.tie, name="attn")(
        layers.group_norm_1(self.dtype, name="norm1")(x))
    x = x + ConvMlp(int(d * _MLP_RATIO), self.dtype, self.tie, name="mlp")(
        layers.group_norm_1(self.dtype, name="norm2")(x))
    return x


class LinearTransformer(nn.Module):
  """The `transformer` nn.Sequential of a MobileViTv2 block (children named '0', '1', ...)."""

  depth: int
  dtype: Dtype = jnp.float32
  remat: bool = False  # rematerialise each transformer block
  tie: bool = False  # `layers.tie_grads` in every projection

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block_cls = nn.remat(LinearTransformerBlock) if self.remat else LinearTransformerBlock
    for i in range(self.depth):
      x = block_cls(self.dtype, self.tie, name=str(i))(x)
    return x


class MobileVitV2Block(nn.Module):
  """timm `MobileVitV2Block`.

  An input with odd H or W is first resized UP to the next multiple of the patch size with
  bilinear align_corners=True interpolation and is never resized back, so the block's output
  keeps the enlarged size (as timm's does). Then depthwise 3x3 + BN + SiLU (`conv_kxk`),
  1x1 to the transformer dim (`conv_1x1`, no bias), the linear transformer on 2x2 patches,
  GroupNorm (`norm`), and a 1x1 conv + BN back to the block width (`conv_proj`, no act).
  """

  features: int
  transformer_depth: int
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  dtype: Dtype = jnp.float32
  remat_blocks: bool = False
  tie: bool = False  # `layers.tie_grads` in every conv and projection

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> jax.Array:
    _, h, w, in_chs = x.shape
    new_h, new_w = -(-h // _PATCH) * _PATCH, -(-w // _PATCH) * _PATCH
    if new_h != h or new_w != w:
      x = layers.resize_bilinear_align_corners(x, (new_h, new_w))
    dim = layers.make_divisible(_TRANSFORMER_RATIO * in_chs)
    x = ConvNormAct(
        in_chs, 3, depthwise=True, depthwise_impl=self.depthwise_impl, dtype=self.dtype,
        tie=self.tie, name="conv_kxk")(x, train, example_mask)
    # The 1x1 convs of this block are matmuls (see `layers.PointwiseConv`).
    x = layers.PointwiseConv(dim, use_bias=False, dtype=self.dtype, tie=self.tie,
                             name="conv_1x1")(x)
    x = LinearTransformer(self.transformer_depth, self.dtype, self.remat_blocks, self.tie,
                          name="transformer")(x)
    x = layers.group_norm_1(self.dtype, name="norm")(x)
    return ConvNormAct(self.features, 1, apply_act=False, dtype=self.dtype, as_matmul=True,
                       tie=self.tie, name="conv_proj")(x, train, example_mask)


class Stage(nn.Module):
  """One timm stage (`stages_i` nn.Sequential): bottleneck blocks, then an optional MobileViTv2
  block, children named '0', '1', ..."""

  features: int
  stride: int
  depth: int
  transformer_depth: int = 0
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  dtype: Dtype = jnp.float32
  remat_blocks: bool = False  # rematerialise each bottleneck and transformer block
  strided_depthwise_impl: str = ""  # the stride-2 block's form; '' = depthwise_impl
  tie: bool = False  # `layers.tie_grads` in every conv and projection

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> jax.Array:
    block_cls = (nn.remat(BottleneckBlock, static_argnums=_REMAT_STATIC) if self.remat_blocks
                 else BottleneckBlock)
    for i in range(self.depth):
      stride = self.stride if i == 0 else 1
      impl = (self.strided_depthwise_impl or self.depthwise_impl) if stride > 1 else (
          self.depthwise_impl)
      x = block_cls(self.features, stride, impl, self.dtype, self.tie, name=str(i))(
          x, train, example_mask)
    if self.transformer_depth:
      x = MobileVitV2Block(
          self.features, self.transformer_depth, self.depthwise_impl, self.dtype,
          self.remat_blocks, self.tie, name=str(self.depth))(x, train, example_mask)
    return x


class MobileViTv2(nn.Module):
  """timm `mobilevitv2_*` features backbone: NHWC image -> five NHWC features.

  Attributes:
    width_multiplier: timm's width multiplier (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0).
    dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    depthwise_impl: 'conv' or 'shift' for `layers.DepthwiseConv2d` (see `runtime.Runtime`).
    strided_depthwise_impl: the form of the stride-2 bottleneck blocks (their depthwise conv
      and the 1x1 convs beside it); '' = `depthwise_impl`.
    remat: rematerialise in the backward pass instead of keeping activations (training
      memory at high resolution; the variable tree is unchanged): False; True or 'stage'
      (each stage: only stage inputs are kept, a whole stage's activations are live again
      while its gradient is taken); 'block' (each bottleneck and transformer block: block
      inputs are kept, at most one block's activations are live again; same recompute).
    tie_weight_grads: every conv and projection hands its input gradient on only once its
      weight gradient is computed (`layers.tie_grads`, `runtime.Runtime.tie_weight_grads`).
    stem: the stem convolution's form, 'conv' or 'space_to_depth' (`layers.stem_conv`,
      `runtime.Runtime.stem`); the same variables and numbers.
  """

  width_multiplier: float = 2.0
  dtype: Dtype = jnp.float32
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  remat: bool | str = False
  strided_depthwise_impl: str = ""
  tie_weight_grads: bool = False
  stem: str = "conv"  # the stem convolution's form, `runtime.Runtime.stem`

  @property
  def feature_channels(self) -> tuple[int, ...]:
    """Channels of the five features."""
    return stage_channels(self.width_multiplier)

  @property
  def feature_strides(self) -> tuple[int, ...]:
    """Strides of the five features relative to the input."""
    return (2, 4, 8, 16, 32)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> list[jax.Array]:
    """Runs the backbone.

    Args:
      x: float images (B, H, W, 3), H and W at least 32 (any parity).
      train: BatchNorm uses batch statistics and updates `batch_stats` (make it mutable).
      example_mask: [batch] bool or 0/1, or None (all): the examples that training BatchNorm
        statistics count (a padded last batch; see `layers.BatchNorm2d`).

    Returns:
      The outputs of stages 0..4, NHWC, channels `feature_channels`, in `dtype`.
    """
    x = x.astype(self.dtype)
    x = ConvNormAct(
        stem_channels(self.width_multiplier), 3, 2, dtype=self.dtype,
        tie=self.tie_weight_grads, stem=self.stem, name="stem")(x, train, example_mask)
    if self.remat not in (False, True, "stage", "block"):
      raise ValueError(f"MobileViTv2 remat must be False, True, 'stage' or 'block', got "
                       f"{self.remat!r}")
    per_block = self.remat == "block"
    stage_cls: Callable[..., nn.Module] = Stage
    if self.remat in (True, "stage"):
      stage_cls = nn.remat(Stage, static_argnums=_REMAT_STATIC)
    features = []
    for i, chs in enumerate(self.feature_channels):
      x = stage_cls(
          chs, _STAGE_STRIDES[i], _STAGE_DEPTHS[i], _TRANSFORMER_DEPTHS[i],
          self.depthwise_impl, self.dtype, per_block, self.strided_depthwise_impl,
          self.tie_weight_grads, name=f"stages_{i}")(x, train, example_mask)
      features.append(x)
    return features


def _factory(width_multiplier: float, doc_name: str) -> Callable[..., MobileViTv2]:
  def make(**kwargs: Any) -> MobileViTv2:
    return MobileViTv2(width_multiplier=width_multiplier, **kwargs)

  make.__name__ = doc_name
  make.__doc__ = f"timm `{doc_name}` features backbone (width multiplier {width_multiplier})."
  return make


mobilevitv2_050 = _factory(0.5, "mobilevitv2_050")
mobilevitv2_075 = _factory(0.75, "mobilevitv2_075")
mobilevitv2_100 = _factory(1.0, "mobilevitv2_100")
mobilevitv2_125 = _factory(1.25, "mobilevitv2_125")
mobilevitv2_150 = _factory(1.5, "mobilevitv2_150")
mobilevitv2_175 = _factory(1.75, "mobilevitv2_175")
mobilevitv2_200 = _factory(2.0, "mobilevitv2_200")

# The backbones by timm name (the table `mobileiqa.build_backbone` reads).
BACKBONES: dict[str, Callable[..., MobileViTv2]] = {
    f.__name__: f
    for f in (mobilevitv2_050, mobilevitv2_075, mobilevitv2_100, mobilevitv2_125,
              mobilevitv2_150, mobilevitv2_175, mobilevitv2_200)
}
