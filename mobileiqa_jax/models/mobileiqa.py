"""MobileIQA: a mobile backbone + the IQA head (LDAs, MALs, fusion MAL, regressor).

    images (B, H, W, 3) --backbone--> 5 features (strides 2..32)
      --LDA_i--> x: (5, B, S, S, C)              (S = 22, C = 256 in the paper)
      --MALs[j](x), j < 3--> DOF: (3, B, S, S, C) (diverse opinion features)
      --fusion_mal(DOF)--> fused: (B, S, S, C)    (image quality feature)
      --regressor--> score (B,)

Layout: everything is NHWC, so x is (views, B, S, S, C) and DOF (mals, B, S, S, C); the
reference's are (views, B, C, S, S) / (mals, B, C, S, S). The distillation MSEs are means
over all elements and do not depend on the layout.

Teacher (MobileViT-IQA): backbone `mobilevitv2_200` under `global_vit`, LDAs `LGF1..LGF5`,
regressor pool 4, no sigmoid. Student (MobileNet-IQA): `mobilenetv3_large_100` under
`local_cnn`, LDAs `LDA1..LDA5`, pool 2, sigmoid. Parameter paths mirror the authors' PyTorch
state-dict keys split on '.', e.g. `MALs/0/feature_attention/c_q/kernel`, `cnn/3/kernel`,
`fc_score/0/kernel`, so the converter maps keys one to one.

Use `mobileiqa_teacher()` / `mobileiqa_student()` or `build_model(config_dict)`;
`MobileIQAConfig` is the serialisable description a checkpoint stores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mobileiqa_jax.models import layers
from mobileiqa_jax.models import runtime as runtime_lib
from mobileiqa_jax.models.mal import MAL

Dtype = Any

def _gelu_grad(z: jax.Array) -> jax.Array:
  """d/dz of the exact GELU z * Phi(z): Phi(z) + z * phi(z)."""
  cdf = 0.5 * (1.0 + jax.lax.erf(z * (2.0 ** -0.5)))
  pdf = jnp.exp(-0.5 * z * z) * ((2.0 * np.pi) ** -0.5)
  return cdf + z * pdf


def _banded_gelu_pool_rows(x: jax.Array, w: jax.Array, b: jax.Array, idx: np.ndarray,
                           weights: np.ndarray, gelu_form: str = "erf") -> jax.Array:
  """sum_k weights[i, k] * GELU(x[:, idx[i, k]] @ w + b) for every pooled row band i.

  x (B, H, W, C), w (C, D), b (D,); idx and weights (S, K) are PyTorch's adaptive-pool row
  windows (`layers.adaptive_windows`). Returns (B, S, W, D).

  Written as a custom VJP so that neither pass ever holds the (B, H, W, D) activation, and
  the backward pass never writes GELU's output at all: per band it recomputes z = x w + b,
  forms the one array it needs, g_z = GELU'(z) * (window weight * upstream gradient), and
  feeds it to the two matmuls of dx and dw. Only x, w, b are kept for the backward pass.
  The bands are the scan's xs (a free reshape when S divides H, one gather otherwise), so
  the input gradient comes back as the scan's ys: one write, not a full-size accumulation
  per band as the transpose of a per-band gather would be.
  """
  s, k = idx.shape
  bsz, h, wdt, c = x.shape
  equal = h == s * k and np.array_equal(idx.reshape(-1), np.arange(h))

  def bands_of(xx):  # (S, B, K, W, C)
    if equal:
      bands = xx.reshape(bsz, s, k, wdt, c)
    else:
      bands = jnp.take(xx, jnp.asarray(idx.reshape(-1)), axis=1).reshape(bsz, s, k, wdt, c)
    return jnp.moveaxis(bands, 1, 0)

  def unbands(g_bands):  # (S, B, K, W, C) -> (B, H, W, C), overlapping rows summed
    g = jnp.moveaxis(g_bands, 0, 1)
    if equal:
      return g.reshape(bsz, h, wdt, c)
    g = g.reshape(bsz, s * k, wdt, c)
    return jnp.zeros((bsz, h, wdt, c), g.dtype).at[:, jnp.asarray(idx.reshape(-1))].add(g)

  wts = jnp.asarray(weights, x.dtype)

  def forward(xx, ww, bb):
    def band_fn(_, band_and_wt):
      band, wt = band_and_wt
      y = layers.gelu(jnp.einsum("bkwc,cd->bkwd", band, ww) + bb, gelu_form)
      acc = y[:, 0] * wt[0]
      for j in range(1, k):  # Unrolled: XLA:CPU reduces a middle axis slowly.
        acc = acc + y[:, j] * wt[j]
      return None, acc
    _, rows = jax.lax.scan(band_fn, None, (bands_of(xx), wts))
    return jnp.moveaxis(rows, 0, 1)

  pooled = jax.custom_vjp(forward)

  def pooled_fwd(xx, ww, bb):
    return forward(xx, ww, bb), (xx, ww, bb)

  def pooled_bwd(res, g):
    xx, ww, bb = res
    g = jnp.moveaxis(g, 1, 0)  # (S, B, W, D)

    def band_bwd(carry, band_g_wt):
      dw, db = carry
      band, g_rows, wt = band_g_wt
      z = jnp.einsum("bkwc,cd->bkwd", band, ww) + bb
      g_z = _gelu_grad(z) * (wt[None, :, None, None] * g_rows[:, None])
      dx = jnp.einsum("bkwd,cd->bkwc", g_z, ww)
      dw = dw + jnp.einsum("bkwc,bkwd->cd", band, g_z, preferred_element_type=jnp.float32)
      db = db + jnp.sum(g_z.astype(jnp.float32), axis=(0, 1, 2))
      return (dw, db), dx

    init = (jnp.zeros(ww.shape, jnp.float32), jnp.zeros(bb.shape, jnp.float32))
    (dw, db), dx_bands = jax.lax.scan(band_bwd, init, (bands_of(xx), g, wts))
    return unbands(dx_bands).astype(xx.dtype), dw.astype(ww.dtype), db.astype(bb.dtype)

  pooled.defvjp(pooled_fwd, pooled_bwd)
  return pooled(x, w, b)


class _PointwiseGeluPool(nn.Module):
  """The LDA's `cnn1` (1x1 conv) fused with the exact GELU and adaptive pool that follow it.

  On a large feature (the stride-2 one is 616x954 at the paper's resolution) the (H, W, 2C)
  hidden activation is the largest array of the whole model (1.2 GB per image for the
  teacher). Computed one pooled row band at a time inside a `lax.scan`
  (`_banded_gelu_pool_rows`), it never exists whole, in the forward or the backward pass.
  Same windows and numbers as conv -> GELU -> `layers.adaptive_avg_pool2d` (float32
  rounding); on 2 CPU cores it is also ~2.7x faster, as XLA:CPU does not write and re-read
  the whole activation. `banded=False` is the reference's form (`runtime.Runtime.lda`).
  """

  features: int
  pooled_size: int
  dtype: Dtype = jnp.float32
  head_init: str = "torch"
  banded: bool = True
  gelu_form: str = "erf"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_init, bias_init = layers.dense_initializers(self.head_init, x.shape[-1])
    kernel = self.param("kernel", kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    w, b = kernel[0, 0].astype(self.dtype), bias.astype(self.dtype)
    s, h = self.pooled_size, x.shape[1]
    if h <= 2 * s or not self.banded:  # Small features: the plain form is as cheap.
      return layers.adaptive_avg_pool2d(
          layers.gelu(jnp.einsum("bhwc,cd->bhwd", x, w) + b, self.gelu_form), s)
    idx, weights = layers.adaptive_windows(h, s)
    pooled_rows = _banded_gelu_pool_rows(x, w, b, idx, weights, self.gelu_form)
    return layers.adaptive_avg_pool2d(pooled_rows, (s, s))


class LDA(nn.Module):
  """Local distortion aware module: 1x1 conv (C_i -> 2C) -> exact GELU ->
  adaptive average pool to S x S (PyTorch windows) -> 1x1 conv (2C -> C).

  Param names `cnn1`, `cnn2` as the reference. Input (B, H, W, C_i), output (B, S, S, C).
  """

  width: int = 256
  pooled_size: int = 22
  dtype: Dtype = jnp.float32
  head_init: str = "torch"  # layers.HEAD_INITS
  banded: bool = True  # runtime.Runtime.lda
  gelu_form: str = "erf"  # runtime.Runtime.gelu

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    x = _PointwiseGeluPool(2 * self.width, self.pooled_size, self.dtype, self.head_init,
                           self.banded, self.gelu_form, name="cnn1")(x)
    kernel_init, bias_init = layers.dense_initializers(self.head_init, 2 * self.width)
    return nn.Conv(self.width, (1, 1), padding="VALID", dtype=self.dtype,
                   kernel_init=kernel_init, bias_init=bias_init, name="cnn2")(x)


class _RegressorConv(nn.Module):
  """The reference's `cnn` Sequential: 0 conv1x1 (C -> C/2), 1 ReLU, 2 AvgPool2d(k),
  3 conv3x3 VALID (C/2 -> C/2), 4 ReLU, then a global average."""

  pool: int
  width: int
  dtype: Dtype = jnp.float32
  head_init: str = "torch"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.width // 2
    k0, b0 = layers.dense_initializers(self.head_init, self.width)
    k3, b3 = layers.dense_initializers(self.head_init, 9 * h)
    x = nn.relu(nn.Conv(h, (1, 1), padding="VALID", dtype=self.dtype, kernel_init=k0,
                        bias_init=b0, name="0")(x))
    x = layers.avg_pool2d(x, self.pool)
    x = nn.relu(nn.Conv(h, (3, 3), padding="VALID", dtype=self.dtype, kernel_init=k3,
                        bias_init=b3, name="3")(x))
    return jnp.mean(x, axis=(1, 2))


class _RegressorFC(nn.Module):
  """The reference's `fc_score` Sequential: 0 Linear (C/2 -> C/4), 1 ReLU, 2 Dropout,
  3 Linear (C/4 -> 1)."""

  width: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  head_init: str = "torch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k0, b0 = layers.dense_initializers(self.head_init, self.width // 2)
    k3, b3 = layers.dense_initializers(self.head_init, self.width // 4)
    x = nn.relu(nn.Dense(self.width // 4, dtype=self.dtype, kernel_init=k0, bias_init=b0,
                         name="0")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(1, dtype=self.dtype, kernel_init=k3, bias_init=b3, name="3")(x)


class Regressor(nn.Module):
  """Quality regressor: fused feature (B, S, S, C) -> score (B,) float32.

  conv1x1 (C -> C/2) -> ReLU -> AvgPool k x k (stride k) -> conv3x3 VALID -> ReLU ->
  global average -> Linear (C/2 -> C/4) -> ReLU -> Dropout -> Linear (-> 1) [-> sigmoid].
  With S = 22: k = 4 gives 5x5 -> 3x3, k = 2 gives 11x11 -> 9x9 before the average.
  Parameters under `cnn/{0,3}` and `fc_score/{0,3}` (inside `MobileIQA` they share its scope,
  so those are top-level paths as in the reference).
  """

  pool: int = 4
  width: int = 256
  sigmoid: bool = False
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  head_init: str = "torch"  # layers.HEAD_INITS

  def setup(self):
    self.cnn = _RegressorConv(self.pool, self.width, self.dtype, self.head_init)
    self.fc_score = _RegressorFC(self.width, self.dropout_rate, self.dtype, self.head_init)

  def __call__(self, fused: jax.Array, train: bool = False) -> jax.Array:
    s = fused.shape[1]
    if s // self.pool < 3:
      raise ValueError(
          f"regressor: pooled side {s} // pool {self.pool} = {s // self.pool} is smaller than "
          "the 3x3 VALID conv; use a larger pooled_size or a smaller regressor_pool.")
    y = self.fc_score(self.cnn(fused.astype(self.dtype)), train)
    y = y.astype(jnp.float32)
    if self.sigmoid:
      y = jax.nn.sigmoid(y)
    return y[:, 0]


class _MALList(nn.Module):
  """The reference's `MALs` ModuleList ('0'..'m-1'), each MAL reading all views."""

  num_mals: int
  num_views: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  head_init: str = "torch"
  attention: str = "reference"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return jnp.stack([
        MAL(self.num_views, self.dropout_rate, dtype=self.dtype, head_init=self.head_init,
            attention=self.attention, name=str(j))(x, train)
        for j in range(self.num_mals)
    ])


class MobileIQA(nn.Module):
  """Backbone + IQA head.

  Attributes:
    backbone: a Flax module; `backbone(images_nhwc, train=train, example_mask=mask)` returns
      a list of NHWC features (5 for the paper's backbones). Its variables live under
      `backbone_name`.
    backbone_name: 'global_vit' (teacher) or 'local_cnn' (student).
    lda_prefix: 'LGF' (teacher) or 'LDA' (student); LDAs are named prefix1..prefixV.
    pooled_size: S, the side every LDA pools to (22).
    width: C, the head's channel width (256); LDA hidden 2C, self-attention q/k C // 8,
      regressor C/2 and C/4.
    num_mals: number of opinion MALs (3); the fusion MAL has that many views.
    regressor_pool: k of the regressor's average pool (teacher 4, student 2).
    sigmoid: end the score with a sigmoid (student).
    dropout_rate: dropout of the attention blocks and the regressor; active only when
      `train=True` (then pass `rngs={'dropout': key}`).
    dtype: compute dtype (parameters stay float32; the score is returned float32).
    head_init: initialisation of every Conv/Linear of the head and LDAs: 'torch' (PyTorch's
      defaults, weights and biases U(+-1/sqrt(fan_in)), as the authors' head starts) or
      'flax' (lecun_normal kernels, zero biases). The self-attention gammas start at 0 in
      both; the backbone keeps its own init (normally replaced by timm weights).
    attention: the MALs' attention form ('reference' or 'folded', `runtime.Runtime`);
      a folded model takes `mal.fold_attention` of a reference model's variables.
    lda_banded, gelu_form: the LDAs' forms (`runtime.Runtime.lda`, `.gelu`).

  Methods (all usable through `model.apply(variables, ..., method=...)`):
    __call__(images, train=False, return_features=False, return_fused=False,
             example_mask=None)
    forward_features(images, train=False, example_mask=None) -> (x, dof, fused)
    views(images, train=False, example_mask=None) -> x
    opinions(x, train=False) -> (dof, fused)   (views and opinions: forward_features' halves)
    regress(fused, train=False) -> score   (e.g. the teacher's regressor on the student's
      fused feature: `teacher.apply(t_vars, s_fused, method='regress')`)
  """

  backbone: nn.Module
  backbone_name: str = "global_vit"
  lda_prefix: str = "LGF"
  pooled_size: int = 22
  width: int = 256
  num_mals: int = 3
  regressor_pool: int = 4
  sigmoid: bool = False
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  head_init: str = "torch"
  attention: str = "reference"
  lda_banded: bool = True
  gelu_form: str = "erf"

  def setup(self):
    # The backbone field is re-registered under the reference's name ('global_vit' or
    # 'local_cnn'); the field itself is never called and owns no variables.
    setattr(self, self.backbone_name, self.backbone.clone(name=None, parent=None))
    self._lda_names = tuple(f"{self.lda_prefix}{i + 1}" for i in range(self._num_views()))
    for name in self._lda_names:
      setattr(self, name, LDA(self.width, self.pooled_size, self.dtype, self.head_init,
                                  self.lda_banded, self.gelu_form))
    self.MALs = _MALList(self.num_mals, self._num_views(), self.dropout_rate, self.dtype,
                         self.head_init, self.attention)
    self.fusion_mal = MAL(self.num_mals, self.dropout_rate, dtype=self.dtype,
                          head_init=self.head_init, attention=self.attention)
    self.regressor = Regressor(
        self.regressor_pool, self.width, self.sigmoid, self.dropout_rate, self.dtype,
        self.head_init)
    # `cnn` and `fc_score` are top-level in the reference: no `regressor` scope of its own.
    nn.share_scope(self, self.regressor)

  def _num_views(self) -> int:
    chans = getattr(self.backbone, "feature_channels", None)
    return len(chans) if chans is not None else 5

  def forward_features(
      self, images: jax.Array, train: bool = False, example_mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """images (B, H, W, 3) -> x (V, B, S, S, C), dof (M, B, S, S, C), fused (B, S, S, C).

    `example_mask` as in `__call__`.
    """
    x = self.views(images, train, example_mask)
    dof, fused = self.opinions(x, train)
    return x, dof, fused

  def views(self, images: jax.Array, train: bool = False,
            example_mask: jax.Array | None = None) -> jax.Array:
    """The backbone and the LDAs: images (B, H, W, 3) -> x (V, B, S, S, C).

    Everything that grows with the input size; what follows works on S x S. In inference
    mode each photo's views depend on that photo alone, so a scorer may run this part one
    photo at a time (`inference.apply_for_scoring`); in training BatchNorm couples the batch
    (over the examples `example_mask` sets, as in `__call__`).
    """
    feats = getattr(self, self.backbone_name)(images, train=train, example_mask=example_mask)
    if len(feats) != len(self._lda_names):
      raise ValueError(
          f"backbone returned {len(feats)} features, expected {len(self._lda_names)}")
    return jnp.stack([getattr(self, n)(f) for n, f in zip(self._lda_names, feats)])

  def opinions(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """The MALs: views x (V, B, S, S, C) -> dof (M, B, S, S, C), fused (B, S, S, C)."""
    dof = self.MALs(x, train)
    return dof, self.fusion_mal(dof, train)

  def regress(self, fused: jax.Array, train: bool = False) -> jax.Array:
    """The regressor alone: fused (B, S, S, C) -> score (B,) float32."""
    return self.regressor(fused, train)

  def __call__(
      self,
      images: jax.Array,
      train: bool = False,
      return_features: bool = False,
      return_fused: bool = False,
      example_mask: jax.Array | None = None,
  ):
    """Scores images (B, H, W, 3), ImageNet-normalised.

    `example_mask` ([B] bool or 0/1, or None for all) is the examples that the backbone's
    BatchNorm statistics count in training (`train=True`): a last batch padded to full size
    then normalises and updates its running statistics exactly as its real examples alone
    would (`layers.BatchNorm2d`). Every output still has all B rows; the caller leaves the
    padded ones out of its loss. Inference does not read the mask.

    Returns score (B,) float32; with `return_features`, (x, dof, score); with
    `return_fused` as well, (x, dof, score, fused); with only `return_fused`,
    (score, fused).
    """
    x, dof, fused = self.forward_features(images, train, example_mask)
    score = self.regress(fused, train)
    if return_features and return_fused:
      return x, dof, score, fused
    if return_features:
      return x, dof, score
    if return_fused:
      return score, fused
    return score


# ---------------------------------------------------------------------------------------------
# Serialisable configuration and presets.

_VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "teacher": dict(backbone="mobilevitv2_200", backbone_name="global_vit", lda_prefix="LGF",
                    regressor_pool=4, sigmoid=False),
    "student": dict(backbone="mobilenetv3_large_100", backbone_name="local_cnn",
                    lda_prefix="LDA", regressor_pool=2, sigmoid=True),
}


@dataclasses.dataclass(frozen=True)
class MobileIQAConfig:
  """Everything needed to rebuild a `MobileIQA` (stored with checkpoints).

  `backbone` is a timm name (`mobilevitv2_050` ... `mobilevitv2_200`, `mobilenetv3_*`); the
  backbone's width is part of its name. `backbone_kwargs` go to the backbone factory as well
  (none of the presets uses any). How the model runs (compute dtype, depthwise form, remat) is
  not part of it: that is the `runtime.Runtime` given to `build_model`.
  """

  variant: str = "teacher"
  backbone: str = "mobilevitv2_200"
  backbone_name: str = "global_vit"
  lda_prefix: str = "LGF"
  pooled_size: int = 22
  width: int = 256
  num_mals: int = 3
  regressor_pool: int = 4
  sigmoid: bool = False
  dropout_rate: float = 0.1
  head_init: str = "torch"
  backbone_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["backbone_kwargs"] = dict(self.backbone_kwargs)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MobileIQAConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    in_runtime = sorted(set(d) & set(runtime_lib.LEGACY_RUNTIME_KEYS))
    if in_runtime:
      raise ValueError(f"{in_runtime} say how a model runs, not what it is: give them to "
                       "build_model as runtime=Runtime(compute_dtype=..., depthwise_impl=...)")
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown MobileIQA config keys {unknown}; known: {sorted(known)}")
    d = dict(d)
    if "backbone_kwargs" in d:
      d["backbone_kwargs"] = dict(d["backbone_kwargs"] or {})
    return cls(**d)


def model_config(variant: str, **overrides: Any) -> MobileIQAConfig:
  """The teacher's or student's config with `overrides` (any `MobileIQAConfig` field)."""
  if variant not in _VARIANT_DEFAULTS:
    raise ValueError(f"variant must be one of {sorted(_VARIANT_DEFAULTS)}, got {variant!r}")
  d = dict(variant=variant, **_VARIANT_DEFAULTS[variant])
  d.update(overrides)
  return MobileIQAConfig.from_dict(d)


def _backbone_factory(name: str) -> Callable[..., nn.Module]:
  # Imported lazily so this module imports without the backbone modules.
  if name.startswith("mobilevitv2"):
    from mobileiqa_jax.models import mobilevitv2 as mod
  elif name.startswith("mobilenetv3"):
    from mobileiqa_jax.models import mobilenetv3 as mod
  else:
    raise ValueError(f"unknown backbone {name!r} (expected mobilevitv2_* or mobilenetv3_*)")
  if name not in mod.BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; {mod.__name__} has {sorted(mod.BACKBONES)}")
  return mod.BACKBONES[name]


def build_backbone(name: str, runtime: runtime_lib.Runtime = runtime_lib.DEFAULT,
                   **kwargs: Any) -> nn.Module:
  """A Flax features backbone by timm name, running as `runtime` says."""
  factory = _backbone_factory(name)
  return factory(**dict(kwargs, dtype=jnp.dtype(runtime.compute_dtype),
                        **runtime.backbone_kwargs()))


def build_model(config: MobileIQAConfig | Mapping[str, Any],
                runtime: runtime_lib.Runtime | None = None) -> MobileIQA:
  """Builds a `MobileIQA` from its architecture and how it runs.

  This is the one place where an architecture and a runtime meet.

  Args:
    config: a `MobileIQAConfig` or its `to_dict()`.
    runtime: compute dtype, depthwise form and remat; None is `runtime.DEFAULT` (float32,
      'shift', no remat), the same on every host.
  """
  if not isinstance(config, MobileIQAConfig):
    config = MobileIQAConfig.from_dict(config)
  runtime = runtime or runtime_lib.DEFAULT
  dtype = jnp.dtype(runtime.compute_dtype)
  backbone = build_backbone(config.backbone, runtime, **dict(config.backbone_kwargs))
  return MobileIQA(
      backbone=backbone,
      backbone_name=config.backbone_name,
      lda_prefix=config.lda_prefix,
      pooled_size=config.pooled_size,
      width=config.width,
      num_mals=config.num_mals,
      regressor_pool=config.regressor_pool,
      sigmoid=config.sigmoid,
      dropout_rate=config.dropout_rate,
      dtype=dtype,
      head_init=config.head_init,
      attention=runtime.attention,
      lda_banded=runtime.lda == "banded",
      gelu_form=runtime.gelu,
  )


def mobileiqa_teacher(runtime: runtime_lib.Runtime | None = None, **overrides: Any) -> MobileIQA:
  """MobileViT-IQA (teacher): mobilevitv2_200 under `global_vit`, LDAs `LGF*`, pool 4."""
  return build_model(model_config("teacher", **overrides), runtime)


def mobileiqa_student(runtime: runtime_lib.Runtime | None = None, **overrides: Any) -> MobileIQA:
  """MobileNet-IQA (student): mobilenetv3_large_100 under `local_cnn`, LDAs `LDA*`, pool 2,
  sigmoid."""
  return build_model(model_config("student", **overrides), runtime)


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of parameters in `variables['params']`."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(variables["params"]))
