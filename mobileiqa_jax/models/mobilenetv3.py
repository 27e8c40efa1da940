"""timm-exact MobileNetV3 feature extractor (`features_only=True`) in Flax Linen, NHWC.

`MobileNetV3` reproduces `timm.create_model(<name>, features_only=True)` (timm's
`MobileNetV3Features`) to float32 rounding and returns its five features at strides 2..32.
For `mobilenetv3_large_100` these are blocks 0, 1, 2, 4, 6 with 16, 24, 40, 112, 960 channels.

The block list is derived, as timm's `_gen_mobilenet_v3` does, from a small arch table scaled
by the channel multiplier (`round_channels` / `make_divisible`) and depth multiplier
(`_scale_stage_depth`). The Flax variable tree mirrors the PyTorch state dict: the torch key
`blocks.2.0.se.conv_reduce.weight` is `params['blocks']['2']['0']['se']['conv_reduce']['kernel']`,
so a weight converter is a renaming table (OIHW -> HWIO, BN weight -> scale,
running_mean/var -> batch_stats mean/var).

Only the PyTorch-native models are provided: the `tf_` ports use TF 'SAME' padding and
BN eps 1e-3, and `mobilenetv3_rw` rounds its squeeze-excite differently.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileiqa_jax.models import layers

Dtype = Any

# One row per block definition: (type, repeats, dw kernel, stride, expansion ratio,
# out channels before the multiplier, squeeze-excite ratio, activation). Activation None means
# the model default (hard-swish); 'relu' is timm's `_nre`. Types: 'ds' depthwise-separable,
# 'ir' inverted residual, 'cn' conv+BN+act. The outer tuple is timm's stages (`blocks.N`).
_Row = tuple[str, int, int, int, float, int, float, str | None]

_ARCH_LARGE: tuple[tuple[_Row, ...], ...] = (
    (("ds", 1, 3, 1, 1.0, 16, 0.0, "relu"),),
    (("ir", 1, 3, 2, 4.0, 24, 0.0, "relu"), ("ir", 1, 3, 1, 3.0, 24, 0.0, "relu")),
    (("ir", 3, 5, 2, 3.0, 40, 0.25, "relu"),),
    (("ir", 1, 3, 2, 6.0, 80, 0.0, None), ("ir", 1, 3, 1, 2.5, 80, 0.0, None),
     ("ir", 2, 3, 1, 2.3, 80, 0.0, None)),
    (("ir", 2, 3, 1, 6.0, 112, 0.25, None),),
    (("ir", 3, 5, 2, 6.0, 160, 0.25, None),),
    (("cn", 1, 1, 1, 1.0, 960, 0.0, None),),
)

_ARCH_SMALL: tuple[tuple[_Row, ...], ...] = (
    (("ds", 1, 3, 2, 1.0, 16, 0.25, "relu"),),
    (("ir", 1, 3, 2, 4.5, 24, 0.0, "relu"), ("ir", 1, 3, 1, 3.67, 24, 0.0, "relu")),
    (("ir", 1, 5, 2, 4.0, 40, 0.25, None), ("ir", 2, 5, 1, 6.0, 40, 0.25, None)),
    (("ir", 2, 5, 1, 3.0, 48, 0.25, None),),
    (("ir", 3, 5, 2, 6.0, 96, 0.25, None),),
    (("cn", 1, 1, 1, 1.0, 576, 0.0, None),),
)

_ARCHS = {"large": _ARCH_LARGE, "small": _ARCH_SMALL}

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "hard_swish": layers.hard_swish,
    "identity": lambda x: x,
}


def round_channels(channels: float, multiplier: float = 1.0) -> int:
  """timm's `round_channels` (divisor 8, round limit 0.9)."""
  if not multiplier:
    return int(channels)
  return layers.make_divisible(channels * multiplier)


def _scale_stage_depth(repeats: Sequence[int], depth_multiplier: float) -> list[int]:
  """timm's `_scale_stage_depth` ('ceil'): scale a stage's total, then share it out backwards."""
  num_repeat = sum(repeats)
  num_scaled = int(math.ceil(num_repeat * depth_multiplier))
  scaled = []
  for r in repeats[::-1]:
    rs = max(1, round(r / num_repeat * num_scaled))
    scaled.append(rs)
    num_repeat -= r
    num_scaled -= rs
  return scaled[::-1]


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """One resolved timm block: kind ('ds', 'ir', 'cn'), channels, kernel, stride, SE, act."""

  kind: str
  in_chs: int
  out_chs: int
  mid_chs: int
  kernel_size: int
  stride: int
  se_chs: int  # reduced SE channels; 0 means no squeeze-excite
  act: str
  has_skip: bool


def build_blocks(
    arch: str,
    channel_multiplier: float = 1.0,
    depth_multiplier: float = 1.0,
) -> tuple[int, tuple[tuple[BlockConfig, ...], ...], tuple[int, ...]]:
  """Resolves an arch table as timm's `EfficientNetBuilder` does.

  Returns (stem channels, stages of blocks, feature stages), where feature stage 0 is the
  stem output and stage i >= 1 is the output of `blocks[i - 1]`.
  """
  table = _ARCHS[arch]
  # timm keeps the stem at 16 channels below multiplier 0.75 (`fix_stem`).
  stem = 16 if channel_multiplier < 0.75 else round_channels(16, channel_multiplier)
  in_chs = stem
  stages = []
  for stage_rows in table:
    reps = _scale_stage_depth([row[1] for row in stage_rows], depth_multiplier)
    blocks = []
    for row, rep in zip(stage_rows, reps):
      kind, _, k, s, e, c, se, act = row
      for _ in range(rep):
        # Only the first block of a stage strides.
        stride = s if not blocks else 1
        out = round_channels(c, channel_multiplier)
        if kind == "ir":
          mid = layers.make_divisible(in_chs * e)
        else:
          mid = in_chs
        # SE reduction is computed from the SE input (mid) channels: se_from_exp=True.
        se_chs = round_channels(mid * se) if se else 0
        blocks.append(BlockConfig(
            kind=kind, in_chs=in_chs, out_chs=out, mid_chs=mid, kernel_size=k, stride=stride,
            se_chs=se_chs, act=act or "hard_swish",
            # 'cn' blocks are built with skip=False in MobileNetV3.
            has_skip=kind != "cn" and stride == 1 and in_chs == out,
        ))
        in_chs = out
    stages.append(tuple(blocks))
  # timm extracts a feature at the end of a stage when the next stage strides (or it is the
  # last), plus the stem when the first block already strides.
  features = [0] if table[0][0][3] > 1 else []
  for i in range(len(table)):
    if i + 1 == len(table) or table[i + 1][0][3] > 1:
      features.append(i + 1)
  return stem, tuple(stages), tuple(features)


class SqueezeExcite(nn.Module):
  """timm `SqueezeExcite`: mean -> 1x1 conv -> ReLU -> 1x1 conv -> hard-sigmoid gate."""

  channels: int
  reduced: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = layers.conv2d(self.reduced, 1, dtype=self.dtype, name="conv_reduce")(s)
    s = nn.relu(s)
    s = layers.conv2d(self.channels, 1, dtype=self.dtype, name="conv_expand")(s)
    return x * layers.hard_sigmoid(s)


class _BlockBase(nn.Module):
  """Shared fields of the three block kinds.

  Each block is called as `block(x, train, example_mask)`: `example_mask` ([batch] or None)
  is the examples its training BatchNorm statistics count (`layers.BatchNorm2d`).
  """

  cfg: BlockConfig
  dtype: Dtype = jnp.float32
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  tie: bool = False  # `layers.tie_grads` in the block's convs (not the small SE convs)

  def _bn_act(self, x: jax.Array, train: bool, example_mask: jax.Array | None, name: str,
              act: str) -> jax.Array:
    # timm's BatchNormAct2d: BN then the activation, one module in the state dict.
    x = layers.BatchNorm2d(use_running_average=not train, dtype=self.dtype, name=name)(
        x, example_mask)
    return _ACTIVATIONS[act](x)

  def _conv(self, features: int, kernel: int, stride: int,
            name: str) -> nn.Conv | layers.PointwiseConv:
    if kernel == 1 and stride == 1 and layers.pointwise_as_matmul(self.depthwise_impl):
      return layers.PointwiseConv(features, use_bias=False, dtype=self.dtype, tie=self.tie,
                                  name=name)
    return layers.conv2d(features, kernel, stride, use_bias=False, dtype=self.dtype,
                         tie=self.tie, name=name)

  def _dw(self, x: jax.Array, name: str) -> jax.Array:
    c = self.cfg
    return layers.DepthwiseConv2d(
        c.mid_chs, c.kernel_size, c.stride, impl=self.depthwise_impl, dtype=self.dtype,
        tie=self.tie, name=name)(x)


class DepthwiseSeparableConv(_BlockBase):
  """timm `DepthwiseSeparableConv`: dw conv, BN+act, [SE], 1x1 conv, BN, [+ input]."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> jax.Array:
    c = self.cfg
    y = self._dw(x, "conv_dw")
    y = self._bn_act(y, train, example_mask, "bn1", c.act)
    if c.se_chs:
      y = SqueezeExcite(c.mid_chs, c.se_chs, dtype=self.dtype, name="se")(y)
    y = self._conv(c.out_chs, 1, 1, "conv_pw")(y)
    y = self._bn_act(y, train, example_mask, "bn2", "identity")
    return y + x if c.has_skip else y


class InvertedResidual(_BlockBase):
  """timm `InvertedResidual`: 1x1 expand, BN+act, dw conv, BN+act, [SE], 1x1, BN, [+ input]."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> jax.Array:
    c = self.cfg
    y = self._conv(c.mid_chs, 1, 1, "conv_pw")(x)
    y = self._bn_act(y, train, example_mask, "bn1", c.act)
    y = self._dw(y, "conv_dw")
    y = self._bn_act(y, train, example_mask, "bn2", c.act)
    if c.se_chs:
      y = SqueezeExcite(c.mid_chs, c.se_chs, dtype=self.dtype, name="se")(y)
    y = self._conv(c.out_chs, 1, 1, "conv_pwl")(y)
    y = self._bn_act(y, train, example_mask, "bn3", "identity")
    return y + x if c.has_skip else y


class ConvBnAct(_BlockBase):
  """timm `ConvBnAct` (the final 1x1 conv to 960/576 channels): conv, BN+act."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> jax.Array:
    c = self.cfg
    y = self._conv(c.out_chs, c.kernel_size, c.stride, "conv")(x)
    y = self._bn_act(y, train, example_mask, "bn1", c.act)
    return y + x if c.has_skip else y


_BLOCKS = {"ds": DepthwiseSeparableConv, "ir": InvertedResidual, "cn": ConvBnAct}

# `nn.remat` of a block or stage called as (x, train, example_mask): arg 0 is the module
# itself, so `train` (a Python bool that picks the program) is static arg 2; the mask is a
# traced array (or None) and stays an ordinary argument.
_REMAT_STATIC = (2,)


class _Stages(nn.Module):
  """torch `blocks` (Sequential of Sequentials): children named '0', '1', ... like the keys.

  Returns the output of every stage.
  """

  stages: tuple[tuple[BlockConfig, ...], ...]
  dtype: Dtype = jnp.float32
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  remat: bool | str = False
  strided_depthwise_impl: str = ""
  tie: bool = False  # `layers.tie_grads` in the blocks' convs

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> list[jax.Array]:
    if self.remat not in (False, True, "stage", "block"):
      raise ValueError(f"MobileNetV3 remat must be False, True, 'stage' or 'block', got "
                       f"{self.remat!r}")
    stage_cls: Callable[..., nn.Module] = _Stage
    if self.remat in (True, "stage"):
      stage_cls = nn.remat(_Stage, static_argnums=_REMAT_STATIC)
    outs = []
    for i, stage in enumerate(self.stages):
      x = stage_cls(stage, self.dtype, self.depthwise_impl, self.remat == "block",
                    self.strided_depthwise_impl, self.tie, name=str(i))(x, train, example_mask)
      outs.append(x)
    return outs


class _Stage(nn.Module):
  """One torch `nn.Sequential` stage: blocks named '0', '1', ..."""

  blocks: tuple[BlockConfig, ...]
  dtype: Dtype = jnp.float32
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  remat_blocks: bool = False  # rematerialise each block
  strided_depthwise_impl: str = ""  # the form of blocks with stride > 1; '' = depthwise_impl
  tie: bool = False  # `layers.tie_grads` in the blocks' convs

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> jax.Array:
    for j, cfg in enumerate(self.blocks):
      block_cls = _BLOCKS[cfg.kind]
      if self.remat_blocks:
        block_cls = nn.remat(block_cls, static_argnums=_REMAT_STATIC)
      impl = (self.strided_depthwise_impl or self.depthwise_impl) if cfg.stride > 1 else (
          self.depthwise_impl)
      x = block_cls(cfg, self.dtype, impl, self.tie, name=str(j))(x, train, example_mask)
    return x


class MobileNetV3(nn.Module):
  """timm `MobileNetV3Features` (`features_only=True`): NHWC image -> features at strides 2..32.

  Attributes:
    arch: 'large' or 'small'.
    channel_multiplier: timm's width multiplier (0.75 for `..._075`).
    depth_multiplier: timm's depth multiplier (1.2 for `mobilenetv3_large_150d`).
    out_indices: which of the five features to return, as timm's argument.
    dtype: compute dtype; parameters and batch statistics stay float32.
    depthwise_impl: 'conv' or 'shift', see `layers.DepthwiseConv2d` and `runtime.Runtime`.
    strided_depthwise_impl: the form of the blocks with stride > 1; '' = `depthwise_impl`.
    remat: rematerialise in the backward pass instead of keeping activations (training
      memory): False; True or 'stage' (each of the seven stages); 'block' (each block, the
      least kept alive). The values computed are the same.
    tie_weight_grads: every conv but the squeeze-excite ones hands its input gradient on only
      once its weight gradient is computed (`layers.tie_grads`,
      `runtime.Runtime.tie_weight_grads`).
    stem: the stem convolution's form, 'conv' or 'space_to_depth' (`layers.stem_conv`,
      `runtime.Runtime.stem`); the same variables and numbers.
  """

  arch: str = "large"
  channel_multiplier: float = 1.0
  depth_multiplier: float = 1.0
  out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)
  dtype: Dtype = jnp.float32
  depthwise_impl: str = layers.DEFAULT_DEPTHWISE_IMPL
  remat: bool | str = False
  strided_depthwise_impl: str = ""
  tie_weight_grads: bool = False
  stem: str = "conv"  # the stem convolution's form, `runtime.Runtime.stem`

  def _layout(self):
    return build_blocks(self.arch, self.channel_multiplier, self.depth_multiplier)

  @property
  def feature_channels(self) -> tuple[int, ...]:
    """Channels of the returned features, in order."""
    stem, stages, feats = self._layout()
    chans = [stem if f == 0 else stages[f - 1][-1].out_chs for f in feats]
    return tuple(chans[i] for i in self.out_indices)

  @property
  def feature_strides(self) -> tuple[int, ...]:
    """Output strides of the returned features (2, 4, 8, 16, 32 for all five)."""
    return tuple(2 ** (i + 1) for i in self.out_indices)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               example_mask: jax.Array | None = None) -> list[jax.Array]:
    """Runs the backbone.

    Args:
      x: images, NHWC float, at least 32x32 (odd sizes fine).
      train: BatchNorm uses batch statistics and updates `batch_stats` (make it mutable).
      example_mask: [batch] bool or 0/1, or None (all): the examples that training BatchNorm
        statistics count (a padded last batch; see `layers.BatchNorm2d`).

    Returns:
      The features selected by `out_indices`, NHWC, in the compute dtype.
    """
    stem, stages, feats = self._layout()
    x = x.astype(self.dtype)
    x = layers.stem_conv(stem, self.stem, dtype=self.dtype, tie=self.tie_weight_grads,
                         name="conv_stem")(x)
    x = layers.BatchNorm2d(use_running_average=not train, dtype=self.dtype, name="bn1")(
        x, example_mask)
    x = layers.hard_swish(x)
    outs = [x] + _Stages(stages, self.dtype, self.depthwise_impl, self.remat,
                         self.strided_depthwise_impl, self.tie_weight_grads, name="blocks")(
                             x, train, example_mask)
    features = [outs[f] for f in feats]
    return [features[i] for i in self.out_indices]


def mobilenetv3_large_075(**kwargs: Any) -> MobileNetV3:
  """timm `mobilenetv3_large_075` features."""
  return MobileNetV3(arch="large", channel_multiplier=0.75, **kwargs)


def mobilenetv3_large_100(**kwargs: Any) -> MobileNetV3:
  """timm `mobilenetv3_large_100` features (the MobileNet-IQA student's backbone)."""
  return MobileNetV3(arch="large", channel_multiplier=1.0, **kwargs)


def mobilenetv3_large_150d(**kwargs: Any) -> MobileNetV3:
  """timm `mobilenetv3_large_150d` features (1.5x wide, 1.2x deep)."""
  return MobileNetV3(arch="large", channel_multiplier=1.5, depth_multiplier=1.2, **kwargs)


def mobilenetv3_small_050(**kwargs: Any) -> MobileNetV3:
  """timm `mobilenetv3_small_050` features."""
  return MobileNetV3(arch="small", channel_multiplier=0.5, **kwargs)


def mobilenetv3_small_075(**kwargs: Any) -> MobileNetV3:
  """timm `mobilenetv3_small_075` features."""
  return MobileNetV3(arch="small", channel_multiplier=0.75, **kwargs)


def mobilenetv3_small_100(**kwargs: Any) -> MobileNetV3:
  """timm `mobilenetv3_small_100` features."""
  return MobileNetV3(arch="small", channel_multiplier=1.0, **kwargs)


# The backbones by timm name (the table `mobileiqa.build_backbone` reads).
BACKBONES: dict[str, Callable[..., MobileNetV3]] = {
    f.__name__: f for f in (
        mobilenetv3_large_075, mobilenetv3_large_100, mobilenetv3_large_150d,
        mobilenetv3_small_050, mobilenetv3_small_075, mobilenetv3_small_100)
}
