r"""Evaluates a checkpoint on a split: metrics JSON, predictions CSV and scatter plot.

  python launch/evaluate.py --checkpoint=runs/teacher_demo             # best epoch, its config
  python launch/evaluate.py --checkpoint=runs/teacher_demo --which=latest --split=train
  python launch/evaluate.py --checkpoint=ckpt/student --config=configs/student.py:koniq10k \
      --split=test

--checkpoint: a standalone checkpoint (launch/convert.py output), a training step folder, or a
training workdir (its best step by SROCC+PLCC+KROCC), or a .pkl/.pth state dict (the authors'
weights). --config is needed only for checkpoints outside a training workdir; its fields can be
overridden as in launch/train.py. The model computes in float32, as predict and export do.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from mobileiqa_jax.commands import errors
from mobileiqa_jax.commands import compilation_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant] naming the "
                                          "data set (default: the checkpoint's workdir config).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint, step folder, workdir, or "
                                  "a .pkl/.pth state dict (with --config).", required=True)
_SPLIT = flags.DEFINE_string("split", None, "Split to score (default: config.data.eval_split).")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Step of a workdir to load.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Default <checkpoint>/eval_<data>_<split>.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global eval batch size override.")
compilation_cache.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compilation_cache.enable_from_flags()
  from mobileiqa_jax.scoring import evaluate  # pylint: disable=g-import-not-at-top
  result = evaluate.evaluate_checkpoint(_CHECKPOINT.value, _CONFIG.value, _SPLIT.value,
                                        _OUTPUT.value, _WHICH.value, _BATCH.value)
  print(" ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
  print(f"wrote {result['output_dir']}")


if __name__ == "__main__":
  errors.run(main)
