"""Scoring photos with MobileIQA: `load(path)` -> a `Scorer`, the reference preprocessing.

    import mobileiqa_jax
    scorer = mobileiqa_jax.load("ckpt/student")        # or a workdir, or the authors' .pkl
    scores = scorer.score(["a.jpg", "b.png"])           # float32 (2,), higher = better
    mos = scorer.to_mos(scores)                         # the training data's scale, if stored

Images are decoded and resized on CPU threads (PIL releases the GIL), batched to a fixed shape
so the model compiles once per shape, and scored in input order. The command line
(`launch/predict.py`, `predict_csv`) goes through the same `Scorer`; there a file that cannot
be read is reported and skipped and the rest are still scored.

Nothing here imports jax at module level: `import mobileiqa_jax` and the launchers' flag
parsing stay fast.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from mobileiqa_jax.data import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given, in order; folders recursed, their image files sorted.

  Inside a folder only files with an image extension (case-insensitive: IMAGE_EXTENSIONS) are
  taken, so label files and READMEs beside the photos are not reported as bad images. A file
  named explicitly is always taken. A path that does not exist, or a folder without image
  files, raises FileNotFoundError naming it. A bucket prefix (`gs://bucket/photos/`) is a
  folder: every image object under it, sorted.
  """
  from mobileiqa_jax import storage  # pylint: disable=g-import-not-at-top
  out = []
  for path in paths:
    if storage.is_bucket(path):
      storage.check_bucket(path)
      if storage.isdir(path):
        found = [f for f in storage.walk_files(path) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
          raise FileNotFoundError(f"{path} holds no image files (looked for "
                                  f"{', '.join(IMAGE_EXTENSIONS)}, under that prefix).")
        out += found
      elif storage.isfile(path):
        out.append(path)
      else:
        raise FileNotFoundError(f"{path} does not exist (expected an image object or a "
                                f"prefix holding images).")
      continue
    if os.path.isdir(path):
      found = []
      for root, _, files in os.walk(path):
        found += [os.path.join(root, f) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
      if not found:
        raise FileNotFoundError(f"{path} holds no image files (looked for "
                                f"{', '.join(IMAGE_EXTENSIONS)}, in subfolders too).")
      out += sorted(found)
    elif os.path.exists(path):
      out.append(path)
    else:
      raise FileNotFoundError(f"{path} does not exist (expected an image file or a folder).")
  return out


def apply_for_scoring(model: Any, variables: Any, images: Any,
                      views_per_photo: bool = False) -> Any:
  """`model.apply(variables, images, train=False)`: scores (B,) of normalised images.

  With `views_per_photo`, the backbone and LDAs run one photo at a time (`lax.map`) and the
  MALs on the whole batch: the same numbers (inference mode: nothing couples the photos
  before the MALs), less memory (`default_views_per_photo`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if not views_per_photo or images.shape[0] == 1:
    return model.apply(variables, images, train=False)
  x = jax.lax.map(lambda image: model.apply(variables, image[None], method="views")[:, 0],
                  images)  # (B, V, S, S, C)
  _, fused = model.apply(variables, jnp.moveaxis(x, 0, 1), method="opinions")
  return model.apply(variables, fused, method="regress")


class Programs:
  """Where scoring gets its compiled programs and the shapes of the variables it converts.

  This default builds both in the process: `jax.jit` traces and compiles the scoring
  function, and a state dict's conversion traces the model for its variables' shapes. The
  scoring commands pass `commands.program_cache.ProgramCache` instead, which keeps both on
  disk so that a second process does neither.
  """

  def variables_template(self, config: Mapping[str, Any], build: Callable[[], Any]) -> Any:
    """The variables' shapes of the model of architecture `config`; `build` computes them."""
    del config
    return build()

  def jit(self, fn: Callable[[Any, Any], Any],
          description: Mapping[str, Any]) -> Callable[[Any, Any], Any]:
    """`jax.jit(fn)` for `fn(variables, x)`; `description` says what decides its program."""
    del description
    import jax  # pylint: disable=g-import-not-at-top
    return jax.jit(fn)


def make_scorer(model: Any, variables: Any, views_per_photo: bool = False,
                resize_to: tuple[int, int] | None = None,
                programs: Programs | None = None) -> Callable[[np.ndarray], np.ndarray]:
  """A jitted function: a batch of images -> scores (B,), in inference mode.

  Without `resize_to` the batch is normalised NHWC float32. With it, uint8 (B, H, W, 3) at
  the photos' own size, resized to `resize_to` (PIL's bicubic, `device_resize`) and
  normalised inside; it compiles once per input shape, so callers group photos by size.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.data import device_resize  # pylint: disable=g-import-not-at-top

  def prepare(images):
    return images if resize_to is None else device_resize.resize_normalize(images, resize_to)

  # Variables are an argument, not closed over: closed-over arrays become constants baked
  # into the compiled program (hundreds of MB for the head). The module's repr lists every
  # field of what it is and how it runs: with the shapes it decides the traced program.
  score = (programs or Programs()).jit(
      lambda v, images: apply_for_scoring(model, v, prepare(images), views_per_photo),
      {"module": repr(model), "function": "make_scorer", "views_per_photo": views_per_photo,
       "resize_to": None if resize_to is None else list(resize_to)})
  variables = jax.device_put(variables)
  return lambda images: np.asarray(score(variables, jnp.asarray(images)))


@dataclasses.dataclass
class Result:
  """One input's outcome: a score, or the reason it could not be scored."""

  path: str
  score: float | None = None
  error: str | None = None


class UnreadableImageError(ValueError):
  """An image given for scoring that cannot be read or decoded."""


def read_image(path: str) -> Image.Image:
  """Reads an image file as RGB the reference's way; `UnreadableImageError` names a bad file."""
  from mobileiqa_jax import storage  # pylint: disable=g-import-not-at-top
  try:
    if storage.is_bucket(path):
      data = storage.read_bytes(path)
    else:
      with open(path, "rb") as f:
        data = f.read()
    return preprocess.decode_rgb(data, path)
  except preprocess.ImageDecodeError as e:
    # The decoder's own advice is about data-set records; here the user scores a file.
    raise UnreadableImageError(f"{path} cannot be scored: it is not a readable image "
                               f"({e.reason}).") from None
  except OSError as e:
    raise UnreadableImageError(f"{path} cannot be scored: {e.strerror or e}.") from None


def _as_pil(item: Any, index: int) -> Image.Image:
  """One input (path, PIL image or (H, W, 3) uint8 array) -> an RGB PIL image."""
  if isinstance(item, (str, os.PathLike)):
    return read_image(os.fspath(item))
  if isinstance(item, Image.Image):
    # The reference converts every decoded image with convert('RGB').
    return item if item.mode == "RGB" else item.convert("RGB")
  if isinstance(item, np.ndarray):
    if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
      raise ValueError(f"image {index}: an array must be (H, W, 3) uint8 RGB, got "
                       f"{item.dtype} {item.shape}.")
    return Image.fromarray(item, "RGB")
  raise TypeError(f"image {index}: expected a path, a PIL image or a uint8 array, got "
                  f"{type(item).__name__}.")


def photo_pixels(item: Any, index: int, size_hw: tuple[int, int] | None = None,
                 normalise: bool = False) -> np.ndarray:
  """One input as the scorer takes it: uint8 (H, W, 3) at its own size (`size_hw` None),
  resized to `size_hw` the reference's way, or resized and normalised (float32).
  """
  photo = _as_pil(item, index)
  if size_hw is None:
    return np.asarray(photo)
  if normalise:
    return preprocess.resize_normalize(photo, size_hw)
  return preprocess.resize_uint8(photo, size_hw)


PREPROCESSING = ("host", "device")
# `jax.default_backend()` names of the platforms that want big batches and device preprocessing.
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def default_preprocessing(platform: str) -> str:
  """'device' (resize inside the jitted function) on gpu/tpu, 'host' (PIL, exact) elsewhere.

  On an accelerator PIL's ~5 photos/s per core at 4K bounds throughput; the device resize
  differs from PIL by at most a grey level or two on ~0.02% of pixels (docs/scoring.md).
  """
  return "device" if platform in _ACCELERATORS else "host"


def default_views_per_photo(platform: str) -> bool:
  """Whether scoring runs the backbone and LDAs one photo at a time: on CPU, yes.

  On CPU the views (`MobileIQA.views`: everything that grows with the input size) cost the
  same per photo at any batch while their temporaries grow with it, and the MALs gain from
  the batch (their big weights are read once per call). Mapping the views over the photos
  and running the MALs on the whole batch is, for the teacher at 512x512 and batch 2 on a
  2-core CPU, 4% faster with 46% of XLA's temporaries (0.208 against 0.384 GB); the student
  is as fast with 70%. An accelerator wants the batch everywhere.
  """
  return platform not in _ACCELERATORS


def default_batch_size(platform: str) -> int:
  """Images per forward pass when the caller gives none: 8 on gpu/tpu, 2 on CPU.

  An accelerator needs the batch to fill its cores. On CPU two photos per call beat one and
  eight (docs/scoring.md): the MALs read their big matrices once per call, while more photos
  per call only add XLA temporaries. With the views one photo at a time
  (`default_views_per_photo`) the second photo costs little memory even for the teacher at
  1231x1907 (2-core CPU: batch 2 at 4.2 s/photo and 2.9 GB peak RSS against 4.5 s/photo and
  2.7 GB at batch 1).

  Args:
    platform: 'cpu', 'gpu' ('cuda', 'rocm') or 'tpu'.
  """
  return 8 if platform in _ACCELERATORS else 2


def score_in_batches(items: Sequence[Any], scorer: Callable[[np.ndarray], np.ndarray],
                     pixels: Callable[[Any, int], np.ndarray], batch_size: int,
                     num_workers: int | None = None,
                     progress: Callable[[int], None] | None = None,
                     names: Sequence[str] | None = None) -> Iterator[Result]:
  """Scores `items` in order, `batch_size` at a time; one `Result` per item.

  `pixels(item, index)` (e.g. `photo_pixels`) runs on `num_workers` threads (PIL releases
  the GIL), one batch ahead of the scorer, so at most two batches of decoded photos are held
  whatever the number of items. Within each window of `batch_size` items, photos of one
  shape make one batch padded to `batch_size`: the scorer compiles once per photo shape (one,
  when `pixels` resizes). An item that cannot be read (`UnreadableImageError`) gives a
  `Result` with `error` set; the others are still scored.
  """
  items = list(items)
  names = names or [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"image {i}"
                    for i, x in enumerate(items)]
  num_workers = num_workers or min(8, os.cpu_count() or 1)
  chunks = [range(i, min(i + batch_size, len(items))) for i in range(0, len(items), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    submit = lambda chunk: [pool.submit(pixels, items[i], i) for i in chunk]
    pending = submit(chunks[0]) if chunks else []
    for c, chunk in enumerate(chunks):
      futures = pending
      pending = submit(chunks[c + 1]) if c + 1 < len(chunks) else []
      results, groups = [], {}
      for i, fut in zip(chunk, futures):
        try:
          image = fut.result()
          groups.setdefault((image.shape, image.dtype), []).append((len(results), image))
          results.append(Result(names[i]))
        except UnreadableImageError as e:
          results.append(Result(names[i], error=str(e)))
      for (shape, dtype), members in groups.items():
        batch = np.zeros((batch_size, *shape), dtype)
        batch[: len(members)] = np.stack([m[1] for m in members])
        for (r, _), score in zip(members, scorer(batch)[: len(members)].tolist()):
          results[r].score = score
      if progress:
        progress(len(chunk))
      yield from results


class Scorer:
  """A MobileIQA model ready to score photos (what `load` returns).

  Example (after the README's demo run, which writes runs/student_demo):

      import mobileiqa_jax
      scorer = mobileiqa_jax.load("runs/student_demo")          # its best checkpoint, 64x64
      scores = scorer.score(["photo1.jpg", "photo2.png"])       # np.float32, shape (2,)
      print(scorer.score_min, scorer.score_max)                 # 0.0 1.0 for the student
      print(scorer.to_mos(scores))                              # on the training data's scale

  Attributes:
    image_size: (height, width) every image is resized to (PIL bicubic, as the reference).
    model_config: the architecture (`MobileIQAConfig.to_dict()`); how it runs is the model's
      `runtime.Runtime`, chosen by `load`.
    score_min, score_max: the range scores are on: (0, 1) for a model with a final sigmoid
      (the student) and for one trained on MOS normalised to [0, 1] (the teacher, then
      nominal: without a sigmoid it can step slightly outside); None where unknown (the
      authors' teacher). Higher is better.
    higher_is_better: always True.
    mos_range: (lo, hi) of the MOS the model was trained on (`to_mos`), or None.
    source: the checkpoint that was loaded.
    batch_size: images per forward pass.
    preprocessing: 'host' (PIL decode and resize on CPU threads, the reference exactly) or
      'device' (PIL decode on threads to uint8 at the photo's size; PIL's bicubic resize and
      the normalisation inside the jitted function, photos grouped by size; docs/scoring.md
      gives how close it is).
    views_per_photo: run the backbone and LDAs one photo at a time and the MALs on the
      batch (`apply_for_scoring`); default `default_views_per_photo` of this process's
      backend (on CPU).
  """

  higher_is_better = True

  def __init__(self, model: Any, variables: Any, image_size: Sequence[int],
               model_config: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
               source: str | None = None, batch_size: int | None = None,
               num_workers: int | None = None, preprocessing: str = "host",
               views_per_photo: bool | None = None, programs: Programs | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    self.image_size = preprocess.parse_image_size(image_size, "image_size")
    self.model_config = dict(model_config)
    if batch_size is None:
      batch_size = default_batch_size(jax.default_backend())
    if views_per_photo is None:
      views_per_photo = default_views_per_photo(jax.default_backend())
    self.views_per_photo = bool(views_per_photo)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if preprocessing not in PREPROCESSING:
      raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSING)}, got "
                       f"{preprocessing!r}.")
    self.preprocessing = preprocessing
    self.model = model
    self.variables = variables
    self.extra = dict(extra or {})
    self.source = source
    self.batch_size = int(batch_size)
    self.num_workers = num_workers
    mos_range = self.extra.get("mos_range")
    self.mos_range = tuple(float(v) for v in mos_range) if mos_range else None
    if self.model_config.get("sigmoid") or self.mos_range is not None:
      self.score_min, self.score_max = 0.0, 1.0
    else:
      self.score_min = self.score_max = None
    self.programs = programs or Programs()
    self._device_apply = None

  def __repr__(self) -> str:
    return (f"Scorer({self.model_config.get('variant')} {self.model_config.get('backbone')}, "
            f"image_size={self.image_size}, source={self.source!r})")

  def _device_variables(self) -> Any:
    """The weights on the device, the only copy kept.

    The host tree (a .pkl's arrays, hundreds of MB) is dropped, and the scorers' device_put
    of device arrays copies nothing, so host and device paths share one copy.
    """
    import jax  # pylint: disable=g-import-not-at-top
    self.variables = jax.device_put(self.variables)
    return self.variables

  @property
  def device_apply(self) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (B, H, W, 3) at any size -> scores (B,), resized on the device; once per shape."""
    if self._device_apply is None:
      self._device_apply = make_scorer(self.model, self._device_variables(),
                                       self.views_per_photo, resize_to=self.image_size,
                                       programs=self.programs)
    return self._device_apply

  def _score_items(self, items, batch_size, progress, names) -> Iterator[Result]:
    # 'host': PIL resizes on the host threads (the reference's filter and rounding) and the
    # uint8 pixels are normalised inside the jitted function (`device_apply`, whose resize is
    # then a no-op), bit-exact with the host's table and cheaper there. 'device': photos at
    # their own size, grouped by size, resized inside.
    size = self.image_size if self.preprocessing == "host" else None
    return score_in_batches(items, self.device_apply,
                            functools.partial(photo_pixels, size_hw=size), batch_size,
                            self.num_workers, progress, names)

  def quality_fn(self, pass_variables: bool = False) -> Callable[..., Any]:
    """A pure, jittable, differentiable quality function (the JAX twin of pyiqa's `as_loss`).

    The returned `f(images)` takes float32 images in [0, 1], (N, H, W, 3) at any size, and
    returns scores (N,) (higher is better), resizing on the device with PIL's bicubic filter
    (no uint8 rounding, so smooth in the pixels) and normalising as `score` does. Gradients
    flow to the pixels; the model runs in inference mode.

    Args:
      pass_variables: return `f(variables, images)` instead, with `self.variables` the
        variables to pass. Under an outer `jax.jit` a closed-over variable tree is baked into
        the program as constants (hundreds of MB for the full model); passing it avoids that.

    Example (raise a photo's score by gradient ascent on its pixels):

        quality = scorer.quality_fn()
        grad = jax.jit(jax.grad(lambda x: quality(x).sum()))   # jit the gradient of the
        # plain function: grad of an already jitted closure fails to lower in jax 0.10.2
        x = jnp.asarray(photo_uint8, jnp.float32)[None] / 255
        for _ in range(10):
          x = jnp.clip(x + 1e-3 * jnp.sign(grad(x)), 0, 1)
    """
    import jax  # pylint: disable=g-import-not-at-top
    from mobileiqa_jax.data import device_resize  # pylint: disable=g-import-not-at-top

    model, size = self.model, self.image_size

    def with_variables(variables, images):
      x = device_resize.resize_bicubic(images * 255.0, size, round_uint8=False)
      return model.apply(variables, device_resize.normalize(x), train=False)

    if pass_variables:
      return with_variables
    variables = jax.device_put(self.variables)
    return lambda images: with_variables(variables, images)

  def score(self, images: Any, batch_size: int | None = None) -> np.ndarray:
    """Scores images; returns float32 (N,), one score per image in input order.

    Args:
      images: a list of paths, PIL images or (H, W, 3) uint8 arrays (mixed is fine), one
        path or PIL image, or an (N, H, W, 3) uint8 array. Each is converted to RGB and
        resized to `image_size` the reference's way.
      batch_size: images per forward pass (default `self.batch_size`); fewer images than
        that make one batch of their number.

    Raises:
      UnreadableImageError: a file that cannot be read as an image (named).
      ValueError, TypeError: an input of the wrong kind or shape.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
      images = [images]
    elif isinstance(images, np.ndarray):
      if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"an image array must be (N, H, W, 3) uint8 RGB, got {images.dtype} "
                         f"{images.shape}.")
    items = list(images)
    if not items:
      return np.zeros((0,), np.float32)
    batch = min(batch_size or self.batch_size, len(items))
    names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"image {i}"
             for i, x in enumerate(items)]
    out = np.empty(len(items), np.float32)
    for i, r in enumerate(self._score_items(items, batch, None, names)):
      if r.error is not None:
        raise UnreadableImageError(r.error)
      out[i] = r.score
    return out

  __call__ = score

  def score_files(self, paths: Sequence[str],
                  progress: Callable[[int], None] | None = None,
                  batch_size: int | None = None) -> Iterator[Result]:
    """Scores files in order, `batch_size` (default `self.batch_size`) at a time.

    Unreadable files give a `Result.error`. Unlike `score`, a call with fewer files than a
    batch pads the batch: callers that score a folder in parts keep one compiled shape.
    """
    return self._score_items(list(paths), batch_size or self.batch_size, progress,
                             [os.fspath(p) for p in paths])

  def to_mos(self, scores: Any) -> np.ndarray:
    """Scores -> the training data's MOS scale: lo + score * (hi - lo).

    A model trained on the data set's own scale (stored `mos_range` None) is already on it.

    Raises:
      ValueError: the checkpoint stores no MOS scale (e.g. the authors' .pkl).
    """
    scores = np.asarray(scores, np.float32)
    if "mos_range" not in self.extra:
      raise ValueError(f"{self.source} stores no MOS scale: its scores stay on the model's "
                       "own scale (score_min..score_max).")
    if self.mos_range is None:
      return scores
    lo, hi = self.mos_range
    return (lo + scores * (hi - lo)).astype(np.float32)


#: From this many photos on, folding the head's attention (`mal.fold_attention`, 52 GMAC
#: once) costs less than it saves (7.7 GMAC a photo); below it, scoring keeps the reference.
FOLD_MIN_PHOTOS = 8


def attention_for(num_photos: int) -> str:
  """The attention form that scores `num_photos` photos fastest: folded from FOLD_MIN_PHOTOS."""
  return "folded" if num_photos >= FOLD_MIN_PHOTOS else "reference"


def load(path: str, image_size: Any = None, *, model: str | None = None,
         compute_dtype: str | None = None, batch_size: int | None = None,
         num_workers: int | None = None, which: str = "best", runtime: Any = None,
         preprocessing: str | None = None, attention: str | None = None,
         programs: Programs | None = None) -> Scorer:
  """Loads a MobileIQA model for scoring.

  Args:
    path: an orbax checkpoint folder (`launch/convert.py` output, a training step), a training
      workdir (its best checkpoint by SROCC+PLCC+KROCC), or a state dict file: the authors'
      `.pkl`, a `.pth`/`.pt`/`.bin`/`.safetensors`. For a state dict the model (teacher:
      `global_vit.*` keys, student: `local_cnn.*`) and the head's size are read from the keys
      and shapes, and it is converted in memory, strictly (`convert.mobileiqa_from_state_dict`).
    image_size: (height, width) or 'H,W' the photos are resized to; default the checkpoint's,
      or 1231x1907 (the authors' UHD-IQA size) for a state dict.
    model: 'teacher' or 'student' to insist on one for a state dict (a mismatch is an error).
    compute_dtype: None or 'float32' (default, whatever the run trained in) or 'bfloat16'.
    runtime: a `runtime.Runtime` to run the model with; default this host's platform's
      (`Runtime.for_platform(jax.default_backend(), compute_dtype=...)`).
    batch_size: images per forward pass; default `default_batch_size` of this process's
      backend (8 on gpu/tpu, 2 on CPU).
    num_workers: decoding threads (default min(8, cores)).
    which: for a workdir: 'best' or 'latest'.
    preprocessing: 'host' (PIL resize on CPU threads, the reference exactly) or 'device'
      (resize inside the jitted function); default `default_preprocessing` of this
      process's backend: device on gpu/tpu, host on cpu.
    attention: the MALs' attention form: 'folded' (the default unless `runtime` says
      otherwise: a third fewer multiply-adds in the head, after a one-time fold of the
      variables, `mal.fold_attention`; it pays from about `FOLD_MIN_PHOTOS` photos) or
      'reference' (the checkpoint's own variables, e.g. to count or export them). The two
      agree to float32 rounding.
    programs: where the scoring programs and a state dict's variables' shapes come from
      (`Programs`); default built in this process.

  Nothing process-wide changes: JAX's compilation cache is the caller's to turn on (the
  scoring commands do; from Python, `jax.config.update("jax_compilation_cache_dir", ...)`),
  and then a second process scoring the same shapes compiles nothing.

  Returns:
    A `Scorer`.

  Example:

      import mobileiqa_jax
      scorer = mobileiqa_jax.load("MobileNet_IQA.pkl")          # the authors' student
      scores = scorer.score(["a.jpg", "b.jpg"])                 # float32 (2,), in [0, 1]
  """
  size = preprocess.parse_image_size(image_size, "image_size")
  if preprocessing is not None and preprocessing not in PREPROCESSING:
    raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSING)}, got "
                     f"{preprocessing!r}.")
  import jax  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import loader  # pylint: disable=g-import-not-at-top
  if preprocessing is None:
    preprocessing = default_preprocessing(jax.default_backend())
  if runtime is None:
    # Scoring runs here: this process's backend decides the form, once.
    runtime = runtime_lib.Runtime.for_platform(jax.default_backend(),
                                               compute_dtype=compute_dtype or "float32")
    attention = attention or "folded"
  folded = (attention or runtime.attention) == "folded"
  # Checkpoints hold the reference form; the fold comes after reading them. A state dict is
  # read for this Scorer alone: no copy, the scorer's device_put makes the one the device needs.
  programs = programs or Programs()
  module, variables, meta = loader.load_model(
      path, which=which, model=model, copy=False,
      runtime=dataclasses.replace(runtime, attention="reference"),
      variables_template=programs.variables_template)
  config, extra, source = dict(meta["model_config"]), meta["extra"], meta["path"]
  if size is None:
    stored = extra.get("image_size")
    if not stored:
      raise ValueError(f"{path} stores no input size: pass image_size=(HEIGHT, WIDTH).")
    size = preprocess.parse_image_size(stored, f"the checkpoint's image_size ({source})")
  if folded:
    from mobileiqa_jax.models import mal  # pylint: disable=g-import-not-at-top
    # On the device first, so the fold runs there and only the folded tree is kept.
    variables = mal.fold_attention(jax.device_put(variables))
    module = module.clone(attention="folded")
  return Scorer(module, variables, size, config, extra, source, batch_size, num_workers,
                preprocessing, programs=programs)
