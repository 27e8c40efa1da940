"""The scoring command's input handling (no model needed)."""

import functools

import numpy as np
import pytest

from mobileiqa_jax.scoring import scorer as scorer_lib
from mobileiqa_jax.data import preprocess


def test_expand_paths_keeps_order_recurses_and_sorts_folders(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "z.JPG").write_bytes(b"x")
  (tmp_path / "b" / "sub").mkdir()
  (tmp_path / "b" / "sub" / "a.png").write_bytes(b"x")
  (tmp_path / "b" / "labels.csv").write_text("not an image")
  single = tmp_path / "single.txt"
  single.write_text("named explicitly: always taken")
  got = scorer_lib.expand_paths([str(single), str(tmp_path / "b")])
  assert got == [str(single), str(tmp_path / "b" / "sub" / "a.png"),
                 str(tmp_path / "b" / "z.JPG")]


def test_expand_paths_missing_path_is_an_error_naming_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jpg"):
    scorer_lib.expand_paths([str(tmp_path / "nope.jpg")])


@pytest.mark.parametrize("text", ["512", "16,512", "a,b", "1,2,3"])
def test_bad_image_size_is_an_error(text):
  with pytest.raises(ValueError, match="image_size"):
    preprocess.parse_image_size(text)


def test_score_files_pads_batches_and_reports_bad_files_in_order(tmp_path):
  from PIL import Image
  paths = []
  for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
    p = tmp_path / f"{i}.png"
    Image.new("RGB", (40, 30), color).save(p)
    paths.append(str(p))
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 truncated")
  paths.insert(1, str(bad))
  shapes = []

  def scorer(batch):
    shapes.append(batch.shape)
    return batch[:, 0, 0, 0].astype(np.float32)  # the normalised red value of each image

  pixels = functools.partial(scorer_lib.photo_pixels, size_hw=(32, 32), normalise=True)
  results = list(scorer_lib.score_in_batches(paths, scorer, pixels, batch_size=3))
  assert [r.path for r in results] == paths
  assert shapes == [(3, 32, 32, 3), (3, 32, 32, 3)]  # one compiled shape, last batch padded
  assert results[1].score is None and "bad.jpg" in results[1].error
  red = [r.score for r in results if r.error is None]
  assert red[0] > 2 and red[1] < 0 and red[2] < 0
