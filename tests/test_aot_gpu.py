"""Ahead-of-time compiles for NVIDIA GPUs without a GPU (mobileiqa_jax/training/aot_compile.py).

Need jax's CUDA plugin (`pip install -e ".[gpu-aot]"`: jax-cuda13-plugin and
jax-cuda13-pjrt, no NVIDIA wheels); skipped, naming it, without. Tiny configs keep each GPU
compile to seconds of CPU.
"""

from __future__ import annotations

import json
import os

import jax
import pytest

from mobileiqa_jax.training import aot_compile
from support import SMALLEST, tiny_config

pytest.importorskip(
    "jax_plugins.xla_cuda13",
    reason="jax's CUDA plugin is not installed: pip install -e \".[gpu-aot]\" "
    "(jax-cuda13-plugin, jax-cuda13-pjrt)")


def _tiny(kind: str = "teacher", **overrides):
  c = tiny_config(kind, **{**SMALLEST, **overrides})
  c.depthwise_impl = ""  # the target's form
  return c


def test_gpu_topologies_and_usage_errors():
  assert len(aot_compile.topology_devices("h100:1")) == 1
  devices = aot_compile.topology_devices("h100:2x8")  # 2 hosts of 8
  assert len(devices) == 16 and {d.process_index for d in devices} == {0, 1}
  assert devices[0].device_kind == aot_compile.CHIPS["h100"].device_kind
  assert aot_compile.topology_devices("a100:8")[0].device_kind == "NVIDIA A100-SXM4-80GB"
  for bad in ("h100:0", "h100:eight", "h100:2x2x2"):
    with pytest.raises(aot_compile.AotUsageError, match="<gpu>:<GPUs>"):
      aot_compile.topology_devices(bad)


@pytest.fixture(scope="module")
def memoized_compiles():
  """Lowered programs compiled once per module (keyed on their HLO text and options).

  JAX's persistent cache does not serve deviceless GPU executables, and the oversized test
  plans the same step as `reports`' one-GPU compile under another memory share: the share is
  applied after compiling (`aot_compile._compile_step`), so the memo changes nothing it checks.
  """
  memo = {}
  compile_ = jax.stages.Lowered.compile

  def compile_once(lowered, compiler_options=None):
    key = (lowered.as_text(), repr(sorted((compiler_options or {}).items())))
    if key not in memo:
      memo[key] = compile_(lowered, compiler_options=compiler_options)
    return memo[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax.stages.Lowered, "compile", compile_once)
    yield memo


@pytest.fixture(scope="module")
def reports(memoized_compiles):
  """Two compiles shared by the tests below: global batch 8 on one H100 and on eight."""
  del memoized_compiles
  return {"one": aot_compile.compile_for_topology(_tiny(batch_size=8), "h100:1"),
          "eight": aot_compile.compile_for_topology(_tiny(batch_size=8), "h100:8", with_eval=False)}


@pytest.mark.slow  # three GPU compiles (~90 CPU s, shared with the next test)
def test_teacher_step_on_one_and_eight_gpus_grows_with_the_batch(reports):
  # The target's runtime: XLA's grouped convolution on GPU, whatever this CPU host would use.
  for r in reports.values():
    lines, json_line, code = aot_compile.main_report(r)
    assert code == aot_compile.EXIT_FITS, "\n".join(lines)
    out = json.loads(json_line)
    assert out["runtime"]["platform"] == "gpu" and out["runtime"]["depthwise_impl"] == "conv"
    assert out["usable_bytes"] == pytest.approx(0.75 * aot_compile.CHIPS["h100"].hbm_bytes)
    # FLOPs from the HLO cost analysis; bytes after fusion unknown, never made up.
    assert out["flops_per_step"] > 0 and out["bytes_accessed_per_step"] is None
    assert "before partitioning" in out["cost_source"]
  one, eight = reports["one"], reports["eight"]
  assert one.eval is not None and one.eval.fits
  # The same global batch over 8 GPUs: 1 image per GPU instead of 8, so less of every
  # per-image buffer and an eighth of the FLOPs per GPU.
  assert eight.chips == 8 and eight.train.per_chip_batch == 1 and one.train.per_chip_batch == 8
  assert one.train.argument_bytes > eight.train.argument_bytes
  assert one.train.temp_bytes > eight.train.temp_bytes
  assert eight.train.flops_per_step == pytest.approx(one.train.flops_per_step / 8, rel=0.05)


@pytest.mark.slow  # shares the compiles above
def test_oversized_gpu_step_exits_3_with_levers(monkeypatch, reports, memoized_compiles):
  # XLA:GPU compiles whatever the size; the plan compares the step's buffers with what JAX's
  # allocator may take. Allowed 0.01% of the GPU (8.5 MB), the batch-8 step does not fit.
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.0001")
  compiled = len(memoized_compiles)
  report = aot_compile.compile_for_topology(_tiny(batch_size=8), "h100:1", with_eval=False)
  assert len(memoized_compiles) == compiled  # the same program as reports["one"]'s
  lines, json_line, code = aot_compile.main_report(report)
  assert code == aot_compile.EXIT_DOES_NOT_FIT, "\n".join(lines)
  out = json.loads(json_line)
  assert out["fits"] is False and out["per_chip_bytes"] > out["usable_bytes"]
  assert out["per_chip_bytes"] == reports["one"].train.per_chip_bytes
  levers = " ".join(out["levers"])
  assert "bfloat16" in levers and "remat" in levers and "XLA_PYTHON_CLIENT_MEM_FRACTION" in levers
  assert "smaller per-chip batch" in levers
  assert any("DOES NOT FIT" in l for l in lines), lines


def test_missing_plugin_is_one_line_naming_the_package(monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_plugin(name, *args, **kwargs):
    if name.startswith("jax_plugins.xla_cuda13"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_plugin)
  with pytest.raises(aot_compile.AotUsageError, match=r"jax-cuda13-plugin.*\.\[gpu-aot\]"):
    aot_compile.topology_devices("h100:1")
  assert os.path.isfile(os.path.join(aot_compile.GPU_TARGETS,
                                     aot_compile.CHIPS["h200"].target_file))
