"""benchmarks/device_check.py, the script for a lent GPU, run on this CPU at toy sizes so that it
cannot rot: every kind of row (a JAX step, the PyTorch reference step, the deviceless plan)
runs in its own process and lands in one JSON file with the measured/planned comparison.
The PyTorch rows need torch and timm (the slow test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import REPO



def _run(tmp_path, *flags: str) -> dict:
  out = tmp_path / "out"
  # XLA's optimisations off in the rows' processes: this checks the script's processes and
  # JSON, not the figures, and the bf16 step's compile is most of the test's time.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "device_check.py"), "--toy",
       f"--out={out}", "--row_timeout_s=600", "--budget_s=1200", *flags],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((out / "device_check.json").read_text())


@pytest.mark.slow  # the script's whole process (~1 CPU minute)
def test_teacher_row_on_cpu(tmp_path):
  # The default suite's check: one JAX row (the smallest MobileNetV3 as the teacher's backbone,
  # at support.SMALLEST's depth and one MAL, 32x32) through the script's processes and JSON;
  # the PyTorch rows, the deviceless plan, the measured/planned comparison and the distillation
  # step are the slow test's.
  result = _run(tmp_path, "--kinds=teacher", "--dtypes=bfloat16", "--size=32,32", "--notorch",
                "--teacher_backbone=mobilenetv3_small_050", "--num_mals=1",
                "--depth_multiplier=0.1", "--plan_topology=")
  rows = {r["row"]: r for r in result["rows"]}
  assert result["device"]["platform"] == "cpu" and result["size"] == "32,32"
  assert set(rows) == {"jax:teacher:bfloat16:1"} and result["comparisons"] == []
  jax_row = rows["jax:teacher:bfloat16:1"]
  assert jax_row["ok"], jax_row
  assert jax_row["images_per_s"] > 0 and jax_row["peak_bytes"] > 0
  assert jax_row["compiled_bytes"] > 0 and jax_row["runtime"]["compute_dtype"] == "bfloat16"


@pytest.mark.slow
def test_distillation_rows_torch_and_plan_on_cpu(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  # Both backbones the smallest MobileNetV3: the distillation step holds a frozen teacher and
  # a trained student, so one row covers both models' code paths.
  plan = ("h100:1" if _has("jax_plugins.xla_cuda13") else
          "v5e:2x2" if _has("libtpu") else "")
  result = _run(tmp_path, "--kinds=distill", "--dtypes=bfloat16", "--size=32,32", "--batch=4",
                "--teacher_backbone=mobilenetv3_small_050", f"--plan_topology={plan}")
  rows = {r["row"]: r for r in result["rows"]}
  jax_row = rows["jax:distill:bfloat16:1"]
  assert jax_row["ok"] and jax_row["images_per_s"] > 0, jax_row
  torch_row = rows["torch:distill"]
  assert torch_row["ok"] and torch_row["images_per_s"] > 0, torch_row
  if plan:
    plan_row = rows[f"plan:distill:bfloat16:1:{plan}"]
    assert plan_row["ok"] and plan_row["kind"] == "distillation", plan_row
    (cmp,) = result["comparisons"]
    assert cmp["planned_bytes"] == plan_row["per_chip_bytes"]
    assert cmp["measured_over_planned"] == pytest.approx(
        jax_row["peak_bytes"] / plan_row["per_chip_bytes"])


def _has(module: str) -> bool:
  try:
    __import__(module)
  except ImportError:
    return False
  return True
