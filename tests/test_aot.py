"""Ahead-of-time compiles for TPU topologies (mobileiqa_jax/training/aot_compile.py, launch/aot_compile.py).

Need libtpu (`pip install -e ".[tpu-aot]"`); skipped without it. No TPU is used: the compiler
runs on this host for devices described by `jax.experimental.topologies` (also under
JAX_PLATFORMS=cpu). Tiny configs keep each TPU compile to seconds of CPU. The compiles run in
this process, through the API and through launch/aot_compile.py's main (as MaxText tests its
train_compile); one subprocess checks the command's exit status and one-line error.
"""

from __future__ import annotations

import json
import pytest

from support import SMALLEST, run_launcher, run_python, tiny_config

pytest.importorskip("libtpu")

from mobileiqa_jax.training import aot_compile  # noqa: E402  pylint: disable=g-import-not-at-top
from mobileiqa_jax.models import runtime  # noqa: E402  pylint: disable=g-import-not-at-top

# A config file for the command: the tests' smallest teacher (support.SMALLEST, one MAL), which
# command-line overrides cannot reach (backbone_kwargs is empty in the presets).
_TINY_CONFIG_FILE = """
from support import SMALLEST, tiny_config

def get_config(arg=None):
  c = tiny_config("teacher", **{"model.num_mals": 1, **SMALLEST})
  c.depthwise_impl = ""
  return c
"""


def _tiny(kind: str = "teacher", **overrides):
  c = tiny_config(kind, **{"model.num_mals": 1, **overrides})
  c.depthwise_impl = ""  # let the target platform choose (runtime.for_training)
  return c


def _cli(*args: str, timeout: int = 600):
  return run_python(["launch/aot_compile.py", *args], timeout=timeout)


def test_chip_table_and_target_platform_choice():
  for name, chip in aot_compile.CHIPS.items():
    assert chip.name == name and chip.source.startswith("https://")
    assert chip.peak_bf16_flops > chip.peak_fp32_flops > 0
    assert chip.hbm_bytes > 0 and chip.hbm_bytes_per_s > 0
  assert aot_compile.chip_of("v5e:4x4").hbm_bytes == 16 * aot_compile.GiB
  assert aot_compile.chip_of("h100:8").platform == "gpu" and aot_compile.chip_of("v5e:2x2").platform == "tpu"
  # The depthwise form follows the platform compiled for, not the (CPU) host: 'shift' on TPU
  # (measured fewer bytes, runtime.depthwise_impl_for), XLA's grouped conv on GPU.
  c = _tiny()
  assert runtime.for_training(c, "tpu").depthwise_impl == "shift"
  assert runtime.for_training(c, "gpu").depthwise_impl == "conv"
  assert runtime.for_training(c, "cpu").depthwise_impl == "shift"
  assert c.depthwise_impl == ""  # the caller's config is not modified


def test_unknown_topology_is_one_line_error():
  proc = _cli("--config=configs/teacher.py:demo", "--topology=v9x:2x2", timeout=120)
  assert proc.returncode == aot_compile.EXIT_USAGE, proc.stderr[-2000:]
  line = [l for l in proc.stderr.splitlines() if l.startswith("aot_compile.py: error:")]
  assert len(line) == 1 and "unknown topology 'v9x:2x2'" in line[0], proc.stderr[-2000:]
  assert "v5e:2x2" in line[0] and "Traceback" not in proc.stderr
  with pytest.raises(aot_compile.AotUsageError, match="unknown topology"):
    aot_compile.topology_devices("v5e")


@pytest.mark.slow  # three TPU compiles (~1 CPU minute); the smaller steps below stay in the default suite
def test_teacher_step_compiles_and_grows_with_batch(tmp_path):
  # The command (its main, in this process): tiny teacher from a config file, global batch 8
  # (a command-line override) on v5e:2x2, train and eval steps, JSON last.
  config_file = tmp_path / "tiny_teacher.py"
  config_file.write_text(_TINY_CONFIG_FILE)
  proc = run_launcher("launch/aot_compile.py", [
      f"--config={config_file}", "--topology=v5e:2x2", "--config.batch_size=8"])
  assert proc.returncode == aot_compile.EXIT_FITS, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  big = json.loads(lines[-1])
  for key in ("fits", "topology", "chips", "global_batch", "per_chip_bytes", "hbm_bytes",
              "flops_per_step", "bytes_accessed_per_step", "roofline_step_s",
              "roofline_images_per_s"):
    assert key in big, key
  assert big["fits"] and big["topology"] == "v5e:2x2" and big["chips"] == 4
  assert big["global_batch"] == 8 and big["hbm_bytes"] == 16 * aot_compile.GiB
  assert big["eval"]["fits"] and big["eval"]["flops_per_step"] > 0
  assert any("memory per chip" in l for l in lines) and any("roofline" in l for l in lines)
  # Roofline = max(flops / peak, bytes / bandwidth) of v5e (float32 compute: fp32 peak).
  chip = aot_compile.CHIPS["v5e"]
  want = max(big["flops_per_step"] / chip.peak_fp32_flops,
             big["bytes_accessed_per_step"] / chip.hbm_bytes_per_s)
  assert big["roofline_step_s"] == pytest.approx(want, rel=1e-6)
  assert big["roofline_images_per_s"] == pytest.approx(8 / want, rel=1e-6)

  # The API, half the batch: a smaller input batch in HBM, fewer FLOPs and bytes per chip.
  # Not the temporaries: at toy sizes XLA keeps them in the chip's on-chip VMEM as it sees fit,
  # so their HBM share does not follow the batch (full-depth tiny teacher, 'shift': 67, 61, 59,
  # 40 MB at global batch 4, 8, 16, 32); at the paper's size it does (README pod table).
  small = aot_compile.compile_for_topology(_tiny(batch_size=4, **SMALLEST), "v5e:2x2",
                                   with_eval=False).to_json()
  assert small["fits"] and small["per_chip_batch"] == 1
  image_bytes = 32 * 32 * 3 * 4  # one float32 image per chip fewer
  assert big["argument_bytes"] - small["argument_bytes"] >= image_bytes
  assert small["flops_per_step"] < big["flops_per_step"]
  assert small["bytes_accessed_per_step"] < big["bytes_accessed_per_step"]


def test_oversized_setting_exits_3_with_levers():
  # 65536 images of 32x32 per chip in float32 without remat, on the smallest model (tests'
  # SMALLEST): far beyond a v5e's 16 GiB. The exit code and report are the command's
  # (`main_report` is what launch/aot_compile.py prints); the flags path is tested above.
  c = _tiny(batch_size=4 * 65536, **SMALLEST)
  report = aot_compile.compile_for_topology(c, "v5e:2x2", with_eval=False)
  lines, json_line, code = aot_compile.main_report(report)
  assert code == aot_compile.EXIT_DOES_NOT_FIT, "\n".join(lines)
  out = json.loads(json_line)
  assert out["fits"] is False and out["roofline_images_per_s"] is None
  assert out["temp_bytes"] > 16 * aot_compile.GiB
  assert any("DOES NOT FIT" in l for l in lines), lines
  levers = " ".join(out["levers"])
  assert "bfloat16" in levers and "remat" in levers and "fsdp" in levers
  assert "smaller per-chip batch" in levers


@pytest.mark.slow  # a 16-chip TPU compile (~40 CPU s); the oversized test keeps a TPU compile in the default suite
def test_distillation_step_on_multihost_topology():
  # v5e:4x4 is 16 chips on 4 hosts; the teacher comes from the preset (no checkpoint).
  c = _tiny("student", batch_size=16, teacher_checkpoint="runs/no_such_teacher", **SMALLEST)
  c.data.eval_batch_size = 16
  report = aot_compile.compile_for_topology(c, "v5e:4x4", with_eval=False,
                                    teacher_backbone="mobilenetv3_small_050")
  out = report.to_json()
  assert out["fits"] and out["kind"] == "distillation" and out["chips"] == 16
  assert out["per_chip_batch"] == 1 and out["flops_per_step"] > 0
  # The frozen teacher's variables are arguments too: more than the student's state alone.
  assert out["argument_bytes"] > out["alias_bytes"]


def test_out_of_memory_message_parsing():
  # "exceeds" is libtpu 0.0.42's wording (measured); the plural verb is accepted as well.
  for verb in ("exceeds", "exceed"):
    msg = (f"RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           f"temporaries (27.89G) {verb} available HBM (15.75G).")
    temps, available = aot_compile._parse_oom(msg)  # pylint: disable=protected-access
    assert temps == pytest.approx(27.89 * aot_compile.GiB) and available == pytest.approx(15.75 * aot_compile.GiB)


def test_batch_sizes_must_split_over_the_devices():
  # Checked before anything compiles (the eval batch only when the eval step is compiled: the
  # v5e:4x4 rows of the README pod table were run with --noeval and eval_batch_size 8 first).
  with pytest.raises(aot_compile.AotUsageError, match="eval_batch_size=6 must be divisible by the 4"):
    aot_compile.compile_for_topology(_tiny(batch_size=8, **{"data.eval_batch_size": 6}), "v5e:2x2")
  with pytest.raises(aot_compile.AotUsageError, match=r"config\.batch_size=6 must be divisible"):
    aot_compile.compile_for_topology(_tiny(batch_size=6, **{"data.eval_batch_size": 6}), "v5e:2x2",
                             with_eval=False)
