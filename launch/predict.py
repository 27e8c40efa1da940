"""Scores photos with a MobileIQA model; prints CSV `path,score` on stdout.

The command is mobileiqa_jax/commands/predict.py (also `mobileiqa predict` after pip install); --help
lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mobileiqa_jax.commands import dispatch  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  dispatch.run_command("predict")
