"""The MAC counter (mobileiqa_jax/profiling/macs.py) on layers whose MACs are computed by hand, through
the control flow a model's jaxpr holds, and on whole (small) models against PyTorch's own
FLOP counter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileiqa_jax.profiling import macs
from mobileiqa_jax.profiling import model_card
from mobileiqa_jax.models import layers
from mobileiqa_jax.models import mobileiqa


def _module_macs(module: nn.Module, shape: tuple[int, ...]) -> macs.MacCount:
  x = jnp.zeros(shape, jnp.float32)
  variables = module.init(jax.random.PRNGKey(0), x)
  return macs.count_macs(module.apply, variables, x)


def test_conv_3x3():
  # (2, 10, 12, 4) -> 3x3 SAME, 8 filters: each of 2*10*12*8 outputs sums 3*3*4 products.
  c = _module_macs(nn.Conv(8, (3, 3), padding="SAME"), (2, 10, 12, 4))
  assert (c.conv, c.dot, c.total) == (2 * 10 * 12 * 8 * 9 * 4, 0, 2 * 10 * 12 * 8 * 9 * 4)


def test_conv_3x3_stride_2_valid():
  # 11x9 VALID stride 2 -> 5x4 outputs.
  c = _module_macs(nn.Conv(6, (3, 3), strides=2, padding="VALID"), (1, 11, 9, 5))
  assert c.total == 1 * 5 * 4 * 6 * 9 * 5


def test_depthwise_conv():
  # feature_group_count = C: each output sums only its own channel's 3x3 taps. The 'conv'
  # form sits inside a custom_vjp, so this also follows custom_vjp_call.
  c = _module_macs(layers.DepthwiseConv2d(6, 3, stride=1, impl="conv"), (1, 8, 8, 6))
  assert c.total == c.conv == 8 * 8 * 6 * 9
  c = _module_macs(layers.DepthwiseConv2d(6, 3, stride=2, impl="conv"), (1, 8, 8, 6))
  assert c.total == 4 * 4 * 6 * 9


def test_depthwise_shift_form_is_not_a_convolution():
  # Why the model card counts the 'conv' form: 'shift' is elementwise multiply-adds.
  c = _module_macs(layers.DepthwiseConv2d(6, 3, impl="shift"), (1, 8, 8, 6))
  assert c.total == 0


def test_grouped_conv():
  c = _module_macs(nn.Conv(8, (3, 3), padding="SAME", feature_group_count=2), (1, 5, 5, 4))
  assert c.total == 5 * 5 * 8 * 9 * 2


def test_linear_bias_not_counted():
  c = _module_macs(nn.Dense(5), (3, 7))
  assert (c.dot, c.total) == (3 * 5 * 7, 3 * 5 * 7)


def test_einsum_batched_matmul():
  a, b = jnp.zeros((2, 3, 4)), jnp.zeros((2, 4, 5))
  c = macs.count_macs(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b)
  assert c.dot == 2 * 3 * 5 * 4
  # Two contracted axes: out (2,) * 3 * 4.
  c = macs.count_macs(lambda a: jnp.einsum("bij,bij->b", a, a), a)
  assert c.dot == 2 * 3 * 4


def _matmul(x):
  return x @ x  # 4x4: 64 MACs


def test_scan_counts_every_step():
  x = jnp.zeros((4, 4))
  c = macs.count_macs(lambda x: jax.lax.scan(lambda h, _: (_matmul(h), None), x, None,
                                             length=7)[0], x)
  assert c.dot == 7 * 64
  # fori_loop with constant bounds is a scan.
  c = macs.count_macs(lambda x: jax.lax.fori_loop(2, 5, lambda i, h: _matmul(h), x), x)
  assert c.dot == 3 * 64


def test_while_with_a_fixed_trip_count():
  x = jnp.zeros((4, 4))
  loop = lambda x: jax.lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, _matmul(c[1])),
                                      (0, x))[1]
  assert macs.count_macs(loop, x).dot == 5 * 64
  unknown = lambda x, n: jax.lax.while_loop(
      lambda c: c[0] < n, lambda c: (c[0] + 1, _matmul(c[1])), (0, x))[1]
  with pytest.raises(ValueError, match="trip count"):
    macs.count_macs(unknown, x, 3)


def test_cond_counts_the_dearer_branch_and_calls_once():
  x = jnp.zeros((4, 4))
  c = macs.count_macs(lambda p, x: jax.lax.cond(p, lambda x: _matmul(_matmul(x)), _matmul, x),
                      True, x)
  assert c.dot == 2 * 64
  # jit, remat and custom_jvp bodies run once.
  f = jax.custom_jvp(_matmul)
  f.defjvp(lambda primals, tangents: (_matmul(primals[0]), tangents[0]))
  g = jax.jit(jax.checkpoint(f))
  assert macs.count_macs(g, x).dot == 64


def test_norms_one_per_output_element():
  x = (2, 5, 6, 3)
  bn = _module_macs(layers.BatchNorm2d(use_running_average=True), x)
  gn = _module_macs(layers.GroupNorm1(), x)
  assert (bn.norm, bn.total) == (2 * 5 * 6 * 3,) * 2
  assert (gn.norm, gn.total) == (2 * 5 * 6 * 3,) * 2
  # Training mode computes statistics too; still one per output element.
  x_in = jnp.ones(x)
  variables = layers.BatchNorm2d(use_running_average=False).init(jax.random.PRNGKey(0), x_in)
  c = macs.count_macs(lambda v, x: layers.BatchNorm2d(use_running_average=False).apply(
      v, x, mutable=["batch_stats"])[0], variables, x_in)
  assert c.norm == 2 * 5 * 6 * 3


def test_resize_one_per_output_element():
  x = jnp.zeros((1, 5, 7, 2))
  c = macs.count_macs(lambda x: layers.resize_bilinear_align_corners(x, (6, 8)), x)
  assert (c.resize, c.total) == (6 * 8 * 2, 6 * 8 * 2)


def test_pools_one_per_input_element_even_as_a_window_matmul():
  # 45 -> 22 has overlapping windows: written as a matmul with 0/1 windows, counted as a pool.
  x = jnp.zeros((1, 45, 30, 4))
  c = macs.count_macs(lambda x: layers.adaptive_avg_pool2d(x, 22), x)
  assert (c.pool, c.dot, c.total) == (45 * 30 * 4, 0, 45 * 30 * 4)
  c = macs.count_macs(lambda x: layers.avg_pool2d(x, 3), jnp.zeros((2, 9, 9, 4)))
  assert (c.pool, c.total) == (2 * 9 * 9 * 4,) * 2


def test_consecutive_marked_layers_are_counted_apart():
  # Two norms back to back: their equations run on, but under different module scopes.
  model = nn.Sequential([layers.GroupNorm1(), layers.GroupNorm1()])
  assert _module_macs(model, (1, 4, 4, 2)).norm == 2 * 4 * 4 * 2


def _toy_config(variant):
  # A small head: S = 12 (teacher's regressor pool 4 needs S // 4 >= 3), C = 32.
  return mobileiqa.model_config(variant, pooled_size=12, width=32).to_dict()


def test_head_macs_do_not_depend_on_the_input_size():
  # Everything after the LDAs works on S x S, so two sizes differ only in the backbone and
  # LDAs: checks that the counter follows the model's structure, not its input.
  cfg = _toy_config("student")
  a = model_card.count_model_macs(cfg, (64, 64))
  b = model_card.count_model_macs(cfg, (96, 64))
  assert b.total > a.total
  assert b.conv + b.dot > a.conv + a.dot


@pytest.mark.torch
@pytest.mark.parametrize("variant,size", [("student", (70, 90)), ("teacher", (64, 96))])
def test_whole_model_matches_pytorch_flop_counter(variant, size):
  """Convs and matmuls of a whole (small-head) model = torch FlopCounterMode's FLOPs / 2 on
  the PyTorch reference (timm backbone + the head written from the paper)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import torch_reference  # pylint: disable=g-import-not-at-top

  ctor = {"student": torch_reference.student_reference,
          "teacher": torch_reference.teacher_reference}[variant]
  ref = ctor(pooled_size=12, width=32).eval()
  with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as counter:
    ref(torch.zeros(1, 3, *size))
  ours = model_card.count_model_macs(_toy_config(variant), size)
  assert 2 * (ours.conv + ours.dot) == counter.get_total_flops()
  # Norms: one per output element of every BatchNorm/GroupNorm, from the reference's modules.
  norm_elems = []
  hooks = [m.register_forward_hook(lambda m, i, o: norm_elems.append(o.numel()))
           for m in ref.modules()
           if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
  with torch.no_grad():
    ref(torch.zeros(1, 3, *size))
  for h in hooks:
    h.remove()
  assert ours.norm == sum(norm_elems)


def test_model_card_params_split():
  cfg = _toy_config("student")
  model = mobileiqa.build_model(cfg)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  counts = model_card.param_counts(variables, "local_cnn")
  backbone = sum(int(np.prod(x.shape)) for x in
                 jax.tree_util.tree_leaves(variables["params"]["local_cnn"]))
  assert counts["params_backbone"] == backbone
  assert counts["params"] == counts["params_backbone"] + counts["params_head"]
  assert counts["params_head"] > 0
