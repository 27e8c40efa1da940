r"""Exports a MobileIQA checkpoint to a LiteRT/TFLite (or ONNX) model plus a JSON sidecar.

  python launch/export.py --checkpoint=DIR --output=model.tflite \
      [--image_size=HEIGHT,WIDTH] [--quantize=none|float16|dynamic_int8] [--select_tf_ops] \
      [--overwrite]
  python launch/export.py --format=onnx --checkpoint=DIR --output=model.onnx [--image_size=H,W]

--format=onnx: a float32 ONNX model for ONNX Runtime taking a dynamic batch (batch, H, W, 3)
-> (batch,); see mobileiqa_jax/export/onnx.py.

The TFLite model takes one ImageNet-normalised RGB image, NHWC float32 (1, H, W, 3), and
returns one score (1,). The sidecar is named after the whole model file name
(`model.tflite.json` beside `model.tflite`, `model.onnx.json` beside `model.onnx`) and holds
the input size, layout, normalisation, MOS mapping and quantisation. See
mobileiqa_jax/export/tflite.py for the conversion path. --checkpoint takes what
`mobileiqa_jax.load` takes. The model computes in float32.

An existing model file or sidecar at --output is never replaced without --overwrite.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from mobileiqa_jax import storage
from mobileiqa_jax.commands import errors
from mobileiqa_jax.export import exporter
from mobileiqa_jax.export import sidecar

flags.DEFINE_string("checkpoint", None, "Checkpoint folder (launch/convert.py output), a "
                    "training workdir, or a .pkl/.pth state dict (the authors' weights).",
                    required=True)
flags.DEFINE_enum("format", "tflite", list(exporter.FORMATS), "tflite (LiteRT, phones) or "
                  "onnx (ONNX Runtime, dynamic batch, float32).")
flags.DEFINE_string("output", None, "The .tflite (or .onnx) file to write; its sidecar JSON "
                    "goes beside it as <output>.json.", required=True)
flags.DEFINE_string("image_size", None, "HEIGHT,WIDTH of the exported model's fixed input; "
                    "default: the checkpoint's.")
flags.DEFINE_enum("quantize", "none", list(exporter.QUANTIZATIONS), "Post-training "
                  "quantisation: none (float32), float16 weights, or dynamic_int8 (int8 "
                  "weights, dynamic-range kernels).")
flags.DEFINE_boolean("select_tf_ops", False, "Fallback only: allow TensorFlow (Flex) kernels "
                     "for ops TFLite lacks; the app then needs the Flex delegate.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing model file or sidecar at "
                     "--output.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  meta = exporter.export_checkpoint(FLAGS.checkpoint, FLAGS.output, FLAGS.image_size,
                                    FLAGS.quantize, FLAGS.select_tf_ops, fmt=FLAGS.format,
                                    overwrite=FLAGS.overwrite)
  print(json.dumps({"output": storage.absolute(FLAGS.output),
                    "sidecar": storage.absolute(sidecar.sidecar_path(FLAGS.output)),
                    "bytes": meta["file_bytes"], "input_shape": meta["input"]["shape"],
                    "quantization": meta["quantization"],
                    "requires_flex": meta.get("requires_flex", False)}, indent=2))


if __name__ == "__main__":
  errors.run(main, user_errors=(exporter.ExportError,))
