"""Multiply-accumulates (MACs) of a JAX function, counted from its jaxpr.

    count = macs.count_macs(lambda v, x: model.apply(v, x, train=False), variables, images)
    count.total, count.conv, count.dot, count.norm, count.resize, count.pool

The count follows what fvcore and ptflops report for a PyTorch model ("FLOPs" there are MACs),
so that a model's cost can be read against budgets stated in their terms (the AIM 2024
UHD-IQA challenge: 50 GMACs per image). What is counted, per equation of the jaxpr:

- `conv_general_dilated`: one MAC per output element per kernel tap per input channel of its
  group: out_elements * kh * kw * (C_in / feature_group_count). A depthwise conv
  (feature_group_count = C) is out_elements * kh * kw.
- `dot_general` (Dense/Linear layers, matmuls, einsums, attention products): out_elements *
  the product of the contracted dimensions. Biases are not counted.
- Normalisation (BatchNorm, GroupNorm) and resizing: one per output element. They are
  composed of elementwise primitives, so the layers mark them with a named scope
  (`NORM_SCOPE`, `RESIZE_SCOPE`); a run of consecutive equations under the same marked scope
  is one layer, counted by its last equation's output.
- Pooling (average and adaptive average pools, marked `POOL_SCOPE`): one per input element,
  as fvcore and ptflops count it. A pool written as a matmul with a constant window matrix is
  counted as a pool, not as a matmul.
- Nothing else: activations (ReLU, GELU, hard-swish, sigmoid), softmax, residual additions,
  bias additions, global means and data movement are free, as in fvcore.

Control flow: sub-jaxprs are followed wherever they occur (`jit`/pjit, `remat`,
`custom_jvp_call`, `custom_vjp_call`, `shard_map`, ...) and counted once per execution: a
`scan` body `length` times, a `while` body as many times as its loop runs when the trip count
is fixed at trace time (a counter starting at a constant, stepped by one, compared with `<`
against a constant; any other `while` raises `ValueError`), and a `cond` as its most expensive
branch (an upper bound). Only the traced function is counted: for a model's forward pass,
trace `apply` in inference mode, not a training step.

What the jaxpr holds is what the implementation computes. Two forms in this project compute
the same numbers with other work and must be switched off for a count that describes the
architecture: the 'shift' depthwise form (k*k elementwise multiply-adds, invisible as
convolutions; count with `depthwise_impl='conv'`) and the LDAs' row bands (which recompute
rows where the pooling windows overlap; `runtime.Runtime(lda='whole')`). `model_card.count_model_macs`
does both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from mobileiqa_jax.models.layers import NORM_SCOPE, POOL_SCOPE, RESIZE_SCOPE

_SCOPES = (NORM_SCOPE, RESIZE_SCOPE, POOL_SCOPE)


@dataclasses.dataclass
class MacCount:
  """MACs of one traced call, by kind (integers; `total` is their sum)."""

  conv: int = 0
  dot: int = 0
  norm: int = 0
  resize: int = 0
  pool: int = 0

  @property
  def total(self) -> int:
    return self.conv + self.dot + self.norm + self.resize + self.pool

  def add(self, other: "MacCount", times: int = 1) -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + times * getattr(other, f.name))

  def to_dict(self) -> dict[str, int]:
    return dict(dataclasses.asdict(self), total=self.total)


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MacCount:
  """MACs of `fn(*args, **kwargs)`, traced with `jax.make_jaxpr` (no computation runs).

  Arguments may be arrays or `jax.ShapeDtypeStruct`s.
  """
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))


def count_jaxpr(jaxpr: Any) -> MacCount:
  """MACs of a (closed) jaxpr; see the module docstring for what is counted."""
  count = MacCount()
  _count(_open(jaxpr), count)
  return count


def _open(jaxpr: Any) -> jex_core.Jaxpr:
  return jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr


def _size(var: Any) -> int:
  return math.prod(getattr(var.aval, "shape", ()))


def _scope(eqn: Any) -> tuple[str, str] | None:
  """(marker, the name stack up to it) when `eqn` runs under a marked scope, else None."""
  parts = str(eqn.source_info.name_stack).split("/")
  for i in range(len(parts) - 1, -1, -1):
    if parts[i] in _SCOPES:
      return parts[i], "/".join(parts[: i + 1])
  return None


def _count(jaxpr: jex_core.Jaxpr, count: MacCount) -> None:
  eqns = jaxpr.eqns
  i = 0
  while i < len(eqns):
    marked = _scope(eqns[i])
    if marked is None:
      _count_eqn(eqns[i], count)
      i += 1
      continue
    # One marked layer: the run of equations under the same scope instance.
    j = i
    while j + 1 < len(eqns) and _scope(eqns[j + 1]) == marked:
      j += 1
    region = eqns[i:j + 1]
    kind = marked[0]
    if kind == POOL_SCOPE:
      defined = {v for e in region for v in e.outvars}
      inputs = [v for e in region for v in e.invars
                if not isinstance(v, jex_core.Literal) and v not in defined]
      count.pool += max((_size(v) for v in inputs), default=0)
    else:
      out = sum(_size(v) for v in region[-1].outvars)
      if kind == NORM_SCOPE:
        count.norm += out
      else:
        count.resize += out
    i = j + 1


def _count_eqn(eqn: Any, count: MacCount) -> None:
  name = eqn.primitive.name
  params = eqn.params
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    rhs_spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    taps = math.prod(rhs[d] for d in rhs_spec[2:])
    # The kernel's input-feature dimension already is C_in / feature_group_count.
    count.conv += _size(eqn.outvars[0]) * taps * rhs[rhs_spec[1]]
  elif name == "dot_general":
    (lhs_contract, _), _ = params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    count.dot += _size(eqn.outvars[0]) * math.prod(lhs[d] for d in lhs_contract)
  elif name == "scan":
    body = MacCount()
    _count(_open(params["jaxpr"]), body)
    count.add(body, int(params["length"]))
  elif name == "while":
    body = MacCount()
    _count(_open(params["body_jaxpr"]), body)
    cond = MacCount()
    _count(_open(params["cond_jaxpr"]), cond)
    trips = _while_trip_count(eqn)
    count.add(body, trips)
    count.add(cond, trips + 1)
  elif name == "cond":
    branches = []
    for branch in params["branches"]:
      c = MacCount()
      _count(_open(branch), c)
      branches.append(c)
    count.add(max(branches, key=lambda c: c.total))
  else:
    # pjit, remat, custom_jvp_call, custom_vjp_call, shard_map, closed_call, ...: each
    # sub-jaxpr runs once per execution of the equation.
    for value in params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
          _count(_open(sub), count)


def _literal_int(var: Any) -> int | None:
  if isinstance(var, jex_core.Literal):
    try:
      return int(var.val)
    except (TypeError, ValueError):
      return None
  return None


def _while_trip_count(eqn: Any) -> int:
  """Trip count of a `while` whose counter runs from a constant to a constant by one."""
  p = eqn.params
  cond, body = _open(p["cond_jaxpr"]), _open(p["body_jaxpr"])
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  carry_init = eqn.invars[nc + nb:]
  pred = cond.outvars[0]
  for e in cond.eqns:
    if e.primitive.name != "lt" or pred not in e.outvars:
      continue
    counter, bound = e.invars
    if counter not in cond.invars[nc:] or _literal_int(bound) is None:
      break
    k = cond.invars[nc:].index(counter)
    start = _literal_int(carry_init[k])
    # The body must step that carry by exactly one.
    step_out = body.outvars[k]
    body_counter = body.invars[nb + k]
    steps = [b for b in body.eqns if b.primitive.name == "add" and step_out in b.outvars
             and body_counter in b.invars
             and any(_literal_int(v) == 1 for v in b.invars)]
    if start is not None and steps:
      return max(0, _literal_int(bound) - start)
    break
  raise ValueError("cannot count the MACs of a while loop whose trip count is not fixed at "
                   "trace time (use lax.scan or lax.fori_loop with constant bounds)")
