r"""Trains the teacher or distils the student from a config file.

  python launch/train.py --config=configs/teacher.py:demo
  python launch/train.py --config=configs/student.py:demo --config.teacher_checkpoint=runs/teacher_demo
  python launch/train.py --config=configs/teacher.py --workdir=runs/teacher_uhd \
      --config.init.backbone=mobilevitv2_200.cvnets_in22k_ft_in1k --config.compute_dtype=bfloat16

The command is mobileiqa_jax/commands/train.py (also `mobileiqa train` after pip install);
its docstring says how workdirs resume and --help lists its flags.
"""

import os
import sys

# Config files import `configs.common`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mobileiqa_jax.commands import dispatch  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  dispatch.run_command("train")
