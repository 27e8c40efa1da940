"""Tests for mobileiqa_jax.training.optim, against PyTorch's Adam and CosineAnnealingLR."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mobileiqa_jax.training import optim

_STEPS_PER_EPOCH = 3
_EPOCHS = 5


def _problem(n=6, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.5, 2.0, size=n)
  b = rng.normal(size=n)
  p0 = rng.normal(size=n)
  # Gradient of sum(a * (p - b)^2 / 2) at p: deterministic, parameter dependent.
  return p0, lambda p: a * (p - b)


def _run_optax(config, p0, grad_fn):
  # float64 on both sides, so a mismatch is a semantic one, not rounding.
  with jax.enable_x64(True):
    tx = optim.make_optimizer(config, _STEPS_PER_EPOCH)
    p = jnp.asarray(p0, jnp.float64)
    state = tx.init(p)
    for _ in range(_STEPS_PER_EPOCH * _EPOCHS):
      updates, state = tx.update(grad_fn(p), state, p)
      p = optax.apply_updates(p, updates)
    return np.asarray(p, np.float64)


def _run_torch(torch, p0, grad_fn, lr, wd, t_max, adamw=False):
  p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
  cls = torch.optim.AdamW if adamw else torch.optim.Adam
  opt = cls([p], lr=lr, weight_decay=wd)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=0)
  lrs = []
  for _ in range(_EPOCHS):
    for _ in range(_STEPS_PER_EPOCH):
      lrs.append(opt.param_groups[0]['lr'])
      opt.zero_grad()
      p.grad = torch.tensor(grad_fn(p.detach().numpy()), dtype=torch.float64)
      opt.step()
    sched.step()
  return p.detach().numpy(), lrs


@pytest.mark.torch
@pytest.mark.parametrize('wd', [1e-5, 0.3])
def test_adam_l2_cosine_epoch_matches_torch(wd):
  torch = pytest.importorskip('torch')
  p0, grad_fn = _problem()
  lr, t_max = 1e-2, 4  # T_max < epochs: also checks the rise after T_max.
  config = ml_collections.ConfigDict(
      dict(name='adam_l2', lr=lr, weight_decay=wd, t_max_epochs=t_max))
  want, torch_lrs = _run_torch(torch, p0, grad_fn, lr, wd, t_max)
  got = _run_optax(config, p0, grad_fn)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The per-step learning rate agrees too (torch's recursive form vs closed form).
  sched = optim.make_schedule(config, _STEPS_PER_EPOCH)
  np.testing.assert_allclose([float(sched(s)) for s in range(len(torch_lrs))],
                             torch_lrs, rtol=1e-6)
  if wd > 0.1:
    # L2-in-the-gradient and decoupled decay differ visibly at this decay.
    want_w, _ = _run_torch(torch, p0, grad_fn, lr, wd, t_max, adamw=True)
    assert not np.allclose(got, want_w, rtol=1e-4)


@pytest.mark.torch
def test_adamw_matches_torch_adamw():
  torch = pytest.importorskip('torch')
  p0, grad_fn = _problem(seed=1)
  lr, wd, t_max = 1e-2, 0.3, 50
  config = dict(name='adamw', lr=lr, weight_decay=wd, t_max_epochs=t_max)
  want, _ = _run_torch(torch, p0, grad_fn, lr, wd, t_max, adamw=True)
  # torch decays p by (1 - lr wd) before the Adam step, optax adds lr wd p to
  # the update: the same p enters both, so they agree to rounding.
  np.testing.assert_allclose(_run_optax(config, p0, grad_fn), want, rtol=1e-6)


def test_cosine_epoch_is_constant_within_an_epoch():
  config = optim.default_config()
  lr = config.lr
  spe = 10
  for step in (0, 9):
    assert optim.lr_at(config, spe, step) == pytest.approx(lr)
  for step in (10, 19):
    assert optim.lr_at(config, spe, step) == pytest.approx(
        lr * (1 + math.cos(math.pi / 50)) / 2)
  assert optim.lr_at(config, spe, 50 * spe) == pytest.approx(0.0, abs=1e-20)


def test_warmup_cosine_constant_and_clipping():
  base = dict(lr=1.0, weight_decay=0.0)
  cfg = dict(base, schedule='warmup_cosine', warmup_steps=10, total_steps=110,
             eta_min=0.1)
  assert optim.lr_at(cfg, 1, 0) == 0.0
  assert optim.lr_at(cfg, 1, 5) == pytest.approx(0.5)
  assert optim.lr_at(cfg, 1, 10) == pytest.approx(1.0)
  assert optim.lr_at(cfg, 1, 110) == pytest.approx(0.1)
  assert optim.lr_at(dict(base, schedule='constant'), 1, 1000) == 1.0
  with pytest.raises(ValueError, match='total_steps'):
    optim.make_optimizer(dict(cfg, total_steps=5), 1)

  # With clipping, a huge gradient moves the parameters exactly as a gradient
  # of norm grad_clip_norm would.
  tx = optim.make_optimizer(dict(base, schedule='constant', grad_clip_norm=1.0), 1)
  p = {'w': jnp.zeros(2)}
  g_big = {'w': jnp.array([300.0, 400.0])}
  g_unit = {'w': jnp.array([0.6, 0.8])}
  u_big, _ = tx.update(g_big, tx.init(p), p)
  u_unit, _ = tx.update(g_unit, tx.init(p), p)
  np.testing.assert_allclose(u_big['w'], u_unit['w'], rtol=1e-6)


def test_bad_config_fields_are_errors():
  with pytest.raises(ValueError, match='unknown optimizer config field'):
    optim.make_optimizer(dict(learning_rate=1e-3), 1)
  with pytest.raises(ValueError, match='optimizer.name'):
    optim.make_optimizer(dict(name='sgd'), 1)
  with pytest.raises(ValueError, match='optimizer.schedule'):
    optim.make_optimizer(dict(schedule='step'), 1)


def test_jit_update_on_pytree():
  tx = optim.make_optimizer(optim.default_config(), steps_per_epoch=2)
  params = {'a': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  # First Adam step moves every parameter by ~lr against the gradient's sign.
  for u in jax.tree.leaves(updates):
    np.testing.assert_allclose(u, -1e-5, rtol=1e-3)
