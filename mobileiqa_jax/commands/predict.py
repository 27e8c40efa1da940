r"""Scores photos with a MobileIQA model; prints CSV `path,score` on stdout.

  python launch/predict.py --checkpoint=MODEL [--image_size=H,W] [--batch_size=N] PATH...

MODEL: a checkpoint folder (launch/convert.py output), a training workdir (its best step), or
the authors' .pkl / a .pth state dict (teacher or student is read from its keys; converted in
memory). PATH: image files or folders (recursed; image files sorted). A file that cannot be
read as an image is named on stderr with the reason, the others are still scored, and the exit
status is 1. A mistake in the command (missing path, bad flag value, not a checkpoint) is one
line on stderr; --verbose shows the traceback and library logs. Compiled programs are kept in
JAX's compilation cache ($XDG_CACHE_HOME/mobileiqa_jax/jax; --compilation_cache_dir moves it,
--nocompilation_cache or MOBILEIQA_JAX_CACHE_DIR=0 turns it off), so a second run of the same
size compiles nothing; the authors' .pkl is read without PyTorch.
"""

import sys

from absl import flags

from mobileiqa_jax import cli
from mobileiqa_jax import compilation_cache
from mobileiqa_jax import inference

flags.DEFINE_string("checkpoint", None, "Checkpoint folder, training workdir, or a .pkl/.pth "
                    "state dict (the authors' weights).", required=True)
flags.DEFINE_string("image_size", None, "HEIGHT,WIDTH the photos are resized to; default: "
                    "the checkpoint's (1231,1907 for the authors' models).")
flags.DEFINE_enum("model", None, ["teacher", "student"], "For a state dict: insist that it "
                  "holds this model (default: read from its keys).")
flags.DEFINE_integer("batch_size", 4, "Images per forward pass (one compiled shape).")
flags.DEFINE_integer("workers", None, "Decoding threads (default: min(8, cores)).")
flags.DEFINE_boolean("progress", True, "Progress bar on stderr.")
compilation_cache.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  compilation_cache.enable_from_flags()
  return inference.predict_csv(
      checkpoint=FLAGS.checkpoint, paths=argv[1:], image_size=FLAGS.image_size,
      batch_size=FLAGS.batch_size, workers=FLAGS.workers, progress=FLAGS.progress,
      model=FLAGS.model, out=sys.stdout, err=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
