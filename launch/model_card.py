"""Prints the model card of a MobileIQA checkpoint: parameters, MACs, FLOPs, latency, memory.

The command is mobileiqa_jax/commands/model_card.py (also `mobileiqa profile` after pip install); --help
lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mobileiqa_jax.commands import dispatch  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  dispatch.run_command("profile")
