"""Image decoding and the reference's preprocessing, free of tfds and TensorFlow.

The reference (PyTorch MobileIQA) does, per image::

    img = PIL.Image.open(path).convert('RGB')
    img = img.resize((W, H))                      # PIL bicubic, Image.resize's default
    [RandomHorizontalFlip, RandomVerticalFlip]    # training only
    x = transforms.ToTensor()(img)                # uint8 -> float32 / 255
    x = transforms.Normalize(MEAN, STD)(x)        # (x - mean) / std

This module does exactly that, in float32 and in the same order of operations, so the
values it produces are bit-identical to the reference's for the same decoded pixels. The
training pipeline, evaluation and the scoring command (files on disk) all use it.

The authors' released training code puts a second resize after the first:
`transforms.Resize((512, 512))`, whose default interpolation is bilinear. On a PIL image
torchvision 0.29 calls `img.resize((512, 512), Image.BILINEAR)` (PIL always antialiases;
torchvision's `antialias` argument only matters for tensors), and does nothing when the
image already has that size. `resize_normalize(..., pre_resize_hw=(1231, 1907))` with
`size_hw=(512, 512)` reproduces that path (UHD-IQA: bicubic to 1907x1231, then bilinear to
512x512) with the same PIL calls, so bit-identically; see docs/reproducing.md.
"""

from __future__ import annotations

import io
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

# The size the authors' models were trained at (UHD-IQA, H x W): the default for a state dict,
# which stores no input size.
REFERENCE_IMAGE_SIZE = (1231, 1907)
# The backbone's deepest feature has stride 32: below 32 px a side the network sees less than
# one cell of it and the model is meaningless (and some paths would produce empty windows).
MIN_SIDE = 32


def parse_image_size(value: str | Sequence[Any] | None,
                     setting: str = "--image_size") -> tuple[int, int] | None:
  """'H,W', 'HxW' or (H, W) -> (H, W) of whole numbers >= MIN_SIDE; None / '' -> None.

  The one reader of an image size for every command (predict, convert, export, explain) and
  for `load`. Raises ValueError naming `setting` for anything else (one number, three
  numbers, floats, words, zero, negative or too small sides).
  """
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  hint = (f"{setting} must be HEIGHT,WIDTH: two whole numbers of pixels, each >= {MIN_SIDE} "
          f"(the backbone's deepest stride), e.g. 512,512 or 1231,1907")
  if isinstance(value, str):
    parts = [p.strip() for p in re.split(r"[,x]", value.strip())]
  else:
    try:
      parts = list(value)
    except TypeError:
      raise ValueError(f"{hint}; got {value!r}.") from None
  if len(parts) != 2:
    raise ValueError(f"{hint}; got {value!r} ({len(parts)} value(s)).")
  out = []
  for p in parts:
    if isinstance(p, (bool, np.bool_)):
      raise ValueError(f"{hint}; got {value!r}.")
    if isinstance(p, (int, np.integer)):
      v = int(p)
    elif isinstance(p, (float, np.floating)) and float(p).is_integer():
      v = int(p)
    elif isinstance(p, str) and re.fullmatch(r"[+-]?\d+", p):
      v = int(p)
    else:
      raise ValueError(f"{hint}; got {value!r} ({p!r} is not a whole number).")
    if v < MIN_SIDE:
      what = "not positive" if v <= 0 else f"smaller than {MIN_SIDE}"
      raise ValueError(f"{hint}; got {value!r} ({v} is {what}).")
    out.append(v)
  return out[0], out[1]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The per-pixel map uint8 -> normalised float32 has only 256 values per channel, so it is a
# table look-up. Built with the reference's float32 operations in its order ((v / 255 - mean)
# / std), the table is bit-exact and the look-up is ~2x faster than the arithmetic.
NORMALIZATION_TABLE = (
    (np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0))
    - np.asarray(IMAGENET_MEAN, np.float32)[:, None]
) / np.asarray(IMAGENET_STD, np.float32)[:, None]  # (3, 256) float32


class ImageDecodeError(ValueError):
  """An image file that PIL cannot decode (corrupt, truncated, empty or not an image)."""

  def __init__(self, name: str, reason: str):
    self.name = name
    self.reason = reason
    super().__init__(
        f"Cannot decode image {name!r}: {reason}. Replace the file with a complete copy "
        "from the data set's release (or remove it from the label file)."
    )


def decode_rgb(data: bytes, name: str) -> Image.Image:
  """Decodes encoded image bytes fully and converts to RGB as the reference does.

  Greyscale, palette, CMYK, RGBA and 16-bit images become RGB by PIL's `convert('RGB')`
  (alpha dropped, CMYK inverted by PIL's rule, 16-bit values clipped by PIL's rule) — the
  reference's conversion, so labels keep meaning the same pixels. EXIF orientation is not
  applied, as in the reference.

  Args:
    data: The encoded file contents (JPEG, PNG, BMP, ...).
    name: The image's name or path, used in error messages.

  Returns:
    A fully loaded RGB PIL image.

  Raises:
    ImageDecodeError: The bytes are empty, not an image, truncated or corrupt.
  """
  if not data:
    raise ImageDecodeError(name, "the file is empty (0 bytes)")
  try:
    img = Image.open(io.BytesIO(data))
    # load() forces the full decode: a truncated file fails here, not later in a worker.
    img.load()
  except Image.UnidentifiedImageError:
    raise ImageDecodeError(
        name, f"not a recognised image format (first bytes {data[:8]!r})"
    ) from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(name, f"{type(e).__name__}: {e}") from e
  if img.mode == "RGB":
    return img  # convert('RGB') would only copy.
  try:
    return img.convert("RGB")
  except (OSError, ValueError) as e:
    raise ImageDecodeError(
        name, f"cannot convert mode {img.mode!r} to RGB: {e}"
    ) from e


def resize_normalize(
    img: Image.Image,
    size_hw: tuple[int, int],
    hflip: bool = False,
    vflip: bool = False,
    out: np.ndarray | None = None,
    crop: tuple[int, int, int, int] | None = None,
    pre_resize_hw: tuple[int, int] | None = None,
) -> np.ndarray:
  """Resizes with PIL's bicubic filter and normalises with ImageNet statistics.

  Args:
    img: An RGB PIL image (from `decode_rgb`).
    size_hw: Target (height, width), e.g. (1231, 1907) for UHD-IQA.
    hflip: Flip left-right (training augmentation); applied after the resize, as the
      reference does, on uint8 where it is free.
    vflip: Flip upside-down.
    out: Optional float32 (H, W, 3) array to write into (e.g. a row of a batch), which
      saves a copy of the largest array of the pipeline.
    crop: Optional (top, left, height, width) window cut from the resized image before
      the flips (training augmentation); the result then has that height and width.
    pre_resize_hw: The released training code's two-step resize: bicubic to this
      (height, width) first, then bilinear to `size_hw` (torchvision `Resize` on a PIL
      image). None: one bicubic resize to `size_hw` (the paper's preprocessing).

  Returns:
    float32 array of shape (H, W, 3) (or the crop's): (pixel / 255 - mean) / std.
  """
  h, w = size_hw
  if img.mode != "RGB":
    raise ValueError(f"resize_normalize expects an RGB image, got mode {img.mode!r}.")
  if pre_resize_hw is not None:
    ph, pw = (int(v) for v in pre_resize_hw)
    if img.size != (pw, ph):
      img = img.resize((pw, ph), Image.Resampling.BICUBIC)
    if img.size != (w, h):  # torchvision Resize on PIL: a no-op at the same size
      img = img.resize((w, h), Image.Resampling.BILINEAR)
  elif img.size != (w, h):
    # Image.resize's default filter for RGB images is BICUBIC (the reference's).
    img = img.resize((w, h), Image.Resampling.BICUBIC)
  a = _crop_flip(np.asarray(img), crop, hflip, vflip)
  out = _check_out(out, a.shape)
  for c in range(3):
    np.take(NORMALIZATION_TABLE[c], a[..., c], out=out[..., c], mode="clip")  # uint8 never clips
  return out


def resize_uint8(img: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
  """`resize_normalize`'s resize alone: PIL bicubic to (height, width), uint8 (H, W, 3).

  For a scorer that normalises on the device (`device_resize.normalize_levels`, bit-exact
  with `resize_normalize`): a quarter of the bytes to move, and no per-pixel work left on
  the host's threads (the table look-up costs ~0.1 s per photo at 1231x1907 on one core).
  """
  h, w = size_hw
  if img.mode != "RGB":
    raise ValueError(f"resize_uint8 expects an RGB image, got mode {img.mode!r}.")
  if img.size != (w, h):
    img = img.resize((w, h), Image.Resampling.BICUBIC)
  return np.asarray(img)


def augment_array(
    image: np.ndarray,
    hflip: bool = False,
    vflip: bool = False,
    out: np.ndarray | None = None,
    crop: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
  """The crop and flips of `resize_normalize` on an image that is already normalised."""
  a = _crop_flip(np.asarray(image, np.float32), crop, hflip, vflip)
  out = _check_out(out, a.shape)
  out[...] = a
  return out


def _crop_flip(a: np.ndarray, crop, hflip: bool, vflip: bool) -> np.ndarray:
  h, w = a.shape[:2]
  if crop is not None:
    top, left, ch, cw = crop
    if not (0 <= top and top + ch <= h and 0 <= left and left + cw <= w):
      raise ValueError(f"crop {crop} does not fit in the {h}x{w} image.")
    a = a[top:top + ch, left:left + cw]
  if hflip:
    a = a[:, ::-1]
  if vflip:
    a = a[::-1]
  return a


def _check_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
  if out is None:
    return np.empty(shape, np.float32)
  if out.shape != shape or out.dtype != np.float32:
    raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}.")
  return out
