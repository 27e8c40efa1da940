"""Training objectives: score regression and the MobileIQA distillation loss.

All losses are means over elements, as PyTorch's `nn.MSELoss()` /
`nn.L1Loss()` with the default `reduction='mean'` compute them. Each takes an
optional per-example `weights` vector (shape `[batch]`): padded examples of a
last, partial batch get weight 0, and the loss becomes the weighted mean over
the valid examples' elements, so padding never changes the result. With all
weights 1 it is exactly the plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

Array = jnp.ndarray

#: Names of the distillation terms, in the order of `distillation_loss`'s
#: arguments and of a sequence of `weights`.
DISTILL_TERMS = ('x', 'dof', 'score')


def _match_shapes(pred: Array, target: Array) -> tuple[Array, Array]:
  """Reshapes `pred` to `target`'s shape when only unit axes differ.

  Why: a score head returns `[B, 1]` while labels are `[B]`; broadcasting the
  two (as PyTorch's MSELoss silently does) would compare every prediction
  with every label.
  """
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  if pred.shape == target.shape:
    return pred, target
  if pred.size == target.size and pred.shape[:1] == target.shape[:1]:
    return pred.reshape(target.shape), target
  raise ValueError(f'prediction shape {pred.shape} does not match target shape '
                   f'{target.shape}.')


def _weighted_mean(elementwise: Array, weights: Array | None) -> Array:
  """Mean over all elements, or over valid examples' elements if `weights` given."""
  if weights is None:
    return jnp.mean(elementwise)
  weights = jnp.asarray(weights, elementwise.dtype)
  if weights.shape != elementwise.shape[:1]:
    raise ValueError(f'weights must have shape [batch] = {elementwise.shape[:1]}, '
                     f'got {weights.shape}.')
  per_example = jnp.mean(elementwise.reshape(elementwise.shape[0], -1), axis=1)
  # max(., eps): an all-padding batch gives 0, not 0/0.
  total = jnp.maximum(jnp.sum(weights), jnp.finfo(elementwise.dtype).tiny)
  return jnp.sum(weights * per_example) / total


def mse(pred: Array, target: Array, weights: Array | None = None) -> Array:
  """Mean squared error over elements (optionally weighted per example)."""
  pred, target = _match_shapes(pred, target)
  return _weighted_mean(jnp.square(pred - target), weights)


def mae(pred: Array, target: Array, weights: Array | None = None) -> Array:
  """Mean absolute error over elements (optionally weighted per example)."""
  pred, target = _match_shapes(pred, target)
  return _weighted_mean(jnp.abs(pred - target), weights)


def regression_loss(pred: Array, target: Array, kind: str = 'mse',
                    weights: Array | None = None) -> Array:
  """Score regression loss of the reference: MSE by default, MAE optional.

  Args:
    pred: predicted scores, `[B]` or `[B, 1]`.
    target: MOS labels, `[B]`.
    kind: `'mse'` (the reference's default) or `'mae'`; a config field.
    weights: optional per-example weights `[B]` (0 for padding).

  Returns:
    The scalar loss.
  """
  if kind == 'mse':
    return mse(pred, target, weights)
  if kind == 'mae':
    return mae(pred, target, weights)
  raise ValueError(f"loss kind must be 'mse' or 'mae', got {kind!r}.")


def _term_weights(
    weights: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
  if isinstance(weights, Mapping):
    unknown = set(weights) - set(DISTILL_TERMS)
    if unknown:
      raise ValueError(f'unknown distillation term(s) {sorted(unknown)}; the '
                       f'terms are {DISTILL_TERMS}.')
    return {k: weights.get(k, 1.0) for k in DISTILL_TERMS}
  weights = tuple(weights)
  if len(weights) != len(DISTILL_TERMS):
    raise ValueError(f'weights must have {len(DISTILL_TERMS)} entries for '
                     f'{DISTILL_TERMS}, got {weights}.')
  return dict(zip(DISTILL_TERMS, weights))


def distillation_loss(
    student_x: Array,
    teacher_x: Array,
    student_dof: Array,
    teacher_dof: Array,
    student_score: Array,
    mos: Array,
    weights: Sequence[float] | Mapping[str, float] = (1.0, 1.0, 1.0),
    example_weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The MobileIQA distillation loss (docs/model.md, section 4).

      total = w_x MSE(student x, teacher x) + w_dof MSE(student DOF, teacher DOF)
              + w_score MSE(student score, MOS)

  Each term is an MSE averaged over elements. The teacher tensors are treated
  as constants (`stop_gradient`), so no gradient can reach a teacher even if
  the caller forgets to keep it outside the differentiated function.

  Args:
    student_x: the student's stacked LDA outputs, `[B, ...]`.
    teacher_x: the teacher's, same shape.
    student_dof: the student's DOF tensor, `[B, ...]`.
    teacher_dof: the teacher's, same shape.
    student_score: the student's predicted scores, `[B]` or `[B, 1]`.
    mos: the labels, `[B]`.
    weights: the three term weights, either a sequence in the order
      `DISTILL_TERMS` = (x, dof, score) or a mapping with those keys (missing
      keys weigh 1). All 1 in the reference.
    example_weights: optional per-example weights `[B]` (0 for padding).

  Returns:
    `(total, {'x': ..., 'dof': ..., 'score': ...})`: the weighted sum and the
    three unweighted terms, all scalars.
  """
  w = _term_weights(weights)
  for name, s, t in (('x', student_x, teacher_x),
                     ('dof', student_dof, teacher_dof)):
    if jnp.shape(s) != jnp.shape(t):
      raise ValueError(f'student_{name} shape {jnp.shape(s)} != teacher_{name} '
                       f'shape {jnp.shape(t)}.')
  terms = {
      'x': mse(student_x, jax.lax.stop_gradient(teacher_x), example_weights),
      'dof': mse(student_dof, jax.lax.stop_gradient(teacher_dof), example_weights),
      'score': mse(student_score, mos, example_weights),
  }
  total = sum(w[k] * terms[k] for k in DISTILL_TERMS)
  return total, terms

