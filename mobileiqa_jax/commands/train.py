r"""Trains the teacher or distils the student from a config file: `trainer.train_and_evaluate`.

  mobileiqa train --config=configs/teacher.py:demo
  mobileiqa train --config=configs/student.py:demo --config.teacher_checkpoint=runs/teacher_demo
  mobileiqa train --config=my_experiment.py --workdir=gs://bucket/runs/teacher_uhd

(`python launch/train.py ...` from a checkout is the same command.) --workdir defaults to
runs/<config.name>; an existing workdir with checkpoints resumes, and refuses (before writing
anything) a config that differs from its config.json except in the fields of
`training.checkpointer.SAFE_TO_CHANGE_ON_RESUME` (num_epochs, max_steps, eval_every_epochs,
log_every_steps, progress_bar, checkpoint.*, mesh, ...). Any config field can be overridden
(--config.optimizer.lr=3e-5); an unknown field is one error line that suggests the nearest.
Multi-host (TPU pods, clusters): add --distributed (or set MOBILEIQA_DISTRIBUTED=1) and run
the same command on every host; see launch/pod_distill.sh. --workdir, the teacher and the
backbone file may be gs:// or s3:// URLs (the `buckets` extra); prepared data is read from
local disk (`prepare_data --stage_to`); docs/training.md, "Runs in a bucket".
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mobileiqa_jax.commands import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:variant], e.g. configs/teacher.py:demo.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default runs/<config.name>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _DISTRIBUTED.value:
    with config.unlocked():
      config.distributed = True
  workdir = _WORKDIR.value or os.path.join("runs", config.name or "run")
  from mobileiqa_jax.training import trainer  # pylint: disable=g-import-not-at-top
  summary = trainer.train_and_evaluate(config, workdir)
  best = summary.get("best_eval") or summary.get("best") or {}
  logging.info("done at step %d%s; best: %s", summary["step"],
               " (preempted: rerun the same command to resume)" if summary["preempted"] else "",
               {k: round(v, 4) for k, v in best.items() if isinstance(v, float)})
  if not summary["preempted"] and best:
    print(f"{workdir}: step {summary['step']}, best SROCC {best.get('srocc', float('nan')):.4f} "
          f"PLCC {best.get('plcc', float('nan')):.4f} KROCC {best.get('krocc', float('nan')):.4f}")


if __name__ == "__main__":
  # Training keeps its own INFO log (the run's record) without the libraries' (--verbose
  # brings them back). User errors, a non-finite loss, a held workdir, a damaged checkpoint
  # and a full disk are one line each.
  from mobileiqa_jax.training import metric_writer  # pylint: disable=g-import-not-at-top
  errors.run(main, quiet="libraries", user_errors=(metric_writer.NonFiniteLossError,))
