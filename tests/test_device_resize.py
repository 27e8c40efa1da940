"""Device-side preprocessing (`data/device_resize`) and `Scorer.quality_fn` against the PIL path.

Photos: LIVE Challenge JPEGs (500x500) from ../shared/data/livec_jpg. Downscale and upscale are
checked against PIL's own `Image.resize(BICUBIC)` in grey levels; the scores of the device
path and of `quality_fn` against `score()` (PIL) on a small random student.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import data_fixtures
from mobileiqa_jax.scoring import scorer
from mobileiqa_jax.data import device_resize
from mobileiqa_jax.models import mobileiqa
from mobileiqa_jax.models import runtime
from support import SMALLEST, random_variables

PHOTOS = [os.path.join(data_fixtures.LIVEC_IMAGES, f"{n}.JPG") for n in (1000, 1001)]
SIZE = (64, 64)
# Documented in docs/scoring.md: the device resize is within 2 grey levels of PIL on at most
# 0.05% of pixels (measured: max 1-2 on 0.01-0.02%).
MAX_LEVELS, MAX_FRACTION = 2, 5e-4


def _photo(path):
  return Image.open(path).convert("RGB")


@pytest.mark.parametrize("size_hw", [(300, 200), (64, 96), (700, 620)])
def test_device_resize_matches_pil_down_and_up(size_hw):
  for path in PHOTOS:
    img = _photo(path)
    ref = np.asarray(img.resize(size_hw[::-1], Image.Resampling.BICUBIC)).astype(np.int32)
    out = np.asarray(device_resize.resize_bicubic(np.asarray(img)[None], size_hw,
                                                  round_uint8=True))[0]
    diff = np.abs(out.astype(np.int32) - ref)
    assert diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_FRACTION, (path, size_hw)


def test_normalising_on_the_device_is_the_host_table_bit_for_bit():
  # The host path resizes with PIL and normalises inside the jitted scorer (its resize a
  # no-op at the same size): every uint8 value of every channel must give the host's float32.
  from mobileiqa_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pixels = np.stack([rng.permutation(256).astype(np.uint8) for _ in range(3)], -1)[None]
  want = preprocess.resize_normalize(Image.fromarray(pixels), (1, 256))
  assert np.array_equal(preprocess.resize_uint8(Image.fromarray(pixels), (1, 256)), pixels)
  got = jax.jit(lambda x: device_resize.resize_normalize(x, (1, 256)))(pixels[None])
  np.testing.assert_array_equal(np.asarray(got)[0], want)


def test_weights_are_pils_on_a_known_case():
  # 4 -> 2 (scale 2): PIL's support is 2 * 2 = 4, output 0's centre 1.0, its window
  # [trunc(1 - 4 + .5) clipped to 0, min(trunc(1 + 4 + .5), 4)) = [0, 4); 2 -> 4 (upscale):
  # support 2, output 0's centre 0.25, window [0, 2).
  w = np.asarray(device_resize.pil_bicubic_weights(4, 2))
  k = lambda x: (lambda a: np.where(a < 1, 1.5 * a**3 - 2.5 * a**2 + 1,
                                    np.where(a < 2, -0.5 * (a**3 - 5 * a**2 + 8 * a - 4), 0)))(
                                        np.abs(x))
  expect0 = k((np.arange(4) - 1.0 + 0.5) / 2)
  np.testing.assert_allclose(w[0], expect0 / expect0.sum(), rtol=1e-6)
  np.testing.assert_allclose(w.sum(1), 1, rtol=1e-6)
  up = np.asarray(device_resize.pil_bicubic_weights(2, 4))
  expect_up = k(np.arange(2) - 0.25 + 0.5)
  np.testing.assert_allclose(up[0], expect_up / expect_up.sum(), rtol=1e-6)


@pytest.mark.slow
def test_device_resize_4k_to_uhd_matches_pil():
  # A 4K input from a real photo: LIVE's 500x500 upsampled by PIL to 3840x2160.
  img = _photo(PHOTOS[0]).resize((3840, 2160), Image.Resampling.BICUBIC)
  ref = np.asarray(img.resize((1907, 1231), Image.Resampling.BICUBIC)).astype(np.int32)
  out = np.asarray(jax.jit(lambda x: device_resize.resize_bicubic(x, (1231, 1907), True))(
      np.asarray(img)[None]))[0]
  diff = np.abs(out.astype(np.int32) - ref)
  assert diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_FRACTION


@pytest.fixture(scope="module")
def scorers():
  # The smallest student (support.SMALLEST's backbone): what is checked here is the
  # preprocessing around the model, and the full MobileNetV3-large compiles several times longer.
  config = mobileiqa.model_config("student", pooled_size=8, width=32,
                                  backbone="mobilenetv3_small_050",
                                  backbone_kwargs=SMALLEST["model.backbone_kwargs"])
  model = mobileiqa.build_model(config, runtime.Runtime(depthwise_impl="conv"))
  variables = random_variables(model)
  host = scorer.Scorer(model, variables, SIZE, config.to_dict())
  device = scorer.Scorer(model, variables, SIZE, config.to_dict(), preprocessing="device")
  return host, device


def test_device_preprocessing_scores_like_pil_and_groups_sizes(scorers):
  host, device = scorers
  # Two sizes in one call: 500x500 photos and a 320x400 crop of one (grouped, order kept).
  crop = np.asarray(_photo(PHOTOS[0]))[:320, :400].copy()
  items = PHOTOS + [crop]
  h, d = host.score(items), device.score(items)
  np.testing.assert_allclose(d, h, atol=1e-4)  # docs/scoring.md
  assert np.ptp(h) > 1e-3  # distinct photos score distinctly: the order check can fail
  with pytest.raises(ValueError, match="preprocessing"):
    scorer.Scorer(host.model, host.variables, SIZE, host.model_config, preprocessing="gpu")


@pytest.mark.slow  # compiles a gradient through the model (~20 CPU s)
def test_quality_fn_jits_differentiates_and_agrees_with_score(scorers):
  host, _ = scorers
  quality = host.quality_fn()
  f = jax.jit(quality)
  x = jnp.asarray(np.stack([np.asarray(_photo(p).resize((96, 80))) for p in PHOTOS]),
                  jnp.float32) / 255
  uint8 = np.asarray(np.round(np.asarray(x) * 255), np.uint8)
  np.testing.assert_allclose(np.asarray(f(x)), host.score(uint8), atol=1e-3)
  loss = lambda y: quality(y).sum()
  g = jax.jit(jax.grad(loss))(x)
  assert g.shape == x.shape and np.isfinite(np.asarray(g)).all()
  v = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)
  v = v / jnp.linalg.norm(v)
  eps = 1e-2
  fd = (f(x + eps * v).sum() - f(x - eps * v).sum()) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=0.05, atol=1e-4)
  # The variables-as-argument form gives the same scores.
  f2 = jax.jit(host.quality_fn(pass_variables=True))
  np.testing.assert_allclose(np.asarray(f2(host.variables, x)), np.asarray(f(x)), atol=1e-6)


def test_predict_cli_preprocessing_device_scores_and_skips_a_bad_file(scorers, tmp_path):
  from mobileiqa_jax.weights import checkpoint  # pylint: disable=import-outside-toplevel
  from support import run_launcher  # pylint: disable=import-outside-toplevel
  host, _ = scorers
  ckpt = checkpoint.save_model(str(tmp_path / "ckpt"), host.variables, host.model_config,
                               extra={"image_size": list(SIZE)})
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(open(PHOTOS[0], "rb").read()[:200])
  proc = run_launcher("launch/predict.py", [f"--checkpoint={ckpt}", "--preprocessing=device",
                                            "--noprogress", *PHOTOS, str(bad)])
  assert proc.returncode == 1, proc.stderr[-3000:]
  rows = [r.split(",") for r in proc.stdout.strip().splitlines()[1:]]
  assert [r[0] for r in rows] == PHOTOS
  np.testing.assert_allclose([float(r[1]) for r in rows], host.score(PHOTOS), atol=1e-4)
  assert f"{bad} cannot be scored" in proc.stderr
