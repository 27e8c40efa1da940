"""A PyTorch reference of the MobileIQA head and whole model, written from docs/model.md §2-3.

The PyTorch side of the parity tests and of the PyTorch-vs-JAX benchmarks; needs torch and
timm (the `torch` extra). Module and parameter names follow the authors' state-dict keys
(`global_vit.` / `local_cnn.`, `LGF1..5` / `LDA1..5` with `cnn1`, `cnn2`, `MALs.{j}`,
`fusion_mal`, `attention_module.{k}.{qConv,kConv,vConv,gamma}`,
`{channel,feature}_attention.{c_q,c_k,c_v}`, `cnn.{0,3}`, `fc_score.{0,3}`), so a state dict of
this reference converts to Flax by the same rule as the authors' `.pkl`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
  """SAGAN self attention over the H*W positions of one view; gamma initialised 0."""

  def __init__(self, in_dim: int):
    super().__init__()
    self.qConv = nn.Conv2d(in_dim, in_dim // 8, 1)
    self.kConv = nn.Conv2d(in_dim, in_dim // 8, 1)
    self.vConv = nn.Conv2d(in_dim, in_dim, 1)
    self.gamma = nn.Parameter(torch.zeros(1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    n = h * w
    q = self.qConv(x).view(b, -1, n).permute(0, 2, 1)  # (B, N, c8)
    k = self.kConv(x).view(b, -1, n)  # (B, c8, N)
    energy = torch.bmm(q, k)  # (B, N, N)
    attention = torch.softmax(energy, dim=-1)
    v = self.vConv(x).view(b, -1, n)  # (B, C, N)
    out = torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, h, w)
    return self.gamma * out + x


class Attention(nn.Module):
  """Attention block on (B, R, dim) with the reference's transpose-then-reshape."""

  def __init__(self, dim: int, drop: float = 0.1):
    super().__init__()
    self.c_q = nn.Linear(dim, dim)
    self.c_k = nn.Linear(dim, dim)
    self.c_v = nn.Linear(dim, dim)
    self.norm_fact = 1.0 / math.sqrt(dim)
    self.proj_drop = nn.Dropout(drop)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    residual = x
    b, r, dim = x.shape
    q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
    attn = torch.softmax(q @ k.transpose(-2, -1) * self.norm_fact, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, r, dim)  # a reinterpretation, not a transpose
    y = self.proj_drop(y)
    return y + residual


class MAL(nn.Module):
  """Multi-view attention learning: (n, B, C, S, S) -> (B, C, S*S)."""

  def __init__(self, in_dim: int = 256, feature_num: int = 5, feature_size: int = 22):
    super().__init__()
    self.in_dim = in_dim
    self.feature_num = feature_num
    self.channel_attention = Attention(in_dim * feature_num)
    self.feature_attention = Attention(feature_size * feature_size * feature_num)
    self.attention_module = nn.ModuleList([SelfAttention(in_dim) for _ in range(feature_num)])

  def forward(self, features: torch.Tensor) -> torch.Tensor:
    n, c = self.feature_num, self.in_dim
    views = torch.stack([self.attention_module[i](features[i]) for i in range(n)])
    _, b, _, h, w = views.shape
    npix = h * w
    # 'n b c h w -> b (n c) (h w)'
    t = views.permute(1, 0, 2, 3, 4).reshape(b, n * c, npix)
    # 'b (w c) h -> b w (c h)' with w = in_dim, c = n: channel j -> row j // n, slot j % n.
    p = t.view(b, c, n, npix).reshape(b, c, n * npix)
    p_out = self.feature_attention(p)
    q_out = self.channel_attention(t.permute(0, 2, 1))
    # 'b w (c h) -> b (w c) h'
    p_back = p_out.view(b, c, n, npix).reshape(b, n * c, npix)
    res = (p_back + q_out.permute(0, 2, 1)) / 2
    return res.view(b, n, c, npix).mean(dim=1)


class LDA(nn.Module):
  def __init__(self, in_chn: int, out_chn: int = 256, pooled: int = 22):
    super().__init__()
    self.cnn1 = nn.Conv2d(in_chn, out_chn * 2, 1)
    self.cnn2 = nn.Conv2d(out_chn * 2, out_chn, 1)
    self.pooled = pooled

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.gelu(self.cnn1(x))
    x = F.adaptive_avg_pool2d(x, (self.pooled, self.pooled))
    return self.cnn2(x)


class Regressor(nn.Module):
  """`cnn` + `fc_score` of the reference, as a standalone module for tests."""

  def __init__(self, width: int = 256, pool: int = 4, sigmoid: bool = False):
    super().__init__()
    self.cnn = nn.Sequential(
        nn.Conv2d(width, width // 2, 1), nn.ReLU(), nn.AvgPool2d(pool),
        nn.Conv2d(width // 2, width // 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    self.fc_score = nn.Sequential(
        nn.Linear(width // 2, width // 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width // 4, 1))
    self.sigmoid = sigmoid

  def forward(self, f: torch.Tensor) -> torch.Tensor:
    y = self.fc_score(self.cnn(f).flatten(1))
    if self.sigmoid:
      y = torch.sigmoid(y)
    return y[:, 0]


class MobileIQA(nn.Module):
  """Backbone + head. `backbone(images)` returns a list of NCHW features."""

  def __init__(self, backbone: nn.Module, feature_channels: Sequence[int],
               backbone_name: str = "global_vit", lda_prefix: str = "LGF",
               pooled_size: int = 22, width: int = 256, num_mals: int = 3,
               regressor_pool: int = 4, sigmoid: bool = False):
    super().__init__()
    self.backbone_name = backbone_name
    setattr(self, backbone_name, backbone)
    self.lda_names = [f"{lda_prefix}{i + 1}" for i in range(len(feature_channels))]
    for name, ch in zip(self.lda_names, feature_channels):
      setattr(self, name, LDA(ch, width, pooled_size))
    nv = len(feature_channels)
    self.MALs = nn.ModuleList([MAL(width, nv, pooled_size) for _ in range(num_mals)])
    self.fusion_mal = MAL(width, num_mals, pooled_size)
    self.cnn = nn.Sequential(
        nn.Conv2d(width, width // 2, 1), nn.ReLU(), nn.AvgPool2d(regressor_pool),
        nn.Conv2d(width // 2, width // 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    self.fc_score = nn.Sequential(
        nn.Linear(width // 2, width // 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width // 4, 1))
    self.sigmoid = sigmoid
    self.pooled_size = pooled_size

  def regress(self, fused: torch.Tensor) -> torch.Tensor:
    y = self.fc_score(self.cnn(fused).flatten(1))
    if self.sigmoid:
      y = torch.sigmoid(y)
    return y[:, 0]

  def forward(self, images: torch.Tensor, return_features: bool = False):
    feats = getattr(self, self.backbone_name)(images)
    x = torch.stack([getattr(self, n)(f) for n, f in zip(self.lda_names, feats)])
    b, s = images.shape[0], self.pooled_size
    dof = torch.stack([m(x).view(b, -1, s, s) for m in self.MALs])
    fused = self.fusion_mal(dof).view(b, -1, s, s)
    score = self.regress(fused)
    if return_features:
      return x, dof, score, fused
    return score


def timm_backbone(name: str, **kwargs) -> nn.Module:
  """timm's feature extractor; kwargs go to its builder (e.g. depth_multiplier)."""
  import timm

  return timm.create_model(name, pretrained=False, features_only=True,
                           out_indices=(0, 1, 2, 3, 4), **kwargs)


def teacher_reference(**kw) -> MobileIQA:
  bb = timm_backbone("mobilevitv2_200")
  return MobileIQA(bb, bb.feature_info.channels(), "global_vit", "LGF", regressor_pool=4,
                   sigmoid=False, **kw)


def student_reference(**kw) -> MobileIQA:
  bb = timm_backbone("mobilenetv3_large_100")
  return MobileIQA(bb, bb.feature_info.channels(), "local_cnn", "LDA", regressor_pool=2,
                   sigmoid=True, **kw)
