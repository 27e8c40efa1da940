"""Tests for the built-in demo data set (mobileiqa_jax.data.demo).

Fast tests use one source photo (775 images, a few seconds); the whole set and
the tfds build are marked slow.
"""

import collections
import io

import numpy as np
import pytest
from PIL import Image

from mobileiqa_jax.data import demo

_PHOTO = 'chelsea'
_PER_PHOTO = demo.TEST_PATCHES_PER_PHOTO * (len(demo.DISTORTIONS) * demo.LEVELS + 1)
_PER_TRAIN_PHOTO = demo.PATCHES_PER_PHOTO * (len(demo.DISTORTIONS) * demo.LEVELS + 1)


@pytest.fixture(scope='module')
def photo_examples():
  return demo.examples(photos=(_PHOTO,))


def test_split_is_by_photo_and_covers_all():
  assert set(demo.TRAIN_PHOTOS).isdisjoint(demo.TEST_PHOTOS)
  assert set(demo.TRAIN_PHOTOS) | set(demo.TEST_PHOTOS) == set(demo.PHOTOS)
  assert _PER_PHOTO == 25 * 31 == 775
  assert _PER_TRAIN_PHOTO == 75 * 31
  assert demo.split_size('train') == 6 * _PER_TRAIN_PHOTO
  assert demo.split_size('test') == 2 * _PER_PHOTO
  with pytest.raises(ValueError, match="'train' or 'test'"):
    demo.examples('validation')
  with pytest.raises(ValueError, match='unknown demo photo'):
    demo.examples(photos=('lena',))


def test_the_retinas_square_leaves_its_dark_rim_out():
  # Every retina reference is fundus, none the black outside it (a black patch stays
  # black under blur, contrast and pixelation, whatever its label says).
  patches = demo.reference_patches(demo.load_photo('retina'))
  assert len(patches) == demo.PATCHES_PER_PHOTO
  dark = [np.mean(p.max(axis=-1) < 20) for p in patches]
  assert max(dark) < 0.05, max(dark)


def test_photos_load_offline_as_rgb():
  for name in demo.PHOTOS:
    image = demo.load_photo(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 300
  assert demo.load_photo('grace_hopper').shape == (600, 512, 3)  # from matplotlib


def test_patches_are_native_resolution_crops():
  photo = demo.load_photo('coffee')
  patches = demo.reference_patches(photo)
  assert len(patches) == demo.PATCHES_PER_PHOTO == 75
  held_out = demo.reference_patches(photo, demo.TEST_PATCH_GRID)  # the first two scales
  assert len(held_out) == demo.TEST_PATCHES_PER_PHOTO == 25
  assert all(np.array_equal(a, b) for a, b in zip(held_out, patches))
  assert all(p.shape == (demo.PATCH, demo.PATCH, 3) and p.dtype == np.uint8 for p in patches)
  # The first patch is the top-left corner of the photo downscaled to 128 px high.
  small = np.asarray(Image.fromarray(photo).resize((192, 128), Image.LANCZOS))
  np.testing.assert_array_equal(patches[0], small[:demo.PATCH, :demo.PATCH])
  assert len({p.tobytes() for p in patches}) == len(patches)


def test_records(photo_examples):
  exs = photo_examples
  assert len(exs) == _PER_PHOTO
  names = [e['image_name'] for e in exs]
  assert len(set(names)) == len(names)
  assert {e['group'] for e in exs} == {_PHOTO}
  for e in exs:
    assert 0.0 <= e['mos'] <= 1.0
    assert e['mos'] == e['mos_norm'] and np.isnan(e['mos_std'])
    is_jpeg = e['distortion'] == 'jpeg'
    assert e['image'][:2] == b'\xff\xd8' if is_jpeg else e['image'][:8] == b'\x89PNG\r\n\x1a\n'
    assert e['image_name'].endswith('.jpg' if is_jpeg else '.png')
    assert (e['mos'] == 1.0) == (e['level'] == 0)
    assert 0.0 <= e['ms_ssim'] <= 1.0
  img = Image.open(io.BytesIO(exs[0]['image']))
  assert img.mode == 'RGB' and img.size == (exs[0]['width'], exs[0]['height'])
  assert img.size == (demo.PATCH, demo.PATCH)


def test_labels_fall_with_severity(photo_examples):
  by_level = collections.defaultdict(list)
  for e in photo_examples:
    by_level[(e['distortion'], int(e['level']))].append(float(e['ms_ssim']))
  for distortion in demo.DISTORTIONS:
    means = [np.mean(by_level[(distortion, lv)]) for lv in range(1, demo.LEVELS + 1)]
    assert np.all(np.diff(means) < 0), (distortion, means)
    graded = [demo.level_quality()[(distortion, lv)] for lv in range(1, demo.LEVELS + 1)]
    assert np.all(np.diff(graded) < 0) and graded[0] < 1.0, (distortion, graded)
  # Graded: the set spans a useful range, not a cluster near 1.
  labels = [float(e['mos']) for e in photo_examples]
  assert min(labels) < 0.6 and np.std(labels) > 0.1


def test_label_is_the_level_mean_of_training_ms_ssim(photo_examples):
  # The label of a held-out image is its (distortion, level)'s mean MS-SSIM over the
  # training references, recomputed here from the stored training images.
  train = [e for e in demo.examples('train') if e['distortion'] == 'noise' and e['level'] == 4]
  assert len(train) == demo.PATCHES_PER_PHOTO * len(demo.TRAIN_PHOTOS)
  want = np.mean([float(e['ms_ssim']) for e in train])
  held_out = [e for e in photo_examples if e['distortion'] == 'noise' and e['level'] == 4]
  assert len({float(e['mos']) for e in held_out}) == 1
  assert float(held_out[0]['mos']) == pytest.approx(want, abs=1e-6)
  # ... and differs from the held-out images' own MS-SSIM, which is content-dependent.
  assert np.std([float(e['ms_ssim']) for e in held_out]) > 0.01


def test_ms_ssim_is_of_the_stored_image(photo_examples):
  e = next(e for e in photo_examples if e['image_name'] == f'{_PHOTO}_p7_blur_3.png')
  ref = demo.reference_patches(demo.load_photo(_PHOTO), demo.TEST_PATCH_GRID)[7]
  img = np.asarray(Image.open(io.BytesIO(e['image'])))
  assert float(e['ms_ssim']) == pytest.approx(demo.quality_label(ref, img), abs=1e-6)


def test_deterministic(photo_examples):
  again = demo._examples_of_photo(_PHOTO)  # bypasses the cache
  assert len(again) == len(photo_examples)
  for a, b in zip(again, photo_examples):
    assert a['image_name'] == b['image_name']
    assert a['image'] == b['image']
    assert a['mos'] == b['mos'] and a['ms_ssim'] == b['ms_ssim']


def test_ssim_matches_skimage():
  from skimage.metrics import structural_similarity
  ref = demo.reference_patches(demo.load_photo('coffee'))[1]
  img, _, _ = demo.distort(ref, 'noise', 3, seed=0)
  want = structural_similarity(
      ref.astype(float), img.astype(float), channel_axis=2, gaussian_weights=True,
      sigma=1.5, use_sample_covariance=False, data_range=255.0)
  assert demo.ssim(ref, img) == pytest.approx(want, abs=1e-5)
  assert demo.ssim(ref, ref) == pytest.approx(1.0)


def test_jpeg_label_is_of_the_stored_bytes():
  ref = demo.reference_patches(demo.load_photo('rocket'))[0]
  decoded, data, ext = demo.distort(ref, 'jpeg', 5)
  assert ext == 'jpg'
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), decoded)
  assert demo.quality_label(ref, decoded) < demo.quality_label(
      ref, demo.distort(ref, 'jpeg', 1)[0])


@pytest.mark.slow
def test_full_set_and_source():
  train, test = demo.examples('train'), demo.examples('test')
  assert len(train) == len(demo.TRAIN_PHOTOS) * _PER_TRAIN_PHOTO == demo.split_size('train') == 13950
  assert len(test) == len(demo.TEST_PHOTOS) * _PER_PHOTO == demo.split_size('test') == 1550
  assert {e['group'] for e in train}.isdisjoint({e['group'] for e in test})
  source = demo.source('test')
  assert len(source) == 1550
  r = source[5]
  # The source holds the records' files decoded (the loader then decodes nothing).
  np.testing.assert_array_equal(r['image'], np.asarray(Image.open(io.BytesIO(test[5]['image']))))
  assert r['mos'] == pytest.approx(test[5]['mos'])
  assert source.scale.low == 0.0 and source.scale.high == 1.0


@pytest.mark.slow
def test_tfds_build_matches_memory(tmp_path):
  pytest.importorskip('tensorflow')
  from mobileiqa_jax.data import pipeline
  demo.prepare(tmp_path)
  source = pipeline.tfds_source('iqa_demo', 'test', tmp_path)
  test = demo.examples('test')
  assert len(source) == len(test)
  for i in (0, 17, len(test) - 1):
    assert source[i]['image'] == test[i]['image']
    assert source[i]['name'] == test[i]['image_name']
    assert source[i]['mos'] == pytest.approx(float(test[i]['mos']))
  assert source.metadata['groups']['train'][0] == demo.TRAIN_PHOTOS[0]
