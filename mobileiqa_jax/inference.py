"""Scoring photos with a MobileIQA checkpoint: the reference preprocessing and a jitted scorer.

Images are decoded and resized on CPU threads (PIL releases the GIL), batched to a fixed shape
so the scorer compiles once, and scored in input order. A file that cannot be read is reported
and skipped; the rest are still scored.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from mobileiqa_jax.data import preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given, in order; folders recursed, their image files sorted.

  Inside a folder only files with an image extension (case-insensitive: IMAGE_EXTENSIONS) are
  taken, so label files and READMEs beside the photos are not reported as bad images. A file
  named explicitly is always taken. A path that does not exist raises.
  """
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = []
      for root, _, files in os.walk(path):
        found += [os.path.join(root, f) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
      out += sorted(found)
    elif os.path.exists(path):
      out.append(path)
    else:
      raise FileNotFoundError(f"{path} does not exist (expected an image file or a folder).")
  return out


def make_scorer(model: Any, variables: Any) -> Callable[[np.ndarray], np.ndarray]:
  """A jitted function: normalised NHWC float32 batch -> scores (B,), in inference mode."""

  # Variables are an argument, not closed over: closed-over arrays become constants baked
  # into the compiled program (hundreds of MB for the head).
  score = jax.jit(lambda v, images: model.apply(v, images, train=False))
  variables = jax.device_put(variables)
  return lambda images: np.asarray(score(variables, jnp.asarray(images)))


@dataclasses.dataclass
class Result:
  """One input's outcome: a score, or the reason it could not be scored."""

  path: str
  score: float | None = None
  error: str | None = None


def _load(path: str, size_hw: tuple[int, int]) -> np.ndarray:
  with open(path, "rb") as f:
    data = f.read()
  return preprocess.resize_normalize(preprocess.decode_rgb(data, path), size_hw)


def score_files(
    paths: Sequence[str],
    scorer: Callable[[np.ndarray], np.ndarray],
    size_hw: tuple[int, int],
    batch_size: int = 8,
    num_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Result]:
  """Scores `paths` in order, `batch_size` at a time (the last batch padded, so one shape).

  Decoding runs `num_workers` threads ahead of the scorer, holding at most a few batches of
  decoded images in memory whatever the number of files.
  """
  num_workers = num_workers or min(8, os.cpu_count() or 1)
  chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    submit = lambda chunk: [pool.submit(_load, p, size_hw) for p in chunk]
    pending = submit(chunks[0]) if chunks else []
    for i, chunk in enumerate(chunks):
      futures = pending
      # Decode the next batch while this one is scored.
      pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
      results, images = [], []
      for path, fut in zip(chunk, futures):
        try:
          images.append(fut.result())
          results.append(Result(path))
        except (OSError, ValueError) as e:
          results.append(Result(path, error=str(e)))
      if images:
        batch = np.zeros((batch_size, *size_hw, 3), np.float32)
        batch[: len(images)] = np.stack(images)
        scores = iter(scorer(batch)[: len(images)].tolist())
        for r in results:
          if r.error is None:
            r.score = next(scores)
      if progress:
        progress(len(chunk))
      yield from results


def parse_image_size(text: str | Iterable[int] | None) -> tuple[int, int] | None:
  """'1231,1907' (height,width) -> (1231, 1907); None stays None."""
  if text is None or text == "":
    return None
  try:
    parts = [int(p) for p in (text.split(",") if isinstance(text, str) else text)]
  except ValueError:
    parts = []
  if len(parts) != 2 or min(parts) < 32:
    raise ValueError(f"--image_size must be HEIGHT,WIDTH with both >= 32, got {text!r}.")
  return parts[0], parts[1]


def predict_csv(
    checkpoint: str,
    paths: Sequence[str],
    out: TextIO,
    err: TextIO,
    image_size: str | None = None,
    batch_size: int = 4,
    workers: int | None = None,
    progress: bool = True,
) -> int:
  """The scoring command: CSV `path,score` to `out`, one row per readable image in input order.

  Returns the exit status: 0, or 1 when any file could not be scored (each named on `err`).
  """
  from mobileiqa_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  if not paths:
    err.write("No PATH given: name image files or folders to score.\n")
    return 2
  if batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {batch_size}.")
  files = expand_paths(paths)
  model, variables, meta = ckpt.load_model(checkpoint)
  size_hw = parse_image_size(image_size)
  if size_hw is None:
    stored = (meta.get("extra") or {}).get("image_size")
    if not stored:
      raise ValueError(f"{checkpoint} stores no input size: pass --image_size=HEIGHT,WIDTH.")
    size_hw = tuple(stored)
  scorer = make_scorer(model, variables)
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(files), unit="img", file=err, dynamic_ncols=True)
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["path", "score"])
  failed = 0
  for result in score_files(files, scorer, size_hw, batch_size, workers,
                            bar.update if bar else None):
    if result.error is None:
      writer.writerow([result.path, f"{result.score:.6f}"])
    else:
      failed += 1
      err.write(f"{result.path}: cannot be scored: {result.error}\n")
  if bar:
    bar.close()
  if failed:
    err.write(f"{failed} of {len(files)} files could not be scored.\n")
  return 1 if failed else 0
