"""Ahead-of-time compiles for TPU topologies (mobileiqa_jax/aot.py, launch/aot_compile.py).

Need libtpu (`pip install -e ".[tpu-aot]"`); skipped without it. No TPU is used: the compiler
runs on this host for devices described by `jax.experimental.topologies`. Tiny configs keep
each TPU compile to seconds of CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_train_helpers import REPO, tiny_config

pytest.importorskip("libtpu")

from mobileiqa_jax import aot  # noqa: E402  pylint: disable=g-import-not-at-top

# The tiny settings of test_train_helpers.tiny_config as command-line overrides.
_TINY_FLAGS = ("--config.model.backbone=mobilenetv3_small_050", "--config.model.width=16",
               "--config.model.pooled_size=6", "--config.model.regressor_pool=2",
               "--config.model.num_mals=1", "--config.data.image_size=(32,32)",
               "--config.data.train_crop=(0,0)", "--config.data.eval_batch_size=8")


def _tiny(kind: str = "teacher", **overrides):
  c = tiny_config(kind, **{"model.num_mals": 1, **overrides})
  c.model.depthwise_impl = ""  # let the target platform choose (must pick 'conv' for TPU)
  return c


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "aot_compile.py"), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_chip_table_and_target_platform_choice():
  for name, chip in aot.CHIPS.items():
    assert chip.name == name and chip.source.startswith("https://")
    assert chip.peak_bf16_flops > chip.peak_fp32_flops > 0
    assert chip.hbm_bytes > 0 and chip.hbm_bytes_per_s > 0
  assert aot.chip_of("v5e:4x4").hbm_bytes == 16 * aot.GiB
  # The depthwise form follows the platform compiled for, not the (CPU) host.
  c = _tiny()
  assert aot.for_target(c, "tpu").model.depthwise_impl == "conv"
  assert aot.for_target(c, "cpu").model.depthwise_impl == "shift"
  assert c.model.depthwise_impl == ""  # the caller's config is not modified


def test_unknown_topology_is_one_line_error():
  proc = _cli("--config=configs/teacher.py:demo", "--topology=v9x:2x2", timeout=120)
  assert proc.returncode == aot.EXIT_USAGE, proc.stderr[-2000:]
  line = [l for l in proc.stderr.splitlines() if l.startswith("aot_compile.py: error:")]
  assert len(line) == 1 and "unknown topology 'v9x:2x2'" in line[0], proc.stderr[-2000:]
  assert "v5e:2x2" in line[0] and "Traceback" not in proc.stderr
  with pytest.raises(aot.AotUsageError, match="unknown topology"):
    aot.topology_devices("v5e")


def test_teacher_step_compiles_and_grows_with_batch():
  # The command: tiny teacher, global batch 8 on v5e:2x2, train and eval steps, JSON last.
  proc = _cli("--config=configs/teacher.py:demo", "--topology=v5e:2x2", "--config.batch_size=8",
              *_TINY_FLAGS)
  assert proc.returncode == aot.EXIT_FITS, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  big = json.loads(lines[-1])
  for key in ("fits", "topology", "chips", "global_batch", "per_chip_bytes", "hbm_bytes",
              "flops_per_step", "bytes_accessed_per_step", "roofline_step_s",
              "roofline_images_per_s"):
    assert key in big, key
  assert big["fits"] and big["topology"] == "v5e:2x2" and big["chips"] == 4
  assert big["global_batch"] == 8 and big["hbm_bytes"] == 16 * aot.GiB
  assert big["eval"]["fits"] and big["eval"]["flops_per_step"] > 0
  assert any("memory per chip" in l for l in lines) and any("roofline" in l for l in lines)
  # Roofline = max(flops / peak, bytes / bandwidth) of v5e (float32 compute: fp32 peak).
  chip = aot.CHIPS["v5e"]
  want = max(big["flops_per_step"] / chip.peak_fp32_flops,
             big["bytes_accessed_per_step"] / chip.hbm_bytes_per_s)
  assert big["roofline_step_s"] == pytest.approx(want, rel=1e-6)
  assert big["roofline_images_per_s"] == pytest.approx(8 / want, rel=1e-6)

  # The API, half the batch: less memory, fewer FLOPs and bytes per chip.
  small = aot.compile_for_topology(_tiny(batch_size=4), "v5e:2x2", with_eval=False).to_json()
  assert small["fits"] and small["per_chip_batch"] == 1
  assert small["temp_bytes"] <= big["temp_bytes"]
  assert small["per_chip_bytes"] < big["per_chip_bytes"]
  assert small["flops_per_step"] < big["flops_per_step"]
  assert small["bytes_accessed_per_step"] < big["bytes_accessed_per_step"]


@pytest.mark.slow  # one more TPU compile (minutes on the shared 2-core VM)
def test_oversized_setting_exits_3_with_levers():
  # 32768 images of 32x32 per chip in float32 without remat: 2048 per chip measured 1.31 GiB
  # of temporaries, so ~21 GiB here, beyond 16 GiB (NOT yet seen passing: see the commit).
  proc = _cli("--config=configs/teacher.py:demo", "--topology=v5e:2x2", "--noeval",
              "--config.batch_size=131072", *_TINY_FLAGS, timeout=1800)
  assert proc.returncode == aot.EXIT_DOES_NOT_FIT, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["fits"] is False and out["roofline_images_per_s"] is None
  assert out["temp_bytes"] > 16 * aot.GiB
  assert "DOES NOT FIT" in proc.stdout
  levers = " ".join(out["levers"])
  assert "bfloat16" in levers and "remat" in levers and "fsdp" in levers
  assert "smaller per-chip batch" in levers


@pytest.mark.slow  # one more TPU compile (minutes on the shared 2-core VM)
def test_distillation_step_on_multihost_topology():
  # v5e:4x4 is 16 chips on 4 hosts; the teacher comes from the preset (no checkpoint).
  c = _tiny("student", batch_size=16, teacher_checkpoint="runs/no_such_teacher")
  c.data.eval_batch_size = 16
  report = aot.compile_for_topology(c, "v5e:4x4", with_eval=False,
                                    teacher_backbone="mobilenetv3_small_050")
  out = report.to_json()
  assert out["fits"] and out["kind"] == "distillation" and out["chips"] == 16
  assert out["per_chip_batch"] == 1 and out["flops_per_step"] > 0
  # The frozen teacher's variables are arguments too: more than the student's state alone.
  assert out["argument_bytes"] > out["alias_bytes"]
