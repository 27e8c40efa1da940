r"""Scores photos with a MobileIQA checkpoint; prints CSV `path,score` on stdout.

  python launch/predict.py --checkpoint=DIR [--image_size=H,W] [--batch_size=N] PATH...

PATH: image files or folders (recursed; image files sorted). A file that cannot be read as an
image is named on stderr with the reason, the others are still scored, and the exit status is 1.
"""

import sys

from absl import app
from absl import flags

from mobileiqa_jax import inference

flags.DEFINE_string("checkpoint", None, "Checkpoint folder (launch/convert.py output, or a "
                    "training workdir).", required=True)
flags.DEFINE_string("image_size", None, "HEIGHT,WIDTH the photos are resized to; default: "
                    "the checkpoint's (1231,1907 for converted MobileIQA models).")
flags.DEFINE_integer("batch_size", 4, "Images per forward pass (one compiled shape).")
flags.DEFINE_integer("workers", None, "Decoding threads (default: min(8, cores)).")
flags.DEFINE_boolean("progress", True, "Progress bar on stderr.")
FLAGS = flags.FLAGS


def main(argv):
  return inference.predict_csv(
      checkpoint=FLAGS.checkpoint, paths=argv[1:], image_size=FLAGS.image_size,
      batch_size=FLAGS.batch_size, workers=FLAGS.workers, progress=FLAGS.progress,
      out=sys.stdout, err=sys.stderr)


if __name__ == "__main__":
  app.run(main)
