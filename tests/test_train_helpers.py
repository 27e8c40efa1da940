"""Shared tiny settings for the training tests (+ tests of the configs and the in-memory data).

Tiny = 32x32 images, the smallest MobileViTv2 / a MobileNetV3, head width 16, pooled side 6.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import student as student_config  # noqa: E402
from configs import teacher as teacher_config  # noqa: E402

# The training tests compile the same tiny steps many times (fresh jit closures, subprocesses);
# XLA:CPU compiles take tens of seconds on 2 cores, so share them through the persistent cache.
CACHE_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mobileiqa_jax_test_xla_cache")
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def use_compilation_cache() -> None:
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# Fewest operations that still exercise every part (backbone stages, one MAL, the LDAs and
# the regressor): the multi-device tests compile several steps, and XLA:CPU's compile time
# grows with the number of operations, not with the tiny images.
SMALLEST = {"model.num_mals": 1, "model.backbone_kwargs": {"depth_multiplier": 0.1}}


def tiny_config(kind: str = "teacher", backbone: str = "mobilenetv3_small_050", **overrides):
  """A teacher or student demo config shrunk to run a step in well under a second.

  The backbone defaults to the smallest MobileNetV3 for both kinds (fastest to compile);
  the teacher test passes mobilevitv2_050. Depthwise convs as grouped convs: XLA:CPU
  compiles them several times faster than the shifted form.
  """
  c = (teacher_config if kind == "teacher" else student_config).get_config("demo")
  c.model.backbone = backbone
  c.depthwise_impl = "conv"
  c.model.width = 16
  c.model.pooled_size = 6
  c.model.regressor_pool = 2
  c.model.dropout_rate = 0.1
  c.teacher_checkpoint = ""
  c.data.image_size = (32, 32)
  c.data.train_crop = (0, 0)
  c.batch_size = 8
  c.data.eval_batch_size = 8
  c.num_epochs = 2
  c.log_every_steps = 1
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.progress_bar = False
  c.scatter_plot = False
  c.optimizer.lr = 1e-3
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def tiny_data(config, n_train: int = 24, n_eval: int = 12, seed: int = 0, **kwargs):
  """In-memory random images whose MOS is a smooth function of them (learnable, not constant)."""
  from mobileiqa_jax.data import feed  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  h, w = config.data.image_size
  x = rng.normal(size=(n_train + n_eval, h, w, 3)).astype(np.float32)
  blur = np.linspace(0.0, 1.0, n_train + n_eval, dtype=np.float32)
  rng.shuffle(blur)
  x = x * (1.0 - 0.8 * blur[:, None, None, None])
  mos = (1.0 - blur).astype(np.float32)
  return feed.from_arrays(x[:n_train], mos[:n_train], x[n_train:], mos[n_train:], config,
                         **kwargs)


def test_configs_have_every_data_set():
  from configs import common  # pylint: disable=g-import-not-at-top
  for v in common.CONFIG_ARGS:
    t = teacher_config.get_config(v)
    s = student_config.get_config(v)
    assert t.data.name == s.data.name == v.removesuffix("_release")
    assert s.teacher_checkpoint
  t = teacher_config.get_config()
  assert t.data.name == "uhd_iqa" and tuple(t.data.image_size) == (1231, 1907)
  assert t.optimizer.lr == 1e-5 and t.optimizer.weight_decay == 1e-5
  assert t.optimizer.t_max_epochs == 50 and t.num_epochs == 10 and t.batch_size == 8
  assert t.loss == "mse" and t.data.flips
  assert t.model.backbone == "mobilevitv2_200" and s.model.backbone == "mobilenetv3_large_100"


def test_unknown_config_key_is_an_error():
  import pytest  # pylint: disable=g-import-not-at-top
  c = teacher_config.get_config("demo")
  with pytest.raises(AttributeError):
    c.optimiser = 1  # pylint: disable=attribute-defined-outside-init
    c.lock()
    _ = c.optimiser_lr


def test_array_data_is_resumable_and_split_by_process():
  c = tiny_config()
  d = tiny_data(c)
  full = list(d.train_epoch(1))
  tail = list(d.train_epoch(1, start=1))
  assert len(full) == d.steps_per_epoch == 3
  np.testing.assert_array_equal(full[1]["image"], tail[0]["image"])
  ev = list(d.eval_batches())
  assert sum(int(b["mask"].sum()) for b in ev) == 12
