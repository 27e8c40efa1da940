r"""Draws what each MAL of a MobileIQA model attends to, and how alike their opinions are.

  python launch/explain.py --checkpoint=MODEL --output=DIR [--image_size=H,W] PATH...

MODEL: what launch/predict.py takes (checkpoint folder, training workdir, the authors' .pkl).
PATH: image files or folders (recursed). Writes to DIR, per photo, one PNG with the photo, each
MAL's opinion map (the channel norm of its opinion feature over the S x S grid, upsampled and
overlaid) and the MALs' pairwise cosine-similarity heat map; then `similarity_mean.png` (the
mean over the photos) and `similarity.json` (all numbers). mobileiqa_jax/explain.py defines
the drawn quantities. An existing non-empty DIR needs --overwrite.
"""

import os
import sys

from absl import app
from absl import flags

from mobileiqa_jax import cli
from mobileiqa_jax import inference

flags.DEFINE_string("checkpoint", None, "Checkpoint folder, training workdir, or a .pkl/.pth "
                    "state dict.", required=True)
flags.DEFINE_string("output", None, "Folder for the PNGs and similarity.json.", required=True)
flags.DEFINE_string("image_size", None, "HEIGHT,WIDTH the photos are resized to; default: "
                    "the checkpoint's.")
flags.DEFINE_boolean("overwrite", False, "Write into a non-empty --output folder.")
flags.DEFINE_boolean("progress", True, "Progress bar on stderr.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("no PATH given: name image files or folders to explain.")
  inference.parse_image_size(FLAGS.image_size)
  files = inference.expand_paths(argv[1:])
  if os.path.isdir(FLAGS.output) and os.listdir(FLAGS.output) and not FLAGS.overwrite:
    raise FileExistsError(f"--output={FLAGS.output} is not empty: pass --overwrite to write "
                          "into it, or choose another folder.")
  if os.path.exists(FLAGS.output) and not os.path.isdir(FLAGS.output):
    raise NotADirectoryError(f"--output={FLAGS.output} is a file, not a folder.")
  from mobileiqa_jax import explain  # pylint: disable=g-import-not-at-top
  scorer = inference.load(FLAGS.checkpoint, FLAGS.image_size, batch_size=1)
  bar = None
  if FLAGS.progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(files), unit="img", file=sys.stderr, dynamic_ncols=True)
  failed = []
  errors = lambda msg: (failed.append(msg), sys.stderr.write(msg + "\n"))  # noqa: E731
  result = explain.explain_files(scorer, files, FLAGS.output, bar.update if bar else None,
                                 on_error=errors)
  if bar:
    bar.close()
  print(f"wrote {len(result['files'])} files to {FLAGS.output}")
  return 1 if failed else 0


if __name__ == "__main__":
  cli.run(main)
