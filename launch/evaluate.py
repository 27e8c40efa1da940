"""Evaluates a checkpoint on a split: metrics JSON, predictions CSV and scatter plot.

The command is mobileiqa_jax/commands/evaluate.py (also `mobileiqa evaluate` after pip install); --help
lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mobileiqa_jax.commands import dispatch  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  dispatch.run_command("evaluate")
