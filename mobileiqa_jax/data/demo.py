"""The built-in demo data set: real photos, graded distortions, full-reference labels.

Downloads nothing. The pristine content is the colour natural images that ship inside
installed packages (read from the package folders, no network): from scikit-image
(`skimage.data`) astronaut (512x512), chelsea (the cat, 300x451), coffee (400x600), rocket
(427x640), motorcycle (left view of `stereo_motorcycle`, 500x741), ihc (the
immunohistochemistry micrograph, 512x512) and retina (the fundus photograph, its central
997x997 square inside the dark rim); from matplotlib (a project dependency) grace_hopper
(`matplotlib.cbook.get_sample_data('grace_hopper.jpg')`, 600x512).

ihc and retina are training content only, and they are there for the held-out photos'
sake: without them the model, trained on four sharp photos, took smooth content for blur
(the soft-focus cat's pristine patches scored 0.83-0.88 where 1 is pristine, its level-1
blur 0.77-0.82); ihc adds fine natural texture, retina large smooth areas, both pristine.
Measured (teacher demo, seed 1): held-out SROCC 0.778 after 868 steps with them against
0.694 without. (scikit-image's remaining colour images are a telescope field, mostly black,
synthetic charts or need a download; `cat` is chelsea again. Its greyscale photos (camera,
coins, moon, brick, grass, gravel) are left out on purpose: measured, adding them as RGB
made the held-out SROCC collapse to ~0. On a grey source every bit of chroma comes from a
distortion (per-channel noise, JPEG), so the model learns "colour = bad" and scores every
colour test photo low.)

Recipe (all deterministic; no random numbers except the seeded noise):

1. References: native-resolution patches, not whole resized frames. Each photo is
   downscaled (PIL LANCZOS) so its shorter side is S, for several S, and from each an
   n x n grid of `PATCH` x `PATCH` = 64 x 64 patches is cut (evenly spaced, corners
   included): `PATCH_GRID` = (S, n) in (128, 3), (192, 4), (256, 5), (384, 5), 75
   references per training photo; the held-out photos use the first two scales only
   (`TEST_PATCH_GRID`, 25 references per photo), which keeps the per-epoch evaluation
   cheap while its patches come from scales the training set also has. The finer
   scales add content (zoomed-in texture) that whole frames lack: measured, training on
   the first two scales only reached held-out SROCC 0.35. The demo configs
   read them at 64 x 64, so the pipeline never resizes these images and the distortions
   stay at the pixel scale the model sees (a whole 192-px frame squeezed into 64 x 64
   loses most blur, noise and JPEG evidence); they train on random 32 x 32 windows and
   evaluate on the whole patch.
2. Distortions. Each reference gets 6 distortions x 5 graded levels (`DISTORTIONS`):
   gaussian blur (sigma 0.6-4 px), additive gaussian noise (std 3-32 of 255, seeded
   per image), JPEG (quality 60-5, the stored bytes are that JPEG file, so the
   artefacts are real), contrast reduction towards the mean (factor 0.75-0.18),
   colour quantisation (PIL posterize to 5-1 bits per channel), pixelation
   (box-downsample by 2-8, nearest-upsample). Plus the pristine reference itself:
   31 images per reference. All but the JPEG ones are stored as lossless PNG.
3. Labels (`mos`, in [0, 1]): a graded quality per (distortion, level), the same for
   every reference, as in a designed-severity benchmark. Each image's full-reference
   quality against its pristine reference is multi-scale colour SSIM,

       ms_ssim = clip(mean_{s in 1, 1/2} SSIM(ref_s, img_s), 0, 1)

   where `x_s` is `x` box-averaged by `1/s`, and SSIM is scikit-image's
   `structural_similarity` (gaussian window sigma 1.5, data_range 255, RGB channels
   averaged; a coarser scale than 1/2 leaves a 64-px patch too few pixels for an
   11 x 11 window). The label of a (distortion, level) is the mean `ms_ssim` of that
   level over the 450 training references (`level_quality()`); the pristine references
   are 1. The mean puts the six distortions on one scale (a level-3 blur and a level-3
   JPEG are not equally bad), and falls with severity within each distortion. Each
   record keeps its own `ms_ssim` too.

   Why not the per-image `ms_ssim` as the label: it is content-dependent (the same blur
   costs a textured patch more than a flat one), and with few training photos the
   model learned that content (texture = low score) instead of the distortions: it
   scored noisier test patches *higher*. Measured with the same model and 580 steps:
   held-out SROCC 0.44 with the graded label against 0.32 with the per-image one. The
   graded label is also exact for any crop of the image, which the demo's random
   training crops rely on.
4. Split, by source photo so the test content is unseen:
   train = astronaut, rocket, motorcycle, grace_hopper, ihc, retina (450 references,
           13,950 images);
   test  = chelsea, coffee (50 references, 1,550 images).

Records follow the IQA builders' features (`mobileiqa_jax.data.tfds_builder`): `image`
(encoded bytes), `image_name` (`<photo>_p<patch>_<distortion>_<level>.<png|jpg>`),
`mos` (the label, already in [0, 1]), `mos_std` (NaN: no raters), `mos_norm`
(= mos; the scale is the documented [0, 1]), `width`, `height`, `group`
(`<photo>`: the unit the split keeps together); plus `distortion`, `level`
(0 = pristine, 1-5 graded) and `ms_ssim` (the image's own MS-SSIM).

Two ways in:

* `examples(split)` / `source(split)`: built in memory (a few seconds on one
  core, cached per process) — tests and `configs/*:demo`.
* The tfds builder `IqaDemo` (name `iqa_demo`): `prepare(data_dir)` writes the
  same records as a tfds data set (needs TensorFlow to write, as every tfds build).
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageOps
from scipy import ndimage

#: Photo name -> (package, loader or file name, index into the loader's return value, or
#: 'inscribed': the central square inscribed in the circular image).
PHOTOS = {
    'astronaut': ('skimage', 'astronaut', None),
    'chelsea': ('skimage', 'chelsea', None),
    'coffee': ('skimage', 'coffee', None),
    'rocket': ('skimage', 'rocket', None),
    'motorcycle': ('skimage', 'stereo_motorcycle', 0),  # (left, right, disparity): left
    'grace_hopper': ('matplotlib', 'grace_hopper.jpg', None),
    'ihc': ('skimage', 'immunohistochemistry', None),
    'retina': ('skimage', 'retina', 'inscribed'),  # the square inside the fundus's dark rim
}
TRAIN_PHOTOS = ('astronaut', 'rocket', 'motorcycle', 'grace_hopper', 'ihc', 'retina')
TEST_PHOTOS = ('chelsea', 'coffee')
SPLITS = {'train': TRAIN_PHOTOS, 'test': TEST_PHOTOS}

#: Side of the square reference patches (the demo configs' input size).
PATCH = 64
#: (shorter side the photo is downscaled to, n): an n x n grid of patches from each.
PATCH_GRID = ((128, 3), (192, 4), (256, 5), (384, 5))
#: The held-out photos' grid: the first two scales (a cheaper evaluation).
TEST_PATCH_GRID = PATCH_GRID[:2]
PATCHES_PER_PHOTO = sum(n * n for _, n in PATCH_GRID)
TEST_PATCHES_PER_PHOTO = sum(n * n for _, n in TEST_PATCH_GRID)

#: Distortion -> its 5 levels, mildest first (the parameter each function takes).
DISTORTIONS = {
    'blur': (0.6, 1.0, 1.6, 2.5, 4.0),          # gaussian sigma, pixels
    'noise': (3.0, 6.0, 11.0, 19.0, 32.0),      # std on the 0-255 scale
    'jpeg': (60, 35, 20, 10, 5),                # PIL JPEG quality
    'contrast': (0.75, 0.55, 0.4, 0.28, 0.18),  # factor towards the mean
    'quantize': (5, 4, 3, 2, 1),                # bits kept per channel (PIL posterize)
    'pixelate': (2, 3, 4, 6, 8),                # block size, pixels
}
LEVELS = 5
IMAGES_PER_REFERENCE = len(DISTORTIONS) * LEVELS + 1
SSIM_SCALES = (1, 2)


def split_size(split: str) -> int:
  """Number of records in `split`, without building anything (configs size schedules)."""
  if split not in SPLITS:
    raise ValueError(f"demo split must be 'train' or 'test', got {split!r}.")
  per_photo = PATCHES_PER_PHOTO if split == 'train' else TEST_PATCHES_PER_PHOTO
  return len(SPLITS[split]) * per_photo * IMAGES_PER_REFERENCE


def load_photo(name: str) -> np.ndarray:
  """One of `PHOTOS` as a uint8 RGB array, read from the installed package."""
  package, loader, index = PHOTOS[name]
  if package == 'skimage':
    import skimage.data  # pylint: disable=g-import-not-at-top
    image = getattr(skimage.data, loader)()
  else:
    from matplotlib import cbook  # pylint: disable=g-import-not-at-top
    with cbook.get_sample_data(loader) as f:
      image = np.asarray(Image.open(f).convert('RGB'))
  if index == 'inscribed':
    side = int(min(image.shape[:2]) / 2 ** 0.5)
    top, left = ((n - side) // 2 for n in image.shape[:2])
    image = image[top:top + side, left:left + side]
  elif index is not None:
    image = image[index]
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _grid(length: int, n: int) -> list[int]:
  return [round(i * (length - PATCH) / (n - 1)) for i in range(n)] if n > 1 else [
      (length - PATCH) // 2]


def reference_patches(photo: np.ndarray,
                      grid: Sequence[tuple[int, int]] = PATCH_GRID) -> list[np.ndarray]:
  """The `grid` patches of `photo` (uint8 PATCH x PATCH x 3 each), scale by scale."""
  pil = Image.fromarray(photo)
  out = []
  for short, n in grid:
    scale = short / min(pil.size)
    size = (max(PATCH, round(pil.width * scale)), max(PATCH, round(pil.height * scale)))
    small = np.asarray(pil.resize(size, Image.LANCZOS))
    for top in _grid(size[1], n):
      for left in _grid(size[0], n):
        out.append(np.ascontiguousarray(small[top:top + PATCH, left:left + PATCH]))
  return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def distort(image: np.ndarray, distortion: str, level: int,
            seed: int = 0) -> tuple[np.ndarray, bytes, str]:
  """Applies `distortion` at `level` (1-5) to a uint8 RGB image.

  Returns:
    (decoded uint8 RGB result, the encoded file bytes to store, file extension).
    The decoded result is what the label is computed on: for JPEG it is the
    decoded JPEG, so label and stored bytes agree.
  """
  p = DISTORTIONS[distortion][level - 1]
  x = image.astype(np.float64)
  if distortion == 'jpeg':
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='JPEG', quality=p)
    data = buf.getvalue()
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB')), data, 'jpg'
  if distortion == 'blur':
    out = ndimage.gaussian_filter(x, sigma=(p, p, 0), mode='reflect')
  elif distortion == 'noise':
    rng = np.random.default_rng(seed)
    out = x + rng.normal(scale=p, size=x.shape)
  elif distortion == 'contrast':
    out = x.mean() + p * (x - x.mean())
  elif distortion == 'quantize':
    out = np.asarray(ImageOps.posterize(Image.fromarray(image), p))
  elif distortion == 'pixelate':
    pil = Image.fromarray(image)
    small = (max(1, round(pil.width / p)), max(1, round(pil.height / p)))
    out = np.asarray(pil.resize(small, Image.BOX).resize(pil.size, Image.NEAREST))
  else:
    raise ValueError(f'unknown distortion {distortion!r}; one of {list(DISTORTIONS)}.')
  out = _to_uint8(out)
  return out, _png(out), 'png'


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # Lossless at any level; level 1 is several times faster than the default 6.
  Image.fromarray(image).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def _box_downsample(x: np.ndarray, factor: int) -> np.ndarray:
  if factor == 1:
    return x
  h, w = (x.shape[0] // factor) * factor, (x.shape[1] // factor) * factor
  x = x[:h, :w].reshape(h // factor, factor, w // factor, factor, -1)
  return x.mean(axis=(1, 3))


def _blur(x: np.ndarray) -> np.ndarray:
  # skimage's SSIM window: gaussian sigma 1.5 truncated at 3.5 sigma (11 x 11),
  # per channel (sigma 0 on the channel axis); over the last three axes, so a stack of
  # images is blurred image by image in one call.
  sigma = (0.0,) * (x.ndim - 3) + (1.5, 1.5, 0.0)
  return ndimage.gaussian_filter(x, sigma=sigma, truncate=3.5, mode='reflect')


class _Reference:
  """A pristine image's SSIM statistics per scale, computed once for its 31 images."""

  def __init__(self, image: np.ndarray):
    self.scales = []
    for s in SSIM_SCALES:
      r = _box_downsample(image.astype(np.float32), s)
      self.scales.append((r, _blur(r), _blur(r * r)))


def _ssim_maps(x: np.ndarray, y: np.ndarray, data_range: float,
               x_stats: tuple[np.ndarray, np.ndarray] | None) -> list[float]:
  """SSIM of x against each image of the stack y (..., H, W, 3): one mean per image."""
  x, y = x.astype(np.float32), y.astype(np.float32)
  ux, uxx = x_stats if x_stats is not None else (_blur(x), _blur(x * x))
  uy, uyy, uxy = _blur(y), _blur(y * y), _blur(x * y)
  vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
  pad = 5  # skimage averages without the border half-window: (11 - 1) // 2
  s = s.reshape((-1,) + s.shape[-3:])
  return [float(m[pad:-pad, pad:-pad].mean(dtype=np.float64)) for m in s]


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 255.0,
         _x_stats: tuple[np.ndarray, np.ndarray] | None = None) -> float:
  """Colour SSIM, equal (to float32 rounding) to skimage's
  `structural_similarity(x, y, channel_axis=2, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=data_range)`.

  Re-implemented in float32 with the reference's statistics reusable: several
  times faster than skimage per channel, which matters for ~30,000 calls.
  """
  return _ssim_maps(x, y, data_range, _x_stats)[0]


def quality_labels(reference: np.ndarray | _Reference, images: np.ndarray) -> list[float]:
  """`quality_label` of each image of the stack `images` (N, H, W, 3).

  One blur per statistic for the whole stack instead of one per image: the same numbers
  (the filter runs image by image along the same axes), a fraction of the calls.
  """
  if not isinstance(reference, _Reference):
    reference = _Reference(reference)
  imgs = np.asarray(images).astype(np.float32)
  per_scale = [_ssim_maps(r, np.stack([_box_downsample(i, s) for i in imgs]), 255.0, (ur, urr))
               for s, (r, ur, urr) in zip(SSIM_SCALES, reference.scales)]
  return [float(np.clip(np.mean(scores), 0.0, 1.0)) for scores in zip(*per_scale)]


def quality_label(reference: np.ndarray | _Reference, image: np.ndarray) -> float:
  """Multi-scale colour SSIM of `image` against `reference`, clipped to [0, 1]."""
  return quality_labels(reference, np.asarray(image)[None])[0]


def _raw_examples_of_photo(photo_name: str) -> list[tuple[str, int, bytes, str, str, float]]:
  """(distortion, level, stored bytes, ext, stem, MS-SSIM) per record of one photo."""
  out = []
  grid = TEST_PATCH_GRID if photo_name in TEST_PHOTOS else PATCH_GRID
  for c, ref in enumerate(reference_patches(load_photo(photo_name), grid)):
    stem = f'{photo_name}_p{c}'
    out.append(('pristine', 0, _png(ref), 'png', stem, 1.0))
    made, pixels = [], []
    for d_index, distortion in enumerate(DISTORTIONS):
      for level in range(1, LEVELS + 1):
        # A seed per (photo, patch, distortion, level): reproducible noise.
        seed = [list(PHOTOS).index(photo_name), c, d_index, level]
        img, data, ext = distort(ref, distortion, level, seed=seed)
        made.append((distortion, level, data, ext, stem))
        pixels.append(img)
    out += [m + (q,) for m, q in zip(made, quality_labels(ref, np.stack(pixels)))]
  return out


@functools.lru_cache(maxsize=None)
def _raw_cached(photo_name: str) -> tuple[tuple[str, int, bytes, str, str, float], ...]:
  return tuple(_raw_examples_of_photo(photo_name))


@functools.lru_cache(maxsize=None)
def level_quality() -> dict[tuple[str, int], float]:
  """The label of each (distortion, level): mean MS-SSIM over the training references.

  ('pristine', 0) is 1. Built from the training photos (about 10 s on one core, once per
  process), so a held-out label never depends on held-out images.
  """
  scores: dict[tuple[str, int], list[float]] = {}
  for photo in TRAIN_PHOTOS:
    for distortion, level, _, _, _, ms_ssim in _raw_cached(photo):
      scores.setdefault((distortion, level), []).append(ms_ssim)
  table = {k: float(np.mean(v, dtype=np.float64)) for k, v in scores.items()}
  table[('pristine', 0)] = 1.0
  return table


def _records(photo_name: str, raw) -> list[dict[str, Any]]:
  out = []
  quality = level_quality()
  for distortion, level, data, ext, stem, ms_ssim in raw:
    label = quality[(distortion, level)]
    out.append({
        'image': data,
        'image_name': f'{stem}_{distortion}_{level}.{ext}',
        'mos': np.float32(label),
        'mos_std': np.float32(np.nan),
        'mos_norm': np.float32(label),
        'width': np.int32(PATCH),
        'height': np.int32(PATCH),
        'group': photo_name,
        'distortion': distortion,
        'level': np.int32(level),
        'ms_ssim': np.float32(ms_ssim),
    })
  return out


def _examples_of_photo(photo_name: str) -> list[dict[str, Any]]:
  """One photo's records, rebuilt (bypasses the cache of its pixels and MS-SSIMs)."""
  return _records(photo_name, _raw_examples_of_photo(photo_name))


@functools.lru_cache(maxsize=None)
def _examples_cached(photos: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
  return tuple(ex for p in photos for ex in _records(p, _raw_cached(p)))


def examples(split: str | None = None,
             photos: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """The demo records in memory (no tfds), in a fixed order.

  Args:
    split: 'train', 'test', or None for both.
    photos: instead of a split, the photos to use (a subset keeps tests fast).

  Returns:
    A list of dicts with the features listed in the module docstring. Cached
    per process: repeated calls cost nothing (the dicts are shared; do not
    mutate them).
  """
  if photos is None:
    if split is None:
      photos = TRAIN_PHOTOS + TEST_PHOTOS
    elif split in SPLITS:
      photos = SPLITS[split]
    else:
      raise ValueError(f"demo split must be 'train' or 'test', got {split!r}.")
  unknown = set(photos) - set(PHOTOS)
  if unknown:
    raise ValueError(f'unknown demo photo(s) {sorted(unknown)}; one of {list(PHOTOS)}.')
  return list(_examples_cached(tuple(photos)))


def source(split: str):
  """The demo split as a `pipeline.MemorySource` (what `configs/*:demo` train on).

  Its images are the records' files decoded once, here: the loader then skips a PNG or JPEG
  decode per example (the same pixels; a batch of 64 windows costs 17 instead of 41 ms of
  CPU on the 2-core VM, cores the training step needs).
  """
  from mobileiqa_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.data import releases  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  exs = examples(split)
  return pipeline.memory_source(
      [np.asarray(preprocess.decode_rgb(e['image'], e['image_name'])) for e in exs],
      [float(e['mos']) for e in exs],
      [e['image_name'] for e in exs],
      scale=releases.MosScale(low=0.0, high=1.0, source='documented'))


# ------------------------------------------------------------------------------------------
# tfds builder.


def _tfds_builder_class():
  """Defines (once) the tfds builder; tfds is imported only when it is asked for."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

  class IqaDemo(tfds.core.GeneratorBasedBuilder):
    """The built-in demo IQA data set (see `mobileiqa_jax.data.demo`); downloads nothing."""

    VERSION = tfds.core.Version('3.0.0')
    RELEASE_NOTES = {
        '1.0.0': 'skimage photos x 6 distortions x 5 levels, MS-SSIM labels.',
        '2.0.0': '6 photos, 64-px native patches, quantize for desaturation.',
        '3.0.0': 'Graded label per (distortion, level); per-image ms_ssim kept.',
    }

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
          description=__doc__,
          # The IQA builders' features (mos = the SSIM label, mos_std NaN, group = source
          # photo), plus the distortion and its level.
          features=tfds_builder.iqa_features(
              distortion=tfds.features.Text(),
              level=tfds.features.Scalar(np.int32, doc='0 pristine, 1-5 graded.'),
              ms_ssim=tfds.features.Scalar(
                  np.float32, doc='MS-SSIM of this image against its reference.')),
          homepage='https://scikit-image.org/docs/stable/api/skimage.data.html',
          metadata=tfds.core.MetadataDict(),
          # Stored order = generation order: the metadata's per-record groups rely on it.
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      self.info.metadata.update({
          'mos_scale': {'low': 0.0, 'high': 1.0, 'source': 'documented'},
          'split_kind': 'by_source_photo',
          'train_fraction': len(TRAIN_PHOTOS) / len(PHOTOS),
          'groups': {s: [e['group'] for e in examples(s)] for s in SPLITS},
      })
      return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split):
      for e in examples(split):
        yield e['image_name'], dict(e)

  return IqaDemo


_BUILDER_CLASS = None


def builder_class():
  """The tfds builder class `IqaDemo` (registers the name `iqa_demo` with tfds)."""
  global _BUILDER_CLASS
  if _BUILDER_CLASS is None:
    _BUILDER_CLASS = _tfds_builder_class()
  return _BUILDER_CLASS


def prepare(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes the demo data set as tfds records (array_record); a no-op if present.

  Needs TensorFlow (CPU is enough) to write, as every tfds build; reading back
  (`pipeline.tfds_source('iqa_demo', split, data_dir)`) does not.

  Args:
    data_dir: tfds data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    The prepared folder.
  """
  from mobileiqa_jax.data import releases  # pylint: disable=g-import-not-at-top
  data_dir = releases.data_dir(data_dir)
  builder = builder_class()(data_dir=str(data_dir), file_format='array_record')
  builder.download_and_prepare()
  return pathlib.Path(builder.data_dir)
