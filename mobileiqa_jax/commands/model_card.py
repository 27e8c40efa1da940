r"""Prints the model card of a MobileIQA checkpoint: parameters, MACs, FLOPs, latency, memory.

  python launch/model_card.py --checkpoint=MODEL [--image_size=H,W] [--nomeasure] [--repeats=3]
      [--exports=tflite,onnx]

MODEL: anything `mobileiqa_jax.load` takes (a checkpoint folder, a training workdir, the
authors' .pkl or a .pth state dict). A table, then one JSON line (the last stdout line).
MACs are counted as fvcore/ptflops count them (mobileiqa_jax/profiling/macs.py says what);
latency and peak memory come from a fresh child process on this machine. --nomeasure skips
the compile and timing (counts only; seconds even at 1231x1907, where the teacher compiles
for minutes).
--exports also exports the model to each format and prints its latency, peak memory and file
size on this machine (opt-in: conversion takes minutes at full size).
"""

import json

from absl import app
from absl import flags

from mobileiqa_jax.commands import errors
from mobileiqa_jax.profiling import model_card
from mobileiqa_jax.profiling import process

flags.DEFINE_string("checkpoint", None, "Checkpoint folder, training workdir, or a .pkl/.pth "
                    "state dict (the authors' weights).", required=True)
flags.DEFINE_string("image_size", None, "HEIGHT,WIDTH of the input; default: the "
                    "checkpoint's (1231,1907 for the authors' models).")
flags.DEFINE_boolean("measure", True, "Compile and time the forward pass (XLA FLOPs, "
                     "latency, peak memory) in a child process.")
flags.DEFINE_integer("repeats", 3, "Timed forward passes after the first.")
flags.DEFINE_list("exports", [], "Exports to measure as well: tflite and/or onnx "
                  "(LiteRT XNNPACK / ONNX Runtime CPU, each run in a fresh process).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  card = model_card.profile(FLAGS.checkpoint, FLAGS.image_size, measure=FLAGS.measure,
                            repeats=FLAGS.repeats, exports=FLAGS.exports)
  print("\n".join(model_card.table(card)))
  print(json.dumps(card))


if __name__ == "__main__":
  from mobileiqa_jax.export import exporter  # pylint: disable=g-import-not-at-top
  errors.run(main, user_errors=(process.MeasurementError, exporter.ExportError))
