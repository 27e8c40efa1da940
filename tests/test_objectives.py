"""Tests for mobileiqa_jax.training.objectives against numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileiqa_jax.training import objectives


def _rng_arrays(seed=0, b=4):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return dict(
      student_x=f(b, 3, 5), teacher_x=f(b, 3, 5),
      student_dof=f(b, 7), teacher_dof=f(b, 7),
      student_score=rng.uniform(size=(b, 1)).astype(np.float32),
      mos=rng.uniform(size=(b,)).astype(np.float32))


def test_regression_losses_match_numpy():
  a = _rng_arrays()
  pred, mos = a['student_score'], a['mos']
  np.testing.assert_allclose(
      objectives.regression_loss(pred, mos), np.mean((pred[:, 0] - mos)**2),
      rtol=1e-6)
  np.testing.assert_allclose(
      objectives.regression_loss(pred, mos, 'mae'),
      np.mean(np.abs(pred[:, 0] - mos)), rtol=1e-6)
  with pytest.raises(ValueError, match="'mse' or 'mae'"):
    objectives.regression_loss(pred, mos, 'huber')
  with pytest.raises(ValueError, match='does not match'):
    objectives.mse(np.zeros((4, 2)), mos)


def test_distillation_loss_matches_numpy():
  a = _rng_arrays()
  total, terms = objectives.distillation_loss(**a, weights=(0.5, 2.0, 3.0))
  want = {
      'x': np.mean((a['student_x'] - a['teacher_x'])**2),
      'dof': np.mean((a['student_dof'] - a['teacher_dof'])**2),
      'score': np.mean((a['student_score'][:, 0] - a['mos'])**2),
  }
  for k in want:
    np.testing.assert_allclose(terms[k], want[k], rtol=1e-6)
  np.testing.assert_allclose(
      total, 0.5 * want['x'] + 2 * want['dof'] + 3 * want['score'], rtol=1e-6)
  # A mapping names the terms; missing ones weigh 1.
  total_map, _ = objectives.distillation_loss(**a, weights={'score': 3.0})
  np.testing.assert_allclose(total_map, want['x'] + want['dof'] + 3 * want['score'],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='unknown distillation term'):
    objectives.distillation_loss(**a, weights={'feat': 1.0})


def test_example_weights_ignore_padding():
  a = _rng_arrays(b=6)
  valid = {k: v[:4] for k, v in a.items()}
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  total_masked, terms_masked = objectives.distillation_loss(**a, example_weights=mask)
  total_valid, terms_valid = objectives.distillation_loss(**valid)
  np.testing.assert_allclose(total_masked, total_valid, rtol=1e-6)
  for k in terms_valid:
    np.testing.assert_allclose(terms_masked[k], terms_valid[k], rtol=1e-6)
  # All-ones weights are the plain mean; all-zero weights give 0, not NaN.
  ones = objectives.mse(a['student_x'], a['teacher_x'], np.ones(6))
  np.testing.assert_allclose(ones, objectives.mse(a['student_x'], a['teacher_x']),
                             rtol=1e-6)
  assert objectives.mae(a['student_x'], a['teacher_x'], np.zeros(6)) == 0.0


def test_no_gradient_reaches_teacher_and_jit_works():
  a = {k: jnp.asarray(v) for k, v in _rng_arrays().items()}

  def f(teacher_x, student_x):
    return objectives.distillation_loss(
        student_x, teacher_x, a['student_dof'], a['teacher_dof'],
        a['student_score'], a['mos'])[0]

  g_teacher, g_student = jax.jit(jax.grad(f, argnums=(0, 1)))(
      a['teacher_x'], a['student_x'])
  assert not np.any(g_teacher)
  np.testing.assert_allclose(
      g_student, 2 * (a['student_x'] - a['teacher_x']) / a['student_x'].size,
      rtol=1e-5)
