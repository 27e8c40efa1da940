r"""Compiles a config's train and eval steps for a TPU or GPU topology on this host (none needed).

  python launch/aot_compile.py --config=configs/teacher.py --topology=v5e:2x2 \
      --config.compute_dtype=bfloat16 --config.remat=True
  python launch/aot_compile.py --config=configs/student.py --topology=v5e:4x4 \
      --config.compute_dtype=bfloat16 --config.batch_size=64
  python launch/aot_compile.py --config=configs/teacher.py --topology=h100:1 \
      --config.compute_dtype=bfloat16 --config.remat=True

TPU topologies need libtpu (pip install -e ".[tpu-aot]"), GPU ones (h100:1, h100:8, h200:8,
a100:8, h100:2x8 = 2 hosts of 8) jax's CUDA plugin (pip install -e ".[gpu-aot]"). Prints per-chip memory, FLOPs and bytes per step and
per image and a roofline bound, then one JSON line. Exit status: 0 fits, 3 does not fit (the
report names the levers), 1 another compile error, 2 a usage error (e.g. unknown topology).
A distillation config compiles with the frozen teacher: from `config.teacher_checkpoint`'s
stored model config when it exists, else from the teacher preset (no weights are read).
See mobileiqa_jax/training/aot_compile.py.
"""

import os

# Nothing runs here: the target's devices are described, never driven, so jax itself needs only
# the CPU (and must not try to start a local GPU or TPU backend).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mobileiqa_jax.commands import errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:variant], e.g. configs/teacher.py.",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology (v5e:2x2, v5e:4x4, ...) or GPUs (h100:1, h100:8, h100:2x8).")
_EVAL = flags.DEFINE_bool("eval", True, "Also compile the eval step.")
_TEACHER_BACKBONE = flags.DEFINE_string(
    "teacher_backbone", "", "Distillation: the preset teacher's backbone (default its own).")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mobileiqa_jax.training import aot_compile  # pylint: disable=g-import-not-at-top
  try:
    report = aot_compile.compile_for_topology(_CONFIG.value, _TOPOLOGY.value, with_eval=_EVAL.value,
                                      teacher_backbone=_TEACHER_BACKBONE.value)
  except aot_compile.AotUsageError as e:
    errors.fail(e, status=aot_compile.EXIT_USAGE)
  lines, json_line, code = aot_compile.main_report(report)
  print("\n".join(lines))
  print(json_line, flush=True)
  return code


if __name__ == "__main__":
  errors.run(main)
