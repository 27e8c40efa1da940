r"""Scores photos with a MobileIQA model; prints CSV `path,score` on stdout (or --output).

  python launch/predict.py --checkpoint=MODEL [--image_size=H,W] [--batch_size=N] PATH...
  python launch/predict.py --checkpoint=MODEL --distributed --output=scores.csv PATH...

--distributed: run the same command on every process (host); jax.distributed is set up as for
training (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or discovered on TPU
pods and SLURM). Each process scores its share into parts beside --output, process 0 merges
them into --output in input order; a rerun reuses the parts already written (a process that
stopped is named; see mobileiqa_jax/scoring/distributed.py).

MODEL: a checkpoint folder (launch/convert.py output), a training workdir (its best step), or
the authors' .pkl / a .pth state dict (teacher or student is read from its keys; converted in
memory). PATH: image files or folders (recursed; image files sorted). MODEL, PATH and --output
may be gs:// or s3:// URLs (`pip install mobileiqa_jax[buckets]`; a prefix such as
gs://bucket/photos/ expands like a folder; docs/training.md, "Runs in a bucket"). A file that cannot be
read as an image is named on stderr with the reason, the others are still scored, and the exit
status is 1. A mistake in the command (missing path, bad flag value, not a checkpoint) is one
line on stderr; --verbose shows the traceback and library logs. Compiled programs are kept in
JAX's compilation cache ($XDG_CACHE_HOME/mobileiqa_jax/jax; --compilation_cache_dir moves it,
--nocompilation_cache or MOBILEIQA_JAX_CACHE_DIR=0 turns it off), so a second run of the same
size compiles nothing; the authors' .pkl is read without PyTorch.
"""

import sys

from absl import app
from absl import flags

from mobileiqa_jax import storage
from mobileiqa_jax.commands import errors
from mobileiqa_jax.commands import compilation_cache
from mobileiqa_jax.scoring import distributed as distributed_lib
from mobileiqa_jax.commands import program_cache
from mobileiqa_jax.scoring import predict

flags.DEFINE_string("checkpoint", None, "Checkpoint folder, training workdir, or a .pkl/.pth "
                    "state dict (the authors' weights).", required=True)
flags.DEFINE_string("image_size", None, "HEIGHT,WIDTH the photos are resized to; default: "
                    "the checkpoint's (1231,1907 for the authors' models).")
flags.DEFINE_enum("model", None, ["teacher", "student"], "For a state dict: insist that it "
                  "holds this model (default: read from its keys).")
flags.DEFINE_integer("batch_size", None, "Images per forward pass (one compiled shape; "
                     "default 2 on CPU, 8 on GPU/TPU).")
flags.DEFINE_integer("workers", None, "Decoding threads (default: min(8, cores)).")
flags.DEFINE_boolean("progress", True, "Progress bar on stderr.")
flags.DEFINE_string("output", None, "Write the CSV to this file (complete or not at all) "
                    "instead of stdout; needed with --distributed.")
flags.DEFINE_boolean("distributed", False, "Score on every process of a jax.distributed job, "
                     "each its share; process 0 writes --output.")
flags.DEFINE_integer("part_size", distributed_lib.DEFAULT_PART_SIZE, "--distributed: "
                     "files per part, the unit a rerun does not score again.")
flags.DEFINE_enum("preprocessing", None, ["host", "device"], "Where photos are resized: "
                  "'host' (PIL on CPU threads, the reference exactly) or 'device' (inside the "
                  "jitted function, grouped by size); default device on gpu/tpu, host on cpu.")
compilation_cache.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  compilation_cache.enable_from_flags()
  settings = dict(checkpoint=FLAGS.checkpoint, paths=argv[1:], image_size=FLAGS.image_size,
                  batch_size=FLAGS.batch_size, workers=FLAGS.workers, progress=FLAGS.progress,
                  model=FLAGS.model, preprocessing=FLAGS.preprocessing, err=sys.stderr,
                  programs=program_cache.for_this_process())
  if FLAGS.distributed:
    if not FLAGS.output:
      raise app.UsageError("--distributed needs --output=FILE.csv (process 0 writes it).")
    return distributed_lib.predict_csv_distributed(
        output=FLAGS.output, part_size=FLAGS.part_size, **settings)
  if FLAGS.output:
    with storage.atomic_text(FLAGS.output) as out:
      return predict.predict_csv(out=out, **settings)
  return predict.predict_csv(out=sys.stdout, **settings)


if __name__ == "__main__":
  errors.run(main, user_errors=(distributed_lib.ScoringProcessError,))
