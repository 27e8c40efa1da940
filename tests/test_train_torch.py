"""Distillation steps against a PyTorch reference (torch-marked): same initial weights and
batches, dropout and flips off; Adam (PyTorch L2 weight decay) losses agree within 1e-4
relative over a few steps.

The reference is `mobileiqa_jax.weights.torch_reference.MobileIQA` (written from docs/model.md)
around timm backbones; a tiny teacher (MobileNetV3 small backbone, teacher head: LGF, pool 2,
no sigmoid) and student keep it to seconds. Both on support.SMALLEST (one opinion MAL, timm's
depth multiplier 0.1 in both frameworks): the loss terms, the teacher's conversion and Adam's
L2 decay are what is compared, and every kind of layer is still in the model. PyTorch's loss
is written out as docs/model.md section 4 says: MSE(DOF) + MSE(x) + MSE(score, MOS).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.weights import convert
from mobileiqa_jax.training import sharding
from mobileiqa_jax.training import trainer
from mobileiqa_jax.models import runtime
from support import SMALLEST, randomize_torch, tiny_config, tiny_data

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
from mobileiqa_jax.weights import torch_reference as ref  # noqa: E402

pytestmark = pytest.mark.torch

BACKBONE = "mobilenetv3_small_050"
STEPS = 4


def _torch_model(name, prefix, pool, sigmoid, seed, c):
  torch.manual_seed(seed)
  bb = ref.timm_backbone(BACKBONE, **c.model.backbone_kwargs)
  m = ref.MobileIQA(bb, bb.feature_info.channels(), name, prefix,
                    pooled_size=c.model.pooled_size, width=c.model.width, regressor_pool=pool,
                    sigmoid=sigmoid, num_mals=c.model.num_mals)
  randomize_torch(m, seed, conv_bias=False)
  for mod in m.modules():
    if isinstance(mod, torch.nn.Dropout):
      mod.p = 0.0
  return m


def _to_flax(module, setup_or_template):
  state = {k: v.detach().clone().numpy() for k, v in module.state_dict().items()}
  return convert.torch_to_flax(state, setup_or_template)


def test_distillation_tracks_pytorch(tmp_path, fast_compile):
  torch.set_num_threads(2)
  c = tiny_config("student", backbone=BACKBONE, **SMALLEST)
  c.model.dropout_rate = 0.0
  c.data.flips = False
  c.optimizer.weight_decay = 1e-5
  c.optimizer.lr = 1e-3
  t_cfg = tiny_config("teacher", backbone=BACKBONE, **SMALLEST)
  mesh = sharding.make_mesh(c.mesh)

  # Teacher: torch weights -> a standalone checkpoint, as launch/convert.py would write it.
  t_torch = _torch_model("global_vit", "LGF", 2, False, 1, c).eval()
  t_steps = trainer.build_steps(t_cfg, mesh, 1)
  t_vars = _to_flax(t_torch, t_steps.abstract_state.variables)
  c.teacher_checkpoint = checkpoint.save_model(str(tmp_path / "teacher"), t_vars,
                                               t_steps.model_config.to_dict())

  s_torch = _torch_model("local_cnn", "LDA", 2, True, 2, c)
  data = tiny_data(c, n_train=8 * STEPS, flips=False, shuffle=False)
  # The trainer's runtime for this config on this host, the teacher's without remat.
  rt = runtime.for_training(c, runtime.platform_of(mesh.devices.flat[0]))
  teacher, teacher_host = trainer.load_teacher(c, rt.frozen())
  steps = trainer.build_steps(c, mesh, data.steps_per_epoch, teacher)
  teacher_vars = sharding.host_tree_to_global(teacher_host, steps.teacher_shardings)
  s_vars = _to_flax(s_torch, steps.abstract_state.variables)
  state = steps.init_state(sharding.host_tree_to_global(
      s_vars, jax.tree.map(lambda a: a.sharding, steps.abstract_state.variables)))

  opt = torch.optim.Adam(s_torch.parameters(), lr=1e-3, weight_decay=1e-5)
  mse = torch.nn.functional.mse_loss
  for i, batch in enumerate(data.train_epoch(0)):
    state, m = steps.train_step(state, sharding.host_to_global(batch, mesh), teacher_vars)
    x = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(batch["mos"])
    s_torch.train()
    opt.zero_grad()
    with torch.no_grad():
      tx, tdof, _, tfused = t_torch(x, return_features=True)
    sx, sdof, score, fused = s_torch(x, return_features=True)
    terms = {"dof": mse(sdof, tdof), "x": mse(sx, tx), "score": mse(score, y)}
    loss = terms["dof"] + terms["x"] + terms["score"]
    with torch.no_grad():
      monitor = mse(t_torch.regress(fused), y)
    loss.backward()
    opt.step()
    got = jax.device_get(m)
    for k, v in terms.items():
      np.testing.assert_allclose(got[f"loss_{k}"], v.item(), rtol=1e-4, err_msg=f"step {i} {k}")
    np.testing.assert_allclose(got["loss"], loss.item(), rtol=1e-4, err_msg=f"step {i}")
    np.testing.assert_allclose(got["monitor_teacher_regressor_mse"], monitor.item(), rtol=1e-4)
  assert i == STEPS - 1
