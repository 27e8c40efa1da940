"""The README's Python blocks run as written, on a random-weight `.pkl` written the authors' way.

The blocks run in order in one fresh interpreter, in a folder holding what they name:
`best_model.pkl` (a student with a small head: `load` reads the head's size from the keys),
`photo1.jpg`, `photo2.jpg` and `photos/` with two photos and one unreadable file. Photos: LIVE
Challenge JPEGs from ../shared/data/livec_jpg (see its README for the terms).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

import data_fixtures
from mobileiqa_jax.models import mobileiqa
from support import python_env, run_python, save_authors_pkl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks() -> list[str]:
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_readme_python_blocks_run_on_an_authors_pkl(tmp_path):
  pytest.importorskip("torch")  # to write the .pkl as the authors' code does
  blocks = _python_blocks()
  assert len(blocks) >= 2 and 'load("best_model.pkl")' in blocks[0], blocks
  save_authors_pkl(mobileiqa.build_model(mobileiqa.model_config("student", pooled_size=8,
                                                                width=32)),
                   str(tmp_path / "best_model.pkl"))
  photos = [os.path.join(data_fixtures.LIVEC_IMAGES, f"{n}.JPG") for n in (1000, 1001)]
  shutil.copy(photos[0], tmp_path / "photo1.jpg")
  shutil.copy(photos[1], tmp_path / "photo2.jpg")
  (tmp_path / "photos").mkdir()
  shutil.copy(photos[0], tmp_path / "photos" / "a.jpg")
  (tmp_path / "photos" / "b.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")
  shutil.copy(photos[1], tmp_path / "photos" / "c.jpg")

  proc = run_python(["-c", "\n".join(blocks)], cwd=str(tmp_path), env=python_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  # The first block: one score per photo, in [0, 1] for the student.
  scores = [float(x) for x in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", lines[0])]
  assert len(scores) == 2 and all(0 <= s <= 1 for s in scores), lines[0]
  # The second: every file in order, the unreadable one named with its reason, not skipped.
  assert [l.split()[0] for l in lines[1:]] == [os.path.join("photos", n)
                                              for n in ("a.jpg", "b.jpg", "c.jpg")], lines
  assert 0 <= float(lines[1].split()[1]) <= 1 and 0 <= float(lines[3].split()[1]) <= 1
  assert "cannot be scored" in lines[2], lines[2]
