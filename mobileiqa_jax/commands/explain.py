r"""Draws what each MAL of a MobileIQA model attends to, and how alike their opinions are.

  python launch/explain.py --checkpoint=MODEL --output=DIR [--image_size=H,W] PATH...

MODEL: what launch/predict.py takes (checkpoint folder, training workdir, the authors' .pkl).
PATH: image files or folders (recursed). Writes to DIR, per photo, one PNG with the photo, each
MAL's opinion map (the channel norm of its opinion feature over the S x S grid, upsampled and
overlaid) and the MALs' pairwise cosine-similarity heat map; then `similarity_mean.png` (the
mean over the photos) and `similarity.json` (all numbers). mobileiqa_jax/scoring/explain.py defines
the drawn quantities. An existing non-empty DIR needs --overwrite.
"""

import sys

from absl import flags

from mobileiqa_jax.commands import errors
from mobileiqa_jax.commands import compilation_cache

flags.DEFINE_string("checkpoint", None, "Checkpoint folder, training workdir, or a .pkl/.pth "
                    "state dict.", required=True)
flags.DEFINE_string("output", None, "Folder for the PNGs and similarity.json.", required=True)
flags.DEFINE_string("image_size", None, "HEIGHT,WIDTH the photos are resized to; default: "
                    "the checkpoint's.")
flags.DEFINE_boolean("overwrite", False, "Write into a non-empty --output folder.")
flags.DEFINE_boolean("progress", True, "Progress bar on stderr.")
compilation_cache.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  compilation_cache.enable_from_flags()
  from mobileiqa_jax.scoring import explain  # pylint: disable=g-import-not-at-top
  return explain.explain_command(FLAGS.checkpoint, argv[1:], FLAGS.output, sys.stderr,
                                 FLAGS.image_size, FLAGS.overwrite, FLAGS.progress)


if __name__ == "__main__":
  errors.run(main)
