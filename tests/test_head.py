"""The MobileIQA head and whole models against the PyTorch reference (weights/torch_reference.py).

Parity is max |JAX - PyTorch| / max |PyTorch| in float32, with non-trivial weights: every
self-attention gamma in [0.5, 1.5] (at 0 the attention paths would be invisible) and
BatchNorm statistics away from 0/1. The torch state dicts are mapped to Flax by the project's
converter, `convert.torch_to_flax`, strictly against each Flax module's own init tree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileiqa_jax.weights import convert
from mobileiqa_jax.models import layers
from mobileiqa_jax.models.mal import MAL
from mobileiqa_jax.models.mal import AttentionBlock
from mobileiqa_jax.models.mal import SelfAttention
from mobileiqa_jax.models.mal import fold_attention
from mobileiqa_jax.models.mobileiqa import (
    LDA, MobileIQA, MobileIQAConfig, Regressor, model_config)
from support import randomize_torch, rel_err

TOL = 1e-4


# ------------------------------------------------------------------------------------------
# Helpers.

def shapes_of(tree) -> dict:
  return {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(dict(tree))}


def load(module, torch_module, *init_args, **init_kwargs):
  """`torch_module`'s variables by the project's converter, against `module.init`'s tree.

  `convert.torch_to_flax` is strict: a key on one side only, or a shape mismatch, raises
  `ConversionError` naming it. The converted tree must also equal the init tree (paths, shapes).
  """
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *init_args, **init_kwargs))
  variables = convert.torch_to_flax(torch_module.state_dict(), shapes,
                                    source=type(torch_module).__name__)
  assert shapes_of(variables) == shapes_of(shapes)
  return jax.tree.map(jnp.asarray, variables)


def to_nhwc(t):
  """Torch (..., C, H, W) -> numpy (..., H, W, C)."""
  a = t.detach().numpy()
  return np.moveaxis(a, -3, -1)


def from_nhwc(a):
  return np.moveaxis(np.asarray(a), -1, -3)


# ------------------------------------------------------------------------------------------
# A stand-in backbone: five strided 3x3 conv + BN + ReLU stages (strides 2..32).

TOY_CHANNELS = (8, 12, 16, 20, 24)


class ToyBackbone(nn.Module):
  channels: tuple = TOY_CHANNELS
  dtype: jnp.dtype = jnp.float32

  @property
  def feature_channels(self):
    return self.channels

  @nn.compact
  def __call__(self, x, train=False, example_mask=None):
    feats = []
    x = x.astype(self.dtype)
    for i, c in enumerate(self.channels):
      x = layers.conv2d(c, 3, 2, use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
      x = layers.batch_norm(train, dtype=self.dtype, name=f"bn{i}")(x, example_mask)
      x = nn.relu(x)
      feats.append(x)
    return feats


def torch_toy_backbone():
  import torch
  from torch import nn as tnn

  class TorchToy(tnn.Module):
    def __init__(self):
      super().__init__()
      cin = 3
      for i, c in enumerate(TOY_CHANNELS):
        setattr(self, f"conv{i}", tnn.Conv2d(cin, c, 3, 2, 1, bias=False))
        setattr(self, f"bn{i}", tnn.BatchNorm2d(c))
        cin = c

    def forward(self, x):
      feats = []
      for i in range(len(TOY_CHANNELS)):
        x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        feats.append(x)
      return feats

  return TorchToy()


def he_regressor_(tm, seed=0):
  """He-normal regressor weights and zero biases: with PyTorch's default init the score is
  almost all bias (it varies ~1e-4 between images), so a relative check on it would hardly
  see the features. Here it follows the image."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in (tm.cnn[0], tm.cnn[3], tm.fc_score[0], tm.fc_score[3]):
      fan_in = m.weight[0].numel()
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      m.bias.zero_()
  return tm


def assert_score_varies(score_t, sigmoid=False):
  s = score_t.detach().double().numpy()
  if sigmoid:
    s = np.log(s / (1 - s))  # the logit: a sigmoid near 0.5 flattens the spread
  spread = float(s.max() - s.min()) / float(np.abs(s).max())
  assert spread > 1e-2, (s, "the score hardly depends on the image")


def toy_models(seed=0, *, pooled_size=6, width=32, regressor_pool=2, sigmoid=True,
               teacher_names=False, num_mals=3, dtype=jnp.float32):
  torch = pytest.importorskip("torch")
  from mobileiqa_jax.weights import torch_reference as ref

  names = ("global_vit", "LGF") if teacher_names else ("local_cnn", "LDA")
  torch.manual_seed(seed)
  tm = ref.MobileIQA(torch_toy_backbone(), TOY_CHANNELS, names[0], names[1],
                     pooled_size=pooled_size, width=width, num_mals=num_mals,
                     regressor_pool=regressor_pool, sigmoid=sigmoid)
  randomize_torch(tm, seed, conv_bias=False).eval()
  he_regressor_(tm, seed)
  jm = MobileIQA(ToyBackbone(dtype=dtype), backbone_name=names[0], lda_prefix=names[1],
                 pooled_size=pooled_size, width=width, num_mals=num_mals,
                 regressor_pool=regressor_pool, sigmoid=sigmoid, dtype=dtype)
  return tm, jm


# ------------------------------------------------------------------------------------------
# Components.

def test_self_attention_parity():
  torch = pytest.importorskip("torch")
  from mobileiqa_jax.weights import torch_reference as ref

  torch.manual_seed(0)
  tm = randomize_torch(ref.SelfAttention(32), 1, conv_bias=False).eval()
  assert float(tm.gamma.detach()) > 0.4
  x = torch.randn(2, 32, 6, 7)  # non-square: checks the row-major (H, W) flattening
  with torch.no_grad():
    want = tm(x)
  jm = SelfAttention()
  v = load(jm, tm, jnp.zeros((1, 6, 7, 32)))
  got = jm.apply(v, jnp.asarray(to_nhwc(x)))
  assert rel_err(from_nhwc(got), want) < TOL


@pytest.mark.parametrize("r,dim", [(12, 20), (20, 12)])
def test_attention_block_parity(r, dim):
  torch = pytest.importorskip("torch")
  from mobileiqa_jax.weights import torch_reference as ref

  torch.manual_seed(1)
  tm = ref.Attention(dim).eval()
  x = torch.randn(2, r, dim)
  with torch.no_grad():
    want = tm(x)
  jm = AttentionBlock()
  v = load(jm, tm, jnp.zeros((1, r, dim)))
  got = jm.apply(v, jnp.asarray(x.numpy()))
  assert rel_err(got, want) < TOL
  # The folded form (scoring): c_q, c_k -> c_qk = (Wq Wk^T, Wk bq) scaled; c_v is not copied.
  folded = fold_attention(v)
  assert set(folded["params"]) == {"c_qk", "c_v"}
  assert folded["params"]["c_v"] is v["params"]["c_v"]
  assert folded["params"]["c_qk"]["kernel"].shape == (dim, dim)
  got_folded = AttentionBlock(attention="folded").apply(folded, jnp.asarray(x.numpy()))
  assert rel_err(got_folded, want) < TOL
  # The reshape is a reinterpretation: undoing it with a transpose must give other numbers.
  with torch.no_grad():
    q, k, vv = tm.c_q(x), tm.c_k(x), tm.c_v(x)
    naive = torch.softmax(q @ k.transpose(-2, -1) * dim ** -0.5, -1) @ vv + x
  assert rel_err(got, naive) > 1e-2


def _mal_case(n, size, width, batch, seed, attention="reference"):
  torch = pytest.importorskip("torch")
  from mobileiqa_jax.weights import torch_reference as ref

  torch.manual_seed(seed)
  tm = randomize_torch(ref.MAL(width, n, size), seed, conv_bias=False).eval()
  x = torch.randn(n, batch, width, size, size)
  with torch.no_grad():
    want = tm(x).view(batch, width, size, size)
  v = load(MAL(n), tm, jnp.zeros((n, 1, size, size, width)))
  if attention == "folded":
    v = fold_attention(v)
  got = jax.jit(MAL(n, attention=attention).apply)(v, jnp.asarray(to_nhwc(x)))
  err = rel_err(from_nhwc(got), want)
  print(f"MAL n={n} S={size} C={width} {attention}: {err:.2e}")
  return err


@pytest.mark.parametrize("n", [5, 3])
def test_mal_parity_small(n):
  assert _mal_case(n, size=6, width=32, batch=2, seed=n) < TOL


@pytest.mark.parametrize("attention", ["reference", "folded"])
def test_mal_parity_real_size(attention):
  """n = 5, S = 22, C = 256: the 2420 x 2420 pixel branch of the paper."""
  assert _mal_case(5, size=22, width=256, batch=1, seed=7, attention=attention) < TOL


@pytest.mark.parametrize("pool,sigmoid,size", [(4, False, 22), (2, True, 22), (2, False, 8)])
def test_regressor_parity(pool, sigmoid, size):
  torch = pytest.importorskip("torch")
  from mobileiqa_jax.weights import torch_reference as ref

  torch.manual_seed(pool)
  tm = he_regressor_(ref.Regressor(256, pool, sigmoid).eval(), pool)
  f = torch.randn(3, 256, size, size) + torch.linspace(-1, 1, 3).view(3, 1, 1, 1)
  with torch.no_grad():
    want = tm(f)
  assert_score_varies(want, sigmoid)
  jm = Regressor(pool=pool, width=256, sigmoid=sigmoid)
  v = load(jm, tm, jnp.zeros((1, size, size, 256)))
  got = jm.apply(v, jnp.asarray(to_nhwc(f)))
  assert got.shape == (3,) and got.dtype == jnp.float32
  assert rel_err(got, want) < TOL


def test_regressor_too_small_raises():
  jm = Regressor(pool=4, width=32)
  with pytest.raises(ValueError, match="3x3"):
    jm.init(jax.random.key(0), jnp.zeros((1, 8, 8, 32)))


def test_lda_parity_overlapping_windows():
  torch = pytest.importorskip("torch")
  from mobileiqa_jax.weights import torch_reference as ref

  torch.manual_seed(3)
  tm = ref.LDA(12, 16, 6).eval()
  # Overlapping windows (banded: H > 2S), equal windows (banded), repeated rows (H < S),
  # and the plain form (H <= 2S).
  for hw in [(13, 29), (48, 30), (4, 3), (12, 7)]:
    x = torch.randn(2, 12, *hw)
    with torch.no_grad():
      want = tm(x)
    jm = LDA(width=16, pooled_size=6)
    v = load(jm, tm, jnp.zeros((1, *hw, 12)))
    got = jm.apply(v, jnp.asarray(to_nhwc(x)))
    assert rel_err(from_nhwc(got), want) < TOL


@pytest.mark.parametrize("hw", [(31, 17), (36, 5)])  # overlapping / equal row windows
def test_lda_banded_gradients_match_torch(hw):
  """The banded LDA (custom VJP) differentiates like conv -> GELU -> pool -> conv."""
  torch = pytest.importorskip("torch")
  from mobileiqa_jax.weights import torch_reference as ref

  torch.manual_seed(4)
  tm = ref.LDA(12, 16, 6)
  x = torch.randn(2, 12, *hw, requires_grad=True)
  (tm(x) ** 2).sum().backward()
  jm = LDA(width=16, pooled_size=6)
  v = load(jm, tm, jnp.zeros((1, *hw, 12)))
  loss = lambda p, xx: jnp.sum(jm.apply({"params": p}, xx) ** 2)
  gp, gx = jax.grad(loss, argnums=(0, 1))(v["params"], jnp.asarray(to_nhwc(x.detach())))
  assert rel_err(gx, x.grad.permute(0, 2, 3, 1)) < TOL
  want = tm.cnn1.weight.grad[:, :, 0, 0].T
  assert rel_err(gp["cnn1"]["kernel"][0, 0], want) < TOL
  assert rel_err(gp["cnn1"]["bias"], tm.cnn1.bias.grad) < TOL


# ------------------------------------------------------------------------------------------
# Whole model with the stand-in backbone.

@pytest.mark.parametrize("cfg,hw", [
    (dict(pooled_size=6, width=32, regressor_pool=2, sigmoid=True), (64, 64)),
    (dict(pooled_size=12, width=32, regressor_pool=4, sigmoid=False, teacher_names=True),
     (70, 50)),
])
def test_head_parity(cfg, hw):
  torch = pytest.importorskip("torch")
  tm, jm = toy_models(seed=11, **cfg)
  # Two images of different contrast, so that the scores differ clearly.
  images = torch.randn(2, 3, *hw) * torch.tensor([0.5, 1.5]).view(2, 1, 1, 1)
  with torch.no_grad():
    x_t, dof_t, score_t, fused_t = tm(images, return_features=True)
  img = jnp.asarray(to_nhwc(images))
  v = load(jm, tm, img[:1])
  x, dof, score, fused = jax.jit(
      lambda v, i: jm.apply(v, i, return_features=True, return_fused=True))(v, img)
  assert_score_varies(score_t, cfg["sigmoid"])
  s = cfg["pooled_size"]
  assert x.shape == (5, 2, s, s, 32) and dof.shape == (3, 2, s, s, 32)
  assert score.shape == (2,)
  errs = dict(x=rel_err(from_nhwc(x), x_t), dof=rel_err(from_nhwc(dof), dof_t),
              fused=rel_err(from_nhwc(fused), fused_t), score=rel_err(score, score_t))
  print(cfg, {k: f"{e:.2e}" for k, e in errs.items()})
  assert max(errs.values()) < TOL, errs
  # The head with its attention folded (what scoring runs) against the same reference.
  folded = jax.jit(lambda v, i: jm.clone(attention="folded").apply(
      v, i, return_features=True, return_fused=True))(fold_attention(v), img)
  folded_errs = dict(dof=rel_err(from_nhwc(folded[1]), dof_t),
                     fused=rel_err(from_nhwc(folded[3]), fused_t),
                     score=rel_err(folded[2], score_t))
  assert max(folded_errs.values()) < TOL, folded_errs
  # The `regress` method alone agrees with the full forward, and on the reference's fused
  # feature with the reference's regressor (the distillation monitor runs the teacher's
  # regressor on the student's fused feature this way).
  regress = jax.jit(lambda v, f: jm.apply(v, f, method="regress"))
  np.testing.assert_allclose(regress(v, fused), score, rtol=1e-6, atol=1e-6)
  with torch.no_grad():
    cross_t = tm.regress(fused_t * 1.5)
  assert rel_err(regress(v, jnp.asarray(to_nhwc(fused_t * 1.5))), cross_t) < TOL


def test_param_names_mirror_reference():
  _, jm = toy_models(teacher_names=True, pooled_size=12, regressor_pool=4, sigmoid=False)
  shapes = jax.eval_shape(lambda: jm.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  p = shapes["params"]
  assert set(p) == {"global_vit", "LGF1", "LGF2", "LGF3", "LGF4", "LGF5", "MALs",
                    "fusion_mal", "cnn", "fc_score"}
  assert p["LGF1"]["cnn1"]["kernel"].shape == (1, 1, 8, 64)
  assert p["MALs"]["2"]["feature_attention"]["c_q"]["kernel"].shape == (5 * 144,) * 2
  assert p["MALs"]["0"]["channel_attention"]["c_v"]["kernel"].shape == (5 * 32,) * 2
  assert p["MALs"]["0"]["attention_module"]["4"]["gamma"].shape == (1,)
  assert p["fusion_mal"]["feature_attention"]["c_k"]["kernel"].shape == (3 * 144,) * 2
  assert p["cnn"]["3"]["kernel"].shape == (3, 3, 16, 16)
  assert p["fc_score"]["3"]["kernel"].shape == (8, 1)
  assert set(shapes["batch_stats"]) == {"global_vit"}


@pytest.mark.slow  # three compiles of the toy model (~15 CPU s)
def test_dropout_only_in_training():
  pytest.importorskip("torch")
  tm, jm = toy_models(seed=5, num_mals=2)
  img = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  v = load(jm, tm, img[:1])

  @jax.jit
  def evaluate(v, key):
    full = jm.apply(v, img, return_features=True, rngs={"dropout": key})
    return full, jm.apply(v, img)  # the plain call: the score alone

  @jax.jit
  def train(v, key):
    out, _ = jm.apply(v, img, train=True, return_features=True, rngs={"dropout": key},
                      mutable=["batch_stats"])
    return out

  (a, plain_a), (b, _) = evaluate(v, jax.random.key(0)), evaluate(v, jax.random.key(9))
  for u, w in zip(a, b):
    np.testing.assert_array_equal(u, w)
  np.testing.assert_allclose(plain_a, a[2], rtol=1e-6, atol=1e-6)
  t1, t2, t1b = train(v, jax.random.key(1)), train(v, jax.random.key(2)), train(
      v, jax.random.key(1))
  # x has no dropout (LDAs); DOF and the score do.
  np.testing.assert_array_equal(t1[0], t2[0])
  assert not np.allclose(t1[1], t2[1]) and not np.allclose(t1[2], t2[2])
  assert not np.allclose(t1[2], a[2])
  for u, w in zip(t1, t1b):
    np.testing.assert_array_equal(u, w)
  with pytest.raises(Exception):
    jax.eval_shape(lambda: jm.apply(v, img, train=True, mutable=["batch_stats"]))  # no rng


@pytest.mark.slow  # compiles the float32 and bfloat16 models; test_mobilevitv2 checks the bfloat16 forward
def test_bfloat16_compute_close():
  pytest.importorskip("torch")
  tm, jm = toy_models(seed=2, num_mals=2)
  _, jm16 = toy_models(seed=2, num_mals=2, dtype=jnp.bfloat16)
  img = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))
  v = load(jm, tm, img[:1])
  run = lambda m: jax.jit(lambda v: m.apply(v, img, return_features=True))(v)
  x32, dof32, s32 = run(jm)
  x16, dof16, s16 = run(jm16)
  assert s16.dtype == jnp.float32 and x16.dtype == jnp.bfloat16
  assert jax.tree_util.tree_all(jax.tree.map(lambda a: a.dtype == jnp.float32, v))
  rel = float(jnp.max(jnp.abs(dof16.astype(jnp.float32) - dof32)) / jnp.max(jnp.abs(dof32)))
  assert rel < 5e-2
  np.testing.assert_allclose(s16, s32, atol=5e-2)
  # Scoring in bfloat16 runs the folded attention: as close to float32 as the reference form.
  _, dof16f, s16f = jax.jit(lambda v: jm16.clone(attention="folded").apply(
      v, img, return_features=True))(fold_attention(v))
  relf = float(jnp.max(jnp.abs(dof16f.astype(jnp.float32) - dof32)) / jnp.max(jnp.abs(dof32)))
  print(f"bfloat16 dof error: reference form {rel:.2e}, folded {relf:.2e}")
  assert relf < max(2 * rel, 5e-2), (relf, rel)
  np.testing.assert_allclose(s16f, s32, atol=5e-2)


# ------------------------------------------------------------------------------------------
# Config and presets.

def test_config_roundtrip():
  c = model_config("student", pooled_size=8, width=64, backbone_kwargs={"foo": 1})
  d = c.to_dict()
  assert "dtype" not in d and "depthwise_impl" not in d and d["variant"] == "student"
  assert d["backbone_name"] == "local_cnn" and d["lda_prefix"] == "LDA"
  assert d["regressor_pool"] == 2 and d["sigmoid"] is True
  import json
  assert MobileIQAConfig.from_dict(json.loads(json.dumps(d))) == c
  t = model_config("teacher").to_dict()
  assert (t["backbone"], t["backbone_name"], t["lda_prefix"], t["regressor_pool"],
          t["sigmoid"], t["pooled_size"], t["width"], t["num_mals"]) == (
              "mobilevitv2_200", "global_vit", "LGF", 4, False, 22, 256, 3)
  with pytest.raises(ValueError, match="unknown"):
    MobileIQAConfig.from_dict(dict(d, bogus=1))
  with pytest.raises(ValueError):
    model_config("nope")


# ------------------------------------------------------------------------------------------
# Whole teacher and student: Flax backbones + head vs timm features_only + reference head.

@pytest.mark.torch
@pytest.mark.parametrize("variant,hw", [("student", (96, 80)), ("teacher", (64, 64))])
def test_whole_model_parity(variant, hw):
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from mobileiqa_jax.weights import torch_reference as ref
  from mobileiqa_jax.models import mobileiqa

  torch.manual_seed(21)
  tm = (ref.student_reference if variant == "student" else ref.teacher_reference)()
  randomize_torch(tm, 21, conv_bias=False).eval()
  if variant == "student":
    # With random weights the student's deep features reach |x| ~ 36 and its self-attention
    # softmaxes saturate (energy spread ~45); there PyTorch float32 itself is only ~4e-5 from
    # float64 (measured), i.e. at this test's tolerance. Scaling the LDA outputs to the
    # teacher's range keeps the attention paths live but well conditioned.
    with torch.no_grad():
      for i in range(1, 6):
        getattr(tm, f"LDA{i}").cnn2.weight.mul_(0.1)
        getattr(tm, f"LDA{i}").cnn2.bias.mul_(0.1)
  he_regressor_(tm, 21)
  jm = (mobileiqa.mobileiqa_student if variant == "student" else mobileiqa.mobileiqa_teacher)()
  # Two images of different contrast, so that the scores differ clearly.
  images = torch.randn(2, 3, *hw) * torch.tensor([0.5, 1.5]).view(2, 1, 1, 1)
  with torch.no_grad():
    x_t, dof_t, score_t, fused_t = tm(images, return_features=True)
  assert_score_varies(score_t, variant == "student")
  img = jnp.asarray(to_nhwc(images))
  v = load(jm, tm, img[:1])
  x, dof, score, fused = jax.jit(
      lambda v, i: jm.apply(v, i, return_features=True, return_fused=True))(v, img)
  assert x.shape == (5, 2, 22, 22, 256) and dof.shape == (3, 2, 22, 22, 256)
  errs = dict(x=rel_err(from_nhwc(x), x_t), dof=rel_err(from_nhwc(dof), dof_t),
              fused=rel_err(from_nhwc(fused), fused_t), score=rel_err(score, score_t))
  print(variant, {k: f"{e:.2e}" for k, e in errs.items()})
  assert max(errs.values()) < TOL, errs
