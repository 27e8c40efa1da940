"""Checksums of a finished checkpoint, so damage is found when it is read, not mid-restore.

Orbax validates the structure of what it reads but not the bytes: a truncated or overwritten
data file surfaces deep inside tensorstore (OUT_OF_RANGE, DATA_LOSS) or, worse, not at all.
So after a checkpoint is finalised, `seal(path)` records the size and CRC-32 of every file
under it in `<path>/checksums.json`; `verify(path)` compares them before any restore and
raises `CheckpointDamagedError` naming the first file that differs.

A checkpoint without the record (written before it existed, or killed between orbax's
commit and the seal) cannot be verified this way; readers then rely on the restore failing
(`checkpoint.py` turns such failures into the same error).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Sequence

from mobileiqa_jax import storage

MANIFEST = "checksums.json"
_CHUNK = 1 << 22


class CheckpointDamagedError(ValueError):
  """A checkpoint's files are missing, truncated or changed since it was written."""

  def __init__(self, path: str, problem: str):
    super().__init__(f"checkpoint {path} is damaged: {problem}")
    self.path, self.problem = path, problem


def _crc32(path: str) -> int:
  crc = 0
  with storage.as_path(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _sizes(path: str) -> dict[str, int]:
  """{relative path (os.sep-separated, as the record keeps it): size} but the record's own."""
  return {rel.replace("/", os.sep): size for rel, size in storage.file_sizes(path).items()
          if rel != MANIFEST}


def _full(path: str, rel: str) -> str:
  return storage.join(path, *rel.split(os.sep))


def is_sealed(path: str) -> bool:
  """Whether `path` has its checksum record."""
  return storage.isfile(storage.join(path, MANIFEST))


def seal(path: str) -> int:
  """Writes `<path>/checksums.json` (atomically) for a finished checkpoint; returns its bytes.

  In a bucket the record is written after every object it names: a step holding it is whole.
  """
  files = {rel: [size, _crc32(_full(path, rel))] for rel, size in sorted(_sizes(path).items())}
  storage.write_atomic(storage.join(path, MANIFEST),
                         json.dumps({"algorithm": "crc32", "files": files}, indent=0,
                                    sort_keys=True))
  return sum(size for size, _ in files.values())


def verify(path: str, items: Sequence[str] | None = None) -> bool:
  """Checks `path` against its checksum record.

  Args:
    path: one checkpoint directory.
    items: check only the files of these items (top-level folders such as 'variables',
      'meta') and the checkpoint's own top-level files; None checks everything. Scoring
      needs the weights, not the optimizer state, so a damaged optimizer state must not
      stop it.

  Returns:
    True when the record exists and every file matches; False when there is no record.

  Raises:
    CheckpointDamagedError: naming the first missing, resized or changed file.
  """
  if not is_sealed(path):
    return False
  try:
    files = json.loads(storage.read_text(storage.join(path, MANIFEST)))["files"]
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointDamagedError(path, f"its {MANIFEST} is unreadable ({e})") from None
  sizes = _sizes(path)  # one listing, also in a bucket
  for rel, (size, crc) in sorted(files.items()):
    top = rel.split(os.sep, 1)
    if items is not None and len(top) > 1 and top[0] not in items:
      continue
    full = _full(path, rel)
    actual = sizes.get(rel)
    if actual is None:
      raise CheckpointDamagedError(path, f"{full} is missing")
    if actual != size:
      raise CheckpointDamagedError(
          path, f"{full} has {actual} bytes, {size} were written (truncated or overwritten)")
    try:
      actual_crc = _crc32(full)
    except OSError as e:
      raise CheckpointDamagedError(path, f"{full} cannot be read ({e})") from None
    if actual_crc != crc:
      raise CheckpointDamagedError(path, f"{full} does not match its checksum (changed on disk)")
  return True
