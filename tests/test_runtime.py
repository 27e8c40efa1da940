"""What a model is vs how it runs (mobileiqa_jax/models/runtime.py).

The runtime (platform, compute dtype, depthwise form, remat) is decided once per entry point
and passed to `build_model`; models never read the host, and a model built without a runtime
gets a documented default that is the same on every host.
"""

from __future__ import annotations

import ast
import os

import jax
import jax.extend.core
import jax.numpy as jnp
import pytest

from mobileiqa_jax.training import trainer
from mobileiqa_jax.models import layers
from mobileiqa_jax.models import mobileiqa
from mobileiqa_jax.models import runtime
from mobileiqa_jax.training import sharding
from support import REPO, SMALLEST, tiny_config

_TINY = dict(backbone="mobilevitv2_050", width=16, pooled_size=6, num_mals=1, regressor_pool=2)


def _grouped_convs(fn, *args) -> list[tuple[int, ...]]:
  """Window strides of every grouped (depthwise) convolution in the traced program."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated" and eqn.params[
          "feature_group_count"] > 1:
        found.append(tuple(eqn.params["window_strides"]))
      for v in eqn.params.values():
        for sub in v if isinstance(v, (list, tuple)) else [v]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_models_never_read_the_host():
  # No call of jax.default_backend(), jax.devices(), jax.local_devices() or
  # jax.process_index() anywhere under mobileiqa_jax/models/: the platform is a caller's string.
  banned = {"default_backend", "devices", "local_devices", "process_index", "device_count"}
  models_dir = os.path.join(REPO, "mobileiqa_jax", "models")
  offenders = []
  for name in sorted(os.listdir(models_dir)):
    if not name.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(models_dir, name), encoding="utf-8").read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr in banned:
        offenders.append(f"{name}:{node.lineno} .{node.attr}")
  assert not offenders, offenders


def test_models_take_no_context_variables():
  # How a model runs is its Runtime or an explicit argument (e.g. BatchNorm's example_mask),
  # never state set around a call: nothing under mobileiqa_jax/models/ imports contextvars.
  models_dir = os.path.join(REPO, "mobileiqa_jax", "models")
  offenders = []
  for name in sorted(os.listdir(models_dir)):
    if not name.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(models_dir, name), encoding="utf-8").read())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      offenders += [f"{name}:{node.lineno}" for n in names if n.split(".")[0] == "contextvars"]
  assert not offenders, offenders


def test_default_runtime_is_documented_and_host_independent():
  model = mobileiqa.build_model(mobileiqa.model_config("teacher", **_TINY))
  assert runtime.DEFAULT == runtime.Runtime(platform="cpu", compute_dtype="float32",
                                            depthwise_impl="shift", remat=False)
  assert model.backbone.depthwise_impl == "shift" and model.backbone.remat is False
  assert model.dtype == jnp.float32 and model.backbone.dtype == jnp.float32
  # Every module's form is explicit after construction: no None left to resolve later.
  assert model.backbone.strided_depthwise_impl == ""


def test_platform_forms_and_validation():
  assert runtime.Runtime.for_platform("tpu").depthwise_impl == "shift"
  assert runtime.Runtime.for_platform("gpu").depthwise_impl == "conv"
  assert runtime.Runtime.for_platform("cpu").depthwise_impl == "shift"
  assert runtime.Runtime.for_platform("gpu", depthwise_impl="shift").depthwise_impl == "shift"
  # The stride-2 blocks' input gradient: transposed slices on CPU only, with 'shift' only.
  assert runtime.Runtime.for_platform("cpu").strided_depthwise_impl == "shift_slices"
  assert runtime.Runtime.for_platform("tpu").strided_depthwise_impl == ""
  assert runtime.Runtime.for_platform("cpu", depthwise_impl="conv").strided_depthwise_impl == ""
  assert runtime.Runtime.for_platform("tpu", remat=True).remat == "stage"
  # The space-to-depth stem on TPU only, and never with tied gradients (no such form).
  assert runtime.Runtime.for_platform("tpu").stem == "space_to_depth"
  assert runtime.Runtime.for_platform("gpu").stem == "conv"
  assert runtime.Runtime.for_platform("cpu").stem == "conv"
  assert runtime.Runtime.for_platform("tpu", tie_weight_grads=True).stem == "conv"
  assert runtime.Runtime.for_platform("tpu").frozen().stem == "conv"
  # ... and not in a distillation, where the image also feeds the teacher's 3x3 stem.
  assert runtime.for_training(tiny_config("teacher"), "tpu").stem == "space_to_depth"
  distill = tiny_config("student", teacher_checkpoint="runs/teacher")
  assert runtime.for_training(distill, "tpu").stem == "conv"
  with pytest.raises(ValueError, match="stem"):
    runtime.Runtime(stem="space_to_depth", tie_weight_grads=True)
  with pytest.raises(ValueError, match="depthwise_impl"):
    runtime.Runtime(depthwise_impl="fast")
  with pytest.raises(ValueError, match="platform"):
    runtime.Runtime.for_platform("metal")
  with pytest.raises(ValueError, match="attention"):
    runtime.Runtime(attention="fast")
  # Training never folds the attention (its variables are the checkpoint's c_q, c_k).
  assert runtime.for_training(tiny_config("student"), "tpu").attention == "reference"
  # A runtime key in an architecture is refused with the lever, not silently kept.
  with pytest.raises(ValueError, match="runtime=Runtime"):
    mobileiqa.model_config("student", dtype="bfloat16")
  # The frozen teacher: no remat; on TPU the stride-2 blocks as XLA's grouped conv.
  rt = runtime.Runtime.for_platform("tpu", compute_dtype="bfloat16", remat="block")
  assert rt.frozen() == runtime.Runtime("tpu", "bfloat16", "shift", False, "conv")
  assert runtime.Runtime.for_platform("gpu").frozen().strided_depthwise_impl == ""


def test_training_config_runtime():
  c = tiny_config("teacher")
  c.compute_dtype, c.remat, c.remat_granularity, c.depthwise_impl = "bfloat16", True, "block", ""
  rt = runtime.for_training(c, "tpu")
  assert (rt.platform, rt.compute_dtype, rt.depthwise_impl, rt.remat) == (
      "tpu", "bfloat16", "shift", "block")
  c.depthwise_impl = "conv"
  assert runtime.for_training(c, "tpu").depthwise_impl == "conv"


def test_old_model_configs_give_up_their_runtime_keys():
  arch = mobileiqa.model_config("teacher", **_TINY).to_dict()
  old = dict(arch, dtype="bfloat16", depthwise_impl="conv",
             backbone_kwargs={"remat": "block"})
  got, found = runtime.architecture_of(old)
  assert got == arch
  assert found == {"compute_dtype": "bfloat16", "depthwise_impl": "conv", "remat": "block"}


@pytest.mark.slow  # traces the teacher twice (~17 CPU s); the platform choice itself is checked above
def test_same_config_traced_as_tpu_and_as_gpu_on_this_cpu_host():
  # The trainer's model for the same config, its runtime resolved for each target platform on
  # this CPU host: TPU gets the shift form (no grouped conv in the program), GPU XLA's grouped
  # convolution at every depthwise layer, whatever jax.default_backend() says.
  c = tiny_config("teacher", **SMALLEST)
  c.depthwise_impl = ""
  mesh = sharding.make_mesh(c.mesh)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  forms = {}
  for platform in ("tpu", "gpu"):
    steps = trainer.build_steps(c, mesh, 10, runtime=runtime.for_training(c, platform))
    assert steps.runtime.platform == platform
    variables = jax.eval_shape(lambda s=steps: s.init_variables())
    forms[platform] = _grouped_convs(
        lambda v, s=steps: s.model.apply(v, x, train=False), variables)
    # The stored architecture does not depend on the platform.
    assert "depthwise_impl" not in steps.model_config.to_dict()
  assert forms["tpu"] == [] and (2, 2) in forms["gpu"], forms


def test_frozen_teacher_on_tpu_uses_grouped_conv_only_at_stride_two():
  model = mobileiqa.build_model(mobileiqa.model_config("teacher", **_TINY),
                                runtime.Runtime.for_platform("tpu").frozen())
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  strides = _grouped_convs(lambda v: model.apply(v, x), variables)
  # mobilevitv2 stages 1-4 open with a stride-2 bottleneck: four grouped convs, all strided.
  assert strides == [(2, 2)] * 4, strides


def _count_primitive(jaxpr, name: str) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count_primitive(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count_primitive(sub, name)
  return n


def test_gpu_training_ties_weight_gradients_in_both_backbones():
  # GPU training runtimes tie each conv's input gradient to its weight gradient (an
  # optimization barrier per conv, in the backward pass only); TPU, CPU and the frozen
  # teacher do not.
  assert runtime.for_training(tiny_config("teacher"), "gpu").tie_weight_grads
  assert not runtime.Runtime.for_platform("gpu").frozen().tie_weight_grads
  assert not runtime.Runtime.for_platform("tpu").tie_weight_grads
  assert not runtime.Runtime.for_platform("cpu").tie_weight_grads
  x = jnp.zeros((2, 32, 32, 3), jnp.float32)
  for backbone in ("mobilevitv2_050", "mobilenetv3_small_050"):
    counts = []
    for tie in (False, True):
      rt = runtime.Runtime.for_platform("gpu", remat="block", tie_weight_grads=tie)
      model = mobileiqa.build_backbone(backbone, rt)
      variables = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x))

      def loss(params, batch_stats, model=model):
        out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                             mutable=["batch_stats"])
        return sum(jnp.sum(f) for f in out)

      jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"],
                                             variables["batch_stats"]).jaxpr
      counts.append(_count_primitive(jaxpr, "optimization_barrier"))
    assert counts[0] == 0 and counts[1] > 10, (backbone, counts)


@pytest.mark.parametrize("layer", ["pointwise", "conv3x3_s2", "dw_shift_s2", "dw_conv_s2"])
def test_tied_weight_gradients_are_the_same_numbers(layer):
  # Tied or not, a layer computes the same output and the same input and weight gradients.
  make = {
      "pointwise": lambda tie: layers.PointwiseConv(8, tie=tie),
      "conv3x3_s2": lambda tie: layers.conv2d(8, 3, 2, use_bias=False, tie=tie),
      "dw_shift_s2": lambda tie: layers.DepthwiseConv2d(6, 3, 2, impl="shift", tie=tie),
      "dw_conv_s2": lambda tie: layers.DepthwiseConv2d(6, 3, 2, impl="conv", tie=tie),
  }[layer]
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 11, 6), jnp.float32)
  variables = make(False).init(jax.random.PRNGKey(0), x)
  results = []
  for tie in (False, True):
    module = make(tie)
    loss = lambda v, x, m=module: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
    results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * (1 + float(jnp.max(jnp.abs(a))))


@pytest.mark.parametrize("variant,backbone", [
    pytest.param("teacher", "mobilevitv2_050", marks=pytest.mark.slow),  # 11 s on 2 cores
    ("student", "mobilenetv3_small_050")])
def test_space_to_depth_stem_scores_as_the_3x3_stem(variant, backbone):
  """Both backbones' stems in the TPU form: the same variables give the same scores."""
  cfg = mobileiqa.model_config(variant, backbone=backbone, num_mals=1, width=16,
                               pooled_size=6, regressor_pool=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 33, 46, 3))
  base = mobileiqa.build_model(cfg, runtime.Runtime(depthwise_impl="conv"))
  s2d = mobileiqa.build_model(cfg, runtime.Runtime(depthwise_impl="conv",
                                                   stem="space_to_depth"))
  assert s2d.backbone.stem == "space_to_depth"
  variables = base.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(s2d.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(variables)
  a, b = base.apply(variables, x), s2d.apply(variables, x)
  assert float(jnp.max(jnp.abs(a - b))) < 1e-5 * max(1.0, float(jnp.max(jnp.abs(a))))
