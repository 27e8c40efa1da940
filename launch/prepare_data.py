"""Prepares an IQA data set from its manual download as tfds records (array_record).

The command is mobileiqa_jax/commands/prepare_data.py (also `mobileiqa prepare_data` after pip install); --help
lists its flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mobileiqa_jax.commands import dispatch  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  dispatch.run_command("prepare_data")
