r"""Student: MobileNet-IQA (timm mobilenetv3_large_100 + IQA head) distilled from a teacher.

The frozen teacher (read from its own orbax checkpoint: a training workdir, one of its steps,
or `launch/convert.py` output) runs in inference mode; the student in training mode on the
same batch. Loss = w_dof MSE(DOF) + w_x MSE(x) + w_score MSE(score, MOS), weights 1.

Demo (after the teacher demo; distils from its best epoch, minutes on 2 CPU cores;
docs/demo.md gives its held-out SROCC):

  python launch/train.py --config=configs/teacher.py:demo --workdir=runs/teacher_demo
  python launch/train.py --config=configs/student.py:demo \
      --config.teacher_checkpoint=runs/teacher_demo

UHD-IQA (the default):

  python launch/train.py --config=configs/student.py \
      --config.teacher_checkpoint=runs/teacher_uhd_iqa \
      --config.init.backbone=mobilenetv3_large_100.ra_in1k

The released code's data protocol (docs/reproducing.md), after the matching teacher run:

  python launch/train.py --config=configs/student.py:uhd_iqa_release \
      --config.teacher_checkpoint=runs/teacher_uhd_iqa_release

Other data sets: configs/student.py:koniq10k | livec | spaq | bid | kadid10k, and
koniq10k_release | livec_release | spaq_release | bid_release. The released distillation
path does not run and names no optimizer for the student: the teacher's recipe is used.
On a TPU pod every worker runs the same command: see launch/pod_distill.sh.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  dataset = arg or "uhd_iqa"
  c = common.base_config(dataset)
  c.name = f"student_{dataset}"
  c.model = common.model_section("student")
  c.init.backbone = "mobilenetv3_large_100.ra_in1k" if dataset != "demo" else ""
  # Required: where the teacher checkpoint is (workdir -> its best epoch).
  c.teacher_checkpoint = f"runs/teacher_{dataset}"
  if dataset == "demo":
    # The teacher demo's head (pooled size, width): the distillation MSEs compare the
    # student's x and DOF with the teacher's element by element.
    common.demo_overrides(c)
    c.model.backbone = "mobilenetv3_large_100"
    # Four epochs of 217 steps, the cosine over them: distilled over the teacher's 12 epochs
    # of 145 the student's held-out SROCC peaked at epoch 6 and fell while its training loss
    # kept falling (it learns the few training photos); over 6 of 145 (the same 870 steps
    # as these 4) its best epoch was the 5th or 6th. docs/demo.md has its figures.
    c.num_epochs = 4
    c.optimizer.t_max_epochs = c.num_epochs
  return c
