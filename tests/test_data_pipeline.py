"""The input pipeline: preprocessing parity, order, multi-process coverage, resuming, errors.

No TensorFlow and no preparing needed: in-memory and folder sources.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import data_fixtures
from support import IMAGENET_MEAN, IMAGENET_STD
from mobileiqa_jax.data import releases
from mobileiqa_jax.data import pipeline
from mobileiqa_jax.data import preprocess

SIZE = (12, 16)  # (H, W): small, the logic does not depend on it


def _source(n=23):
  images = [data_fixtures.image_bytes(i, (20, 14)) for i in range(n)]
  return pipeline.memory_source(images, [i / n for i in range(n)], [f"img{i}" for i in range(n)])


@pytest.fixture(scope="module")
def source():
  return _source()


def _indices(loader, epoch, start=0):
  return [b["index"][b["mask"]].tolist() for b in loader.iter_epoch(epoch, start)]


# --- preprocess -------------------------------------------------------------------------------


def test_resize_normalize_matches_the_reference_formula():
  data = data_fixtures.image_bytes(7, (50, 40))
  img = preprocess.decode_rgb(data, "x.jpg")
  got = preprocess.resize_normalize(img, (24, 30))
  # The reference: PIL decode -> convert('RGB') -> resize((W, H)) bicubic -> /255 -> Normalize.
  ref = Image.open(io.BytesIO(data)).convert("RGB").resize((30, 24), Image.BICUBIC)
  ref = np.asarray(ref, np.float32) / np.float32(255)
  ref = (ref - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  assert got.dtype == np.float32 and got.shape == (24, 30, 3)
  np.testing.assert_array_equal(got, ref)  # bit-exact
  flipped = preprocess.resize_normalize(img, (24, 30), hflip=True, vflip=True)
  np.testing.assert_array_equal(flipped, ref[::-1, ::-1])


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("I;16", "PNG"), ("RGBA", "PNG"),
                                      ("P", "PNG"), ("L", "JPEG"), ("LA", "PNG")])
def test_decode_converts_like_pil_convert_rgb(mode, fmt):
  data = data_fixtures.image_bytes(3, mode=mode, fmt=fmt)
  got = preprocess.decode_rgb(data, f"odd.{fmt.lower()}")
  assert got.mode == "RGB"
  np.testing.assert_array_equal(
      np.asarray(got), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"just some text, not a picture\n", "not a recognised image"),
    (data_fixtures.image_bytes(5, (64, 64))[:300], "truncated"),
], ids=["zero_bytes", "text", "truncated_jpeg"])
def test_decode_errors_name_the_file(data, reason):
  with pytest.raises(preprocess.ImageDecodeError) as e:
    preprocess.decode_rgb(data, "some/dir/bad.jpg")
  assert isinstance(e.value, ValueError)
  assert "some/dir/bad.jpg" in str(e.value) and reason in str(e.value).lower()


# --- loader order, sharding, state -------------------------------------------------------------


def test_same_seed_same_order_other_seed_other_order(source):
  a = pipeline.Loader(source, 4, SIZE, train=True, seed=5, num_workers=2)
  b = pipeline.Loader(source, 4, SIZE, train=True, seed=5, num_workers=1)
  c = pipeline.Loader(source, 4, SIZE, train=True, seed=6, num_workers=2)
  ba, bb = list(a.iter_epoch(0)), list(b.iter_epoch(0))
  for x, y in zip(ba, bb):  # also the pixels (flips) agree, whatever the worker count
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["mos"], y["mos"])
  assert _indices(a, 0) != _indices(c, 0)
  assert _indices(a, 0) != _indices(a, 1)  # reshuffled per epoch
  # Training drops the last partial global batch: 23 // 4 = 5 full batches.
  assert a.steps_per_epoch == 5 and all(len(i) == 4 for i in _indices(a, 0))


def test_labels_follow_the_images(source):
  loader = pipeline.Loader(source, 5, SIZE, train=True, seed=1, num_workers=2, flips=False)
  for b in loader.iter_epoch(0):
    for row, i in enumerate(b["index"]):
      assert b["mos"][row] == np.float32(source[i]["mos"])
      want = preprocess.resize_normalize(preprocess.decode_rgb(source[i]["image"], ""), SIZE)
      np.testing.assert_array_equal(b["image"][row], want)


def test_train_crops_are_windows_of_the_resized_image(source):
  crop = (5, 7)
  loader = pipeline.Loader(source, 6, SIZE, train=True, seed=2, num_workers=2, flips=False,
                           crop_size=crop)
  offsets = set()
  for b in loader.iter_epoch(0):
    assert b["image"].shape == (6, *crop, 3)
    for row, i in enumerate(b["index"]):
      whole = preprocess.resize_normalize(preprocess.decode_rgb(source[i]["image"], ""), SIZE)
      # Exactly one window position of the whole image holds this crop.
      hits = [(t, l) for t in range(SIZE[0] - crop[0] + 1) for l in range(SIZE[1] - crop[1] + 1)
              if np.array_equal(whole[t:t + crop[0], l:l + crop[1]], b["image"][row])]
      assert hits, i
      offsets.add(hits[0])
  assert len(offsets) > 3  # the windows move
  again = pipeline.Loader(source, 6, SIZE, train=True, seed=2, num_workers=1, flips=False,
                          crop_size=crop)
  for x, y in zip(loader.iter_epoch(1), again.iter_epoch(1)):
    np.testing.assert_array_equal(x["image"], y["image"])  # seeded, whatever the workers
  # Evaluation always sees the whole image.
  ev = pipeline.Loader(source, 6, SIZE, train=False, crop_size=crop)
  assert next(ev.iter_epoch(0))["image"].shape == (6, *SIZE, 3)
  with pytest.raises(ValueError, match="crop_size"):
    pipeline.Loader(source, 6, SIZE, train=True, crop_size=(SIZE[0] + 1, 4))


def test_decoded_pixels_load_as_their_encoded_file_does(source):
  # A source of decoded uint8 RGB arrays (the demo's) gives the batches of its files.
  decoded = pipeline.memory_source(
      [np.asarray(preprocess.decode_rgb(source[i]["image"], "")) for i in range(len(source))],
      source.mos, source.names)
  for train in (True, False):
    common = dict(train=train, seed=4, num_workers=2, crop_size=(5, 7))
    for a, b in zip(pipeline.Loader(source, 6, SIZE, **common).iter_epoch(0),
                    pipeline.Loader(decoded, 6, SIZE, **common).iter_epoch(0)):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["mos"], b["mos"])


@pytest.mark.parametrize("train", [True, False])
def test_two_processes_see_every_example_once(source, train):
  loaders = [pipeline.Loader(source, 3, SIZE, train=train, seed=2, process_index=p,
                             process_count=2, num_workers=1, drop_remainder=False)
             for p in range(2)]
  assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == 4  # ceil(23 / 6)
  seen = []
  for b0, b1 in zip(loaders[0].iter_epoch(3), loaders[1].iter_epoch(3)):
    for b in (b0, b1):
      assert b["image"].shape == (3, *SIZE, 3)  # fixed shapes, padded
      assert not b["image"][~b["mask"]].any() and (b["index"][~b["mask"]] == -1).all()
      seen += b["index"][b["mask"]].tolist()
  assert sorted(seen) == list(range(len(source)))
  # The global batch is the same as a single process's with twice the batch.
  single = pipeline.Loader(source, 6, SIZE, train=train, seed=2, num_workers=1,
                           drop_remainder=False)
  merged = [i for b0, b1 in zip(loaders[0].iter_epoch(3), loaders[1].iter_epoch(3))
            for i in np.concatenate([b0["index"], b1["index"]]).tolist() if i >= 0]
  assert merged == [i for b in _indices(single, 3) for i in b]


def test_eval_pads_and_masks_the_last_batch(source):
  loader = pipeline.Loader(source, 5, SIZE, train=False, num_workers=2)
  batches = list(loader.iter_epoch(0))  # evaluation: stored order
  assert [int(b["mask"].sum()) for b in batches] == [5, 5, 5, 5, 3]
  assert [i for b in batches for i in b["index"][b["mask"]]] == list(range(23))
  again = list(loader.iter_epoch(1))  # every epoch of an evaluation loader: same order
  assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in batches]


def test_release_order_is_fixed_and_keeps_the_last_partial_batch(source):
  # The released recipe: DataLoader(shuffle=False, drop_last=False) in training.
  loader = pipeline.Loader(source, 5, SIZE, train=True, seed=4, shuffle=False,
                           drop_remainder=False, num_workers=2)
  assert loader.steps_per_epoch == 5  # ceil(23 / 5), not 23 // 5
  epochs = [list(loader.iter_epoch(e)) for e in (0, 1)]
  for batches in epochs:
    assert [int(b["mask"].sum()) for b in batches] == [5, 5, 5, 5, 3]
    assert [i for b in batches for i in b["index"][b["mask"]]] == list(range(23))
    last = batches[-1]
    assert last["image"].shape == (5, *SIZE, 3)  # padded to the fixed batch shape
    assert not last["image"][~last["mask"]].any() and (last["index"][~last["mask"]] == -1).all()
  # Flips stay random per epoch (the released transforms flip), the order does not move.
  flips = [np.stack([b["image"] for b in batches]) for batches in epochs]
  assert not np.array_equal(flips[0], flips[1])
  # The default still shuffles per epoch.
  shuffled = pipeline.Loader(source, 5, SIZE, train=True, seed=4, num_workers=2)
  assert _indices(shuffled, 0) != _indices(shuffled, 1)


def _from_step(loader, step, count):
  """`count` batches from global step `step` on, as the trainer reads them (epoch, start)."""
  out = []
  while len(out) < count:
    epoch, start = divmod(step, loader.steps_per_epoch)
    for b in loader.iter_epoch(epoch, start):
      out.append(b)
      step += 1
      if len(out) == count:
        break
  return out


def test_resume_mid_epoch_continues_at_the_same_example(source):
  full = pipeline.Loader(source, 2, SIZE, train=True, seed=9, num_workers=2, crop_size=(6, 8))
  reference = _from_step(full, 0, 25)  # crosses 2 epoch ends (11/epoch)
  assert full.steps_per_epoch == 11

  # "Preempted" after 7 steps; a new loader with other workers resumes from the step alone.
  got = _from_step(pipeline.Loader(source, 2, SIZE, train=True, seed=9, num_workers=2,
                                   crop_size=(6, 8)), 0, 7)
  resumed = pipeline.Loader(source, 2, SIZE, train=True, seed=9, num_workers=1,
                            crop_size=(6, 8))
  got += _from_step(resumed, 7, 25 - 7)
  assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in reference]
  for x, y in zip(got, reference):  # the same flips and crop windows too
    np.testing.assert_array_equal(x["image"], y["image"])

  # The remaining examples of the epoch are exactly those not yet seen.
  first = [i for b in reference[:7] for i in b["index"].tolist()]
  rest = _indices(resumed, 0, start=7)
  assert sorted(first + [i for b in rest for i in b]) == sorted(
      full.epoch_order(0)[: 11 * 2].tolist())


def test_decode_error_surfaces_from_a_worker():
  images = [data_fixtures.image_bytes(i) for i in range(4)]
  images[2] = b"garbage bytes"
  src = pipeline.memory_source(images, [0.5] * 4, [f"n{i}.jpg" for i in range(4)])
  loader = pipeline.Loader(src, 4, SIZE, train=False, num_workers=2)
  with pytest.raises(preprocess.ImageDecodeError, match="n2.jpg"):
    list(loader.iter_epoch(0))


def test_process_workers_give_the_same_batches(source):
  threads = pipeline.Loader(source, 4, SIZE, train=True, seed=4, num_workers=2)
  procs = pipeline.Loader(source, 4, SIZE, train=True, seed=4, num_workers=2,
                          worker_type="process")
  pairs = list(zip(threads.iter_epoch(1), procs.iter_epoch(1)))
  assert len(pairs) == threads.steps_per_epoch
  for x, y in pairs:
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["mos"], y["mos"])


# --- folder source ------------------------------------------------------------------------------


def test_folder_source(tmp_path):
  expected = data_fixtures.make_folder(tmp_path, n=10)
  train = pipeline.folder_source(tmp_path, "train")
  test = pipeline.folder_source(tmp_path, "test")
  assert (len(train), len(test)) == (8, 2)
  assert train.scale.source == "train_range"
  for s in (train, test):
    for i in range(len(s)):
      r = s[i]
      assert r["image"] == (tmp_path / "images" / r["name"]).read_bytes()
      assert s.scale.to_mos(r["mos"]) == pytest.approx(expected[r["name"]][0])
  scaled = pipeline.folder_source(tmp_path, None, mos_range=(0, 10))
  assert len(scaled) == 10 and scaled[0]["mos"] == pytest.approx(0.1)
  other = pipeline.folder_source(tmp_path, "test", split_seed=3)
  assert {other[i]["name"] for i in range(2)} != {test[i]["name"] for i in range(2)}


def test_folder_source_errors(tmp_path):
  data_fixtures.make_folder(tmp_path, n=3)
  (tmp_path / "images" / "photo_1.jpg").unlink()
  with pytest.raises(releases.MissingDataError, match="photo_1.jpg"):
    pipeline.folder_source(tmp_path)
  (tmp_path / "labels.csv").write_text("name,mos\nphoto_0.jpg,1\n")
  with pytest.raises(ValueError, match="image_name"):
    pipeline.folder_source(tmp_path)


def test_split_by_group_is_order_independent():
  groups = [f"r{i % 7}" for i in range(35)]
  a = releases.split_by_group(groups, 4)
  b = releases.split_by_group(groups[::-1], 4)[::-1]
  assert a == b
  assert len({g for g, s in zip(groups, a) if s == "train"}) == round(0.8 * 7)
