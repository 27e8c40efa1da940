"""The scoring command's CSV: `predict_csv(checkpoint, paths, out, err)`.

One row `path,score` per readable photo, in input order; a file that cannot be read is named
on `err` and the rest are still scored. `scoring/distributed.py` writes the same rows from
every process of a job.
"""

from __future__ import annotations

import csv
from typing import Sequence, TextIO

from mobileiqa_jax.data import preprocess
from mobileiqa_jax.scoring import scorer as scorer_lib


def format_score(score: float) -> str:
  """A score as the CSVs of the scoring command write it."""
  return f"{score:.6f}"


def predict_csv(
    checkpoint: str,
    paths: Sequence[str],
    out: TextIO,
    err: TextIO,
    image_size: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    model: str | None = None,
    preprocessing: str | None = None,
    programs: scorer_lib.Programs | None = None,
) -> int:
  """The scoring command: CSV `path,score` to `out`, one row per readable image in input order.

  Settings and paths are checked before the model is loaded. Returns the exit status: 0, or 1
  when any file could not be scored (each named on `err`).

  Raises:
    ValueError, FileNotFoundError: a bad setting, a missing path, a folder without images, or
      a checkpoint that cannot be loaded (the command line prints the message).
  """
  if not paths:
    raise ValueError("no PATH given: name image files or folders to score.")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {batch_size}.")
  preprocess.parse_image_size(image_size)
  files = scorer_lib.expand_paths(paths)
  # Fewer files than a batch make one batch of their number, as `Scorer.score` does: one
  # photo is one forward pass of one image, not of `batch_size` with the rest padding.
  scorer = scorer_lib.load(checkpoint, image_size, model=model, batch_size=batch_size,
                           num_workers=workers, preprocessing=preprocessing,
                           attention=scorer_lib.attention_for(len(files)), programs=programs)
  batch = min(scorer.batch_size, len(files))
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(files), unit="img", file=err, dynamic_ncols=True)
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["path", "score"])
  failed = 0
  for result in scorer.score_files(files, bar.update if bar else None, batch):
    if result.error is None:
      writer.writerow([result.path, format_score(result.score)])
    else:
      failed += 1
      err.write(result.error + "\n")
  if bar:
    bar.close()
  if failed:
    err.write(f"{failed} of {len(files)} files could not be scored.\n")
  return 1 if failed else 0
