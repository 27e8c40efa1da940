"""PIL's bicubic resize and the ImageNet normalisation as JAX code, for the accelerator.

`preprocess.resize_normalize` (PIL on CPU threads) is the reference. Here the same filter runs
inside a jitted function: PIL's BICUBIC is separable, a Keys cubic (a = -0.5) whose support
widens by the scale factor when downscaling (antialiasing), its weights normalised over each
output pixel's window (which clips at the edges), a horizontal pass then a vertical one. Each
pass is a dense (out, in) weight matrix built from iota (no large constants in the program)
and applied as a matmul at HIGHEST precision (TF32 would cost ~0.3 of a grey level).

For uint8 input PIL rounds and clips to uint8 after each pass; `round_uint8=True` does the
same in float32. PIL's weights are 22-bit fixed point, so a value sitting on a .5 boundary can
round the other way: measured differences are in docs/scoring.md. With `round_uint8=False` the
resize is smooth and differentiable in the pixels (`Scorer.quality_fn`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from mobileiqa_jax.data import preprocess

_A = -0.5  # PIL's bicubic_filter constant
_SUPPORT = 2.0


def _cubic(x: jax.Array) -> jax.Array:
  x = jnp.abs(x)
  near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * _A
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def pil_bicubic_weights(in_size: int, out_size: int) -> jax.Array:
  """(out_size, in_size) float32 weights of PIL's BICUBIC along one axis (precompute_coeffs)."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = _SUPPORT * filterscale
  center = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  # PIL: xmin = max((int)(center - support + 0.5), 0); xmax = min((int)(center + support
  # + 0.5), in); C's cast truncates toward zero.
  xmin = jnp.maximum(jnp.trunc(center - support + 0.5), 0.0)
  xmax = jnp.minimum(jnp.trunc(center + support + 0.5), float(in_size))
  j = jnp.arange(in_size, dtype=jnp.float32)[None, :]
  inside = (j >= xmin[:, None]) & (j < xmax[:, None])
  w = jnp.where(inside, _cubic((j - center[:, None] + 0.5) / filterscale), 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  return w / jnp.where(total == 0.0, 1.0, total)


def resize_bicubic(images: jax.Array, size_hw: Sequence[int],
                   round_uint8: bool = False) -> jax.Array:
  """(N, H, W, C) pixel values (0..255 scale) -> (N, h, w, C) float32, PIL BICUBIC.

  A side already at its size is left alone, as PIL skips that pass. `round_uint8` rounds and
  clips to 0..255 after each pass, as PIL does for uint8 images.
  """
  h, w = (int(v) for v in size_hw)
  x = images.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST

  def finish(y):
    return jnp.clip(jnp.round(y), 0.0, 255.0) if round_uint8 else y

  if x.shape[2] != w:
    ww = pil_bicubic_weights(x.shape[2], w)
    x = finish(jnp.einsum("nhwc,ow->nhoc", x, ww, precision=hp))
  if x.shape[1] != h:
    wh = pil_bicubic_weights(x.shape[1], h)
    x = finish(jnp.einsum("nhwc,oh->nowc", x, wh, precision=hp))
  return x


def normalize(pixels: jax.Array) -> jax.Array:
  """0..255 pixel values -> (v / 255 - mean) / std, ImageNet statistics (the reference's)."""
  mean = jnp.asarray(preprocess.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(preprocess.IMAGENET_STD, jnp.float32)
  return (pixels / 255.0 - mean) / std


def normalize_levels(levels: jax.Array) -> jax.Array:
  """Whole grey levels 0..255 (N, H, W, 3), any dtype -> normalised float32, as the host does.

  A look-up in the host's table (`preprocess.NORMALIZATION_TABLE`), so bit for bit the
  reference's float32 (v / 255 - mean) / std: XLA computes `normalize`'s divisions as
  multiplications by reciprocals, off by an ulp on two values in three.
  """
  table = jnp.asarray(preprocess.NORMALIZATION_TABLE.T.reshape(-1))  # [level * 3 + channel]
  return table[levels.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)]


def resize_normalize(images_uint8: jax.Array, size_hw: Sequence[int]) -> jax.Array:
  """uint8 (N, H, W, 3) -> normalised float32 (N, h, w, 3): the device twin of the PIL path.

  At the same size (the host resized with PIL) it is exactly the host's normalisation.
  """
  return normalize_levels(resize_bicubic(images_uint8, size_hw, round_uint8=True))
