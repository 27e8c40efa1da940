r"""Converts MobileIQA weights between the authors' PyTorch files and this project's checkpoints.

PyTorch -> JAX (an orbax checkpoint folder that predict/evaluate/export/train read; teacher or
student is read from the keys, --model only insists on one):

  python launch/convert.py --torch_checkpoint=MobileViT_IQA.pkl --output=ckpt/teacher
  python launch/convert.py --torch_checkpoint=MobileNet_IQA.pkl --model=student \
      --output=ckpt/student

JAX -> PyTorch (a state dict the authors' model classes load with load_state_dict, strict):

  python launch/convert.py --checkpoint=ckpt/student --output=student.pkl

An existing --output is never replaced without --overwrite (and a folder that holds other
files, never).
"""

from absl import app
from absl import flags

from mobileiqa_jax.commands import errors
from mobileiqa_jax.weights import convert

flags.DEFINE_string("torch_checkpoint", None, "The authors' .pkl/.pth state dict to convert.")
flags.DEFINE_enum("model", None, ["teacher", "student"], "Which MobileIQA model the "
                  "PyTorch checkpoint must hold (default: read from its keys).")
flags.DEFINE_string("checkpoint", None, "A checkpoint of this project to export to PyTorch.")
flags.DEFINE_string("output", None, "Output folder (to JAX) or .pkl file (to PyTorch).",
                    required=True)
flags.DEFINE_string("image_size", "1231,1907", "HEIGHT,WIDTH stored as the model's default "
                    "input size (the paper's UHD-IQA size by default).")
flags.DEFINE_boolean("overwrite", False, "Replace an existing checkpoint or file at --output.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.torch_checkpoint) == bool(FLAGS.checkpoint):
    raise app.UsageError("give exactly one of --torch_checkpoint (PyTorch -> JAX) or "
                         "--checkpoint (JAX -> PyTorch).")
  if FLAGS.torch_checkpoint:
    model = convert.torch_file_to_checkpoint(FLAGS.torch_checkpoint, FLAGS.model, FLAGS.output,
                                             image_size=FLAGS.image_size,
                                             overwrite=FLAGS.overwrite)
    print(f"wrote {FLAGS.output} ({model})")
  else:
    convert.checkpoint_to_torch_file(FLAGS.checkpoint, FLAGS.output, overwrite=FLAGS.overwrite)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  errors.run(main)
