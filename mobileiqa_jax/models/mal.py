"""Multi-view attention learning (MAL): the part of MobileIQA that forms diverse opinions.

A MAL reads n "views" of an image (n feature maps of the same (S, S, C) shape), lets each view
attend to itself (SAGAN-style `SelfAttention`), and then mixes the views with two attention
blocks: a *pixel* branch whose tokens are channels and whose features are all views' pixels, and
a *channel* branch whose tokens are pixels and whose features are all views' channels. The two
branches are averaged and the views are averaged, giving one (S, S, C) opinion feature.

Layout: everything here is NHWC. A view is (B, S, S, C); a stack of views is (n, B, S, S, C).
The reference is PyTorch (NCHW); the comments give the reference's shapes so that the two
reshapes it does — which are reinterpretations of memory, not transposes — are reproduced
exactly (the published weights depend on them; see docs/model.md, section 3).

Parameter names mirror the reference's state-dict keys (torch path split on '.'):
`attention_module/{k}/{qConv,kConv,vConv,gamma}`, `channel_attention/{c_q,c_k,c_v}`,
`feature_attention/{c_q,c_k,c_v}`. Conv kernels are HWIO (1, 1, in, out), Linear kernels
(in, out). Parameters are float32; `dtype` is the compute dtype. Softmaxes run in float32.

Scoring can run the attention blocks *folded* (`attention='folded'`, `fold_attention`): the
logits Q K^T = (X Wq + bq)(X Wk + bk)^T become (X M + u) X^T with M = Wq Wk^T and u = Wk bq,
scaled; the terms dropped are constant along the softmax's axis. Same function to float32
rounding, one (dim x dim) product fewer per block; the costs are in `fold_attention`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobileiqa_jax.models import layers

Dtype = Any


def _softmax_f32(logits: jax.Array, dtype: Dtype) -> jax.Array:
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


class _Conv1x1Params(nn.Module):
  """The variables of a 1x1 conv (kernel (1, 1, in, out) HWIO, bias); init per `head_init`."""

  features: int
  head_init: str = "torch"

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    kernel_init, bias_init = layers.dense_initializers(self.head_init, in_features)
    kernel = self.param("kernel", kernel_init, (1, 1, in_features, self.features), jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    return kernel[0, 0], bias


class _SelfAttentionParams(nn.Module):
  """One view's self-attention variables: `qConv`, `kConv`, `vConv` (1x1 convs) and `gamma`."""

  head_init: str = "torch"

  @nn.compact
  def __call__(self, c: int) -> tuple[jax.Array, ...]:
    wq, bq = _Conv1x1Params(c // 8, self.head_init, name="qConv")(c)
    wk, bk = _Conv1x1Params(c // 8, self.head_init, name="kConv")(c)
    wv, bv = _Conv1x1Params(c, self.head_init, name="vConv")(c)
    gamma = self.param("gamma", nn.initializers.zeros, (1,), jnp.float32)
    return wq, bq, wk, bk, wv, bv, gamma


def _self_attention(x: jax.Array, p: Sequence[jax.Array], dtype: Dtype) -> jax.Array:
  """Self attention of n views at once: x (n, B, H, W, C), each of `p` stacked over n."""
  n, b, h, w, c = x.shape
  wq, bq, wk, bk, wv, bv, gamma = (a.astype(dtype) for a in p)
  x = x.astype(dtype)
  xf = x.reshape(n, b, h * w, c)
  q = jnp.einsum("nbic,ncd->nbid", xf, wq) + bq[:, None, None]
  k = jnp.einsum("nbic,ncd->nbid", xf, wk) + bk[:, None, None]
  v = jnp.einsum("nbic,ncd->nbid", xf, wv) + bv[:, None, None]
  # Reference: energy = bmm(q^T (B,N,c8), k (B,c8,N)); out = bmm(v (B,C,N), attn^T).
  # In NHWC the latter is attn (B,N,N) @ v (B,N,C).
  energy = jnp.einsum("nbic,nbjc->nbij", q, k)
  attention = _softmax_f32(energy, dtype)
  out = jnp.einsum("nbij,nbjc->nbic", attention, v).reshape(n, b, h, w, c)
  return gamma[:, :, None, None, None] * out + x


class SelfAttention(nn.Module):
  """Per-view SAGAN self attention: x + gamma * (v @ softmax(q^T k)^T), gamma initialised 0.

  Input and output (B, H, W, C). q and k have C // 8 channels (reference: `in_dim // 8`), v has
  C. The energy is over the N = H*W positions flattened row-major (H, W), softmax over the
  last (key) axis. Variables: `qConv`, `kConv`, `vConv` (1x1 conv kernel/bias), `gamma` (1,).
  """

  dtype: Dtype = jnp.float32
  head_init: str = "torch"  # layers.HEAD_INITS

  def setup(self):
    self._params = _SelfAttentionParams(self.head_init)
    nn.share_scope(self, self._params)

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self._params(x.shape[-1])
    return _self_attention(x[None], [a[None] for a in p], self.dtype)[0]


class _FoldedLogitParams(nn.Module):
  """X -> X M + u, the folded half of the logits; its variables come from `fold_attention`.

  The zeros init only gives flax the shapes (it checks them against the variables passed);
  a folded model is never initialised or trained.
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m = self.param("kernel", nn.initializers.zeros, (self.features, self.features),
                   jnp.float32)
    u = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return jnp.matmul(x, m.astype(x.dtype)) + u.astype(x.dtype)


@jax.jit
def _folded_logit_params(wq: jax.Array, bq: jax.Array, wk: jax.Array) -> dict[str, jax.Array]:
  scale = wq.shape[0] ** -0.5
  hi = jax.lax.Precision.HIGHEST  # TPU/GPU would otherwise round the product to bf16/TF32.
  return {"kernel": jnp.matmul(wq, wk.T, precision=hi) * scale,
          "bias": jnp.matmul(wk, bq, precision=hi) * scale}


def fold_attention(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Variables of a model built with attention='reference' -> those of attention='folded'.

  Every attention block's `c_q` and `c_k` become `c_qk`: kernel M = Wq Wk^T * dim**-0.5
  (dim x dim) and bias u = Wk bq * dim**-0.5. Everything else is passed through, not copied.
  On (X M + u) X^T the softmax sees Q K^T * dim**-0.5 less X Wq bk + bq.bk, which are
  constant along its axis. Costs dim**3 multiply-adds per block (52 GMAC for the paper's
  head, ~0.5 s on a 2-core CPU): it pays after about 7 photos (7.7 GMAC saved per photo).
  The folded tree holds one dim x dim matrix fewer per block (100 MB for the paper's head).
  """
  def fold(tree):
    if not isinstance(tree, Mapping):
      return tree
    if {"c_q", "c_k", "c_v"} <= set(tree):
      rest = {k: v for k, v in tree.items() if k not in ("c_q", "c_k")}
      qk = _folded_logit_params(tree["c_q"]["kernel"], tree["c_q"]["bias"],
                                tree["c_k"]["kernel"])
      return {"c_qk": qk, **rest}
    return {k: fold(v) for k, v in tree.items()}

  return fold(variables)


class AttentionBlock(nn.Module):
  """The reference's `Attention(dim)` block on X of shape (B, R, dim), including its reshape.

  Q, K, V = Linear(dim, dim)(X) (`c_q`, `c_k`, `c_v`); A = softmax(Q K^T * dim^-0.5) (R x R);
  Y = A V (B, R, dim). The reference then transposes Y to (B, dim, R) and reinterprets that
  memory row-major as (B, R, dim) — NOT a transpose back — applies dropout and adds X.

  With `attention='folded'` the variables are `c_qk` (from `fold_attention`) and `c_v`, and
  the logits are (X M + u) X^T: one dim x dim product fewer.
  """

  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  head_init: str = "torch"  # layers.HEAD_INITS
  attention: str = "reference"  # runtime.ATTENTION_FORMS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    b, r, dim = x.shape
    x = x.astype(self.dtype)
    kernel_init, bias_init = layers.dense_initializers(self.head_init, dim)
    dense = lambda name: nn.Dense(dim, dtype=self.dtype, kernel_init=kernel_init,  # noqa: E731
                                  bias_init=bias_init, name=name)
    if self.attention == "folded":
      xm = _FoldedLogitParams(dim, name="c_qk")(x)
      v = dense("c_v")(x)
      # M and u already carry the scale dim**-0.5 (fold_attention).
      logits = jnp.einsum("brd,bsd->brs", xm, x)
    else:
      q = dense("c_q")(x)
      k = dense("c_k")(x)
      v = dense("c_v")(x)
      # Reference order: (q @ k^T) * norm_fact, then softmax over the last axis.
      logits = jnp.einsum("brd,bsd->brs", q, k) * jnp.asarray(dim ** -0.5, self.dtype)
    attn = _softmax_f32(logits, self.dtype)
    # (A V)^T computed directly as (B, dim, R), then the reference's row-major reinterpretation.
    y_t = jnp.einsum("brs,bsd->bdr", attn, v)
    y = y_t.reshape(b, r, dim)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return x + y


class _SelfAttentionList(nn.Module):
  """`attention_module` of the reference: a ModuleList of per-view SelfAttention ('0'..'n-1').

  The views all have the same shape, so the n attentions run as one batched computation on
  the stacked per-view weights (same numbers as n separate calls; far fewer XLA ops).
  """

  num_views: int
  dtype: Dtype = jnp.float32
  head_init: str = "torch"

  @nn.compact
  def __call__(self, views: jax.Array) -> jax.Array:
    """views (n, B, H, W, C) -> (n, B, H, W, C)."""
    if views.shape[0] != self.num_views:
      raise ValueError(f"expected {self.num_views} views, got {views.shape[0]}")
    c = views.shape[-1]
    per_view = [_SelfAttentionParams(self.head_init, name=str(i))(c)
                for i in range(self.num_views)]
    stacked = [jnp.stack(p) for p in zip(*per_view)]
    return _self_attention(views, stacked, self.dtype)


class MAL(nn.Module):
  """Multi-view attention learning over n views of shape (B, S, S, C).

  Input: a stacked array (n, B, S, S, C) or a sequence of n (B, S, S, C) arrays.
  Output: (B, S, S, C). Reference steps (NCHW shapes; N = S*S):

  1. view k -> `attention_module[k]`; stack (n, B, C, S, S);
  2. T = rearrange 'n b c h w -> b (n c) (h w)' (B, n*C, N), channel index view*C + c;
  3. pixel branch: P = T reinterpreted row-major as (B, C, n*N) (channel j -> row j // n,
     slot j % n; last index slot*N + position); P' = feature_attention(P), dim n*N;
  4. channel branch: Q = T^T (B, N, n*C); Q' = channel_attention(Q), dim n*C;
  5. (P' reinterpreted back to (B, n*C, N) + Q'^T) / 2;
  6. view as (B, n, C, N), mean over n -> (B, C, N).

  In NHWC, Q is simply the views concatenated along channels, (B, N, n*C); only the pixel
  branch needs a transpose in and out.
  """

  num_views: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  head_init: str = "torch"  # layers.HEAD_INITS: Conv/Linear init (gamma starts at 0 in both)
  attention: str = "reference"  # runtime.ATTENTION_FORMS

  @nn.compact
  def __call__(self, views: jax.Array | Sequence[jax.Array], train: bool = False) -> jax.Array:
    n = self.num_views
    if not isinstance(views, jax.Array):
      views = jnp.stack(list(views))
    views = _SelfAttentionList(n, dtype=self.dtype, head_init=self.head_init,
                               name="attention_module")(views)
    _, b, h, w, c = views.shape
    npix = h * w
    # Q = T^T: (n, B, N, C) -> (B, N, n, C) -> (B, N, n*C), channel index view*C + c.
    q_in = jnp.transpose(views.reshape(n, b, npix, c), (1, 2, 0, 3)).reshape(b, npix, n * c)
    # Pixel branch: T (B, n*C, N) -> reinterpret as (B, C, n*N).
    p_in = jnp.swapaxes(q_in, 1, 2).reshape(b, c, n * npix)
    p_out = AttentionBlock(self.dropout_rate, dtype=self.dtype, head_init=self.head_init,
                           attention=self.attention, name="feature_attention")(p_in, train)
    # Inverse reinterpretation (B, C, n*N) -> (B, n*C, N), then to (B, N, n*C).
    p_back = jnp.swapaxes(p_out.reshape(b, n * c, npix), 1, 2)
    q_out = AttentionBlock(self.dropout_rate, dtype=self.dtype, head_init=self.head_init,
                           attention=self.attention, name="channel_attention")(q_in, train)
    res = (p_back + q_out) / 2
    # View as (B, n, C, N) and average the views: here (B, N, n, C) mean over n.
    res = jnp.mean(res.reshape(b, npix, n, c), axis=2)
    return res.reshape(b, h, w, c)
