"""The experiment configs and the tiny in-memory data of the training tests (tests/support.py)."""

from __future__ import annotations

import numpy as np
import pytest

from support import student_config, teacher_config, tiny_config, tiny_data


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
