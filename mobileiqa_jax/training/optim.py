"""Optimizers and learning-rate schedules: the reference's, plus modern options.

The reference (docs/model.md, section 5) trains with

    torch.optim.Adam(params, lr=1e-5, weight_decay=1e-5)
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0)

with `scheduler.step()` once per epoch. Two details matter for parity:

* PyTorch's Adam `weight_decay` is an L2 term added to the gradient *before*
  the moment estimates (`g += wd * p`), so it is rescaled by Adam like any
  gradient. That is `optax.add_decayed_weights` followed by
  `optax.scale_by_adam`, not `optax.adamw` (decoupled decay).
* The cosine schedule changes only at epoch boundaries: throughout epoch `e`
  (0-based) the learning rate is

      lr(e) = eta_min + (lr - eta_min) * (1 + cos(pi * e / T_max)) / 2

  i.e. a function of `step // steps_per_epoch`. Past `T_max` it rises again
  (the formula is periodic), as PyTorch's does.

`make_optimizer` builds either that or a modern variant from a config.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import optax

#: Fields `make_optimizer` reads, with their defaults (the reference recipe).
DEFAULTS = {
    'name': 'adam_l2',
    'lr': 1e-5,
    'weight_decay': 1e-5,
    'b1': 0.9,
    'b2': 0.999,
    'eps': 1e-8,
    'schedule': 'cosine_epoch',
    't_max_epochs': 50,
    'eta_min': 0.0,
    'warmup_steps': 0,
    'total_steps': 0,
    'grad_clip_norm': 0.0,
}

_NAMES = ('adam_l2', 'adamw')
_SCHEDULES = ('cosine_epoch', 'warmup_cosine', 'constant')


def default_config() -> ml_collections.ConfigDict:
  """The reference recipe as a ConfigDict (use as `config.optimizer`)."""
  return ml_collections.ConfigDict(dict(DEFAULTS))


def _resolve(config_optimizer: ml_collections.ConfigDict | dict) -> dict:
  """Merges `config_optimizer` over DEFAULTS; unknown fields are an error."""
  given = dict(config_optimizer)
  unknown = set(given) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown optimizer config field(s) {sorted(unknown)}; '
                     f'known: {sorted(DEFAULTS)}.')
  c = {**DEFAULTS, **given}
  if c['name'] not in _NAMES:
    raise ValueError(f"optimizer.name must be one of {_NAMES}, got {c['name']!r}.")
  if c['schedule'] not in _SCHEDULES:
    raise ValueError(f'optimizer.schedule must be one of {_SCHEDULES}, got '
                     f"{c['schedule']!r}.")
  return c


def cosine_epoch_schedule(lr: float, steps_per_epoch: int, t_max_epochs: float,
                          eta_min: float = 0.0) -> optax.Schedule:
  """PyTorch `CosineAnnealingLR(T_max, eta_min)` stepped once per epoch.

  Args:
    lr: the initial (base) learning rate.
    steps_per_epoch: optimizer steps per epoch; the schedule's input is the
      optimizer step count, which starts at 0.
    t_max_epochs: `T_max` in epochs.
    eta_min: the minimum learning rate.

  Returns:
    `step -> lr`, constant within an epoch.
  """
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}.')
  if t_max_epochs <= 0:
    raise ValueError(f't_max_epochs must be > 0, got {t_max_epochs}.')

  def schedule(step):
    epoch = jnp.floor_divide(step, steps_per_epoch)
    cos = jnp.cos(math.pi * epoch / t_max_epochs)
    return eta_min + (lr - eta_min) * (1.0 + cos) / 2.0

  return schedule


def make_schedule(config_optimizer: ml_collections.ConfigDict | dict,
                  steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule `make_optimizer` uses (`step -> lr`)."""
  c = _resolve(config_optimizer)
  if c['schedule'] == 'cosine_epoch':
    return cosine_epoch_schedule(c['lr'], steps_per_epoch, c['t_max_epochs'],
                                 c['eta_min'])
  if c['schedule'] == 'warmup_cosine':
    if c['total_steps'] <= c['warmup_steps']:
      raise ValueError(
          "schedule 'warmup_cosine' needs optimizer.total_steps > warmup_steps "
          f"(got total_steps={c['total_steps']}, warmup_steps={c['warmup_steps']}).")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c['lr'], warmup_steps=c['warmup_steps'],
        decay_steps=c['total_steps'], end_value=c['eta_min'])
  return optax.constant_schedule(c['lr'])


def lr_at(config_optimizer: ml_collections.ConfigDict | dict,
          steps_per_epoch: int, step: int) -> float:
  """Learning rate at optimizer step `step` (0-based), for logging."""
  return float(make_schedule(config_optimizer, steps_per_epoch)(step))


def make_optimizer(config_optimizer: ml_collections.ConfigDict | dict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """Builds the optimizer described by `config_optimizer`.

  Fields read (defaults in `DEFAULTS` are the reference recipe; any other field
  is an error):

  * `name`: `'adam_l2'` — PyTorch `Adam(weight_decay=wd)`: L2 `wd * p` added
    to the gradient before Adam's moments (the reference); or `'adamw'` —
    decoupled weight decay (`optax.adamw`; the decay is scaled by the lr).
  * `lr`: base learning rate (1e-5).
  * `weight_decay`: L2 / decoupled decay coefficient (1e-5), on all parameters
    as in the reference.
  * `b1`, `b2`, `eps`: Adam's betas and epsilon (0.9, 0.999, 1e-8, as torch).
  * `schedule`: `'cosine_epoch'` — `CosineAnnealingLR` stepped per epoch (the
    reference); `'warmup_cosine'` — linear warmup from 0 over `warmup_steps`
    then cosine to `eta_min` at `total_steps`, per step; `'constant'`.
  * `t_max_epochs`: `T_max` of `'cosine_epoch'` in epochs (50).
  * `eta_min`: final/minimum learning rate of the cosine schedules (0).
  * `warmup_steps`, `total_steps`: for `'warmup_cosine'` (total includes warmup).
  * `grad_clip_norm`: clip gradients to this global norm before anything else
    (as `torch.nn.utils.clip_grad_norm_` before `step()`); 0 or None: off.

  Args:
    config_optimizer: the fields above (a ConfigDict or a dict).
    steps_per_epoch: optimizer steps per epoch (for `'cosine_epoch'`).

  Returns:
    An `optax.GradientTransformation`; its updates are to be added to params
    (`optax.apply_updates`).
  """
  c = _resolve(config_optimizer)
  schedule = make_schedule(c, steps_per_epoch)
  chain = []
  if c['grad_clip_norm']:
    chain.append(optax.clip_by_global_norm(c['grad_clip_norm']))
  if c['name'] == 'adam_l2':
    if c['weight_decay']:
      chain.append(optax.add_decayed_weights(c['weight_decay']))
    chain.append(optax.scale_by_adam(b1=c['b1'], b2=c['b2'], eps=c['eps']))
    chain.append(optax.scale_by_learning_rate(schedule))
  else:
    chain.append(optax.adamw(schedule, b1=c['b1'], b2=c['b2'], eps=c['eps'],
                             weight_decay=c['weight_decay']))
  return optax.chain(*chain)
