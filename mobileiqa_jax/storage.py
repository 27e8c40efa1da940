"""Files on a local disk or in a bucket, written whole or not at all.

A reader (another process, a rerun after a kill) must never see half a file. On a local or
network file system that takes a temporary file in the same folder, flushed to disk and then
renamed over the target (`os.replace` is atomic there). An object store has no rename, but
needs none: an object appears whole when its upload completes, so a bucket path is written in
one upload. Paths go through `etils.epath`, so `gs://` and `s3://` work wherever a local path
does.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from typing import Iterator

from etils import epath

#: URI schemes of the object stores the package writes to.
BUCKET_SCHEMES = ("gs://", "s3://")


def is_bucket(path: str | os.PathLike) -> bool:
  """Whether `path` names an object in a bucket (`gs://`, `s3://`) rather than a local file."""
  return os.fspath(path).startswith(BUCKET_SCHEMES)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` so that readers see the old file, no file, or all of `data`.

  Raises:
    FileNotFoundError: a local path whose folder does not exist (named).
  """
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_bucket(path):
    epath.Path(path).write_bytes(raw)
    return
  path = os.fspath(path)
  folder = _check_folder(path)
  # Host and pid in the name: processes of one job may write beside each other.
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{socket.gethostname()}-"
                     f"{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def _check_folder(path: str | os.PathLike) -> str | None:
  """The local folder of `path` (None for a bucket); FileNotFoundError when it is missing."""
  if is_bucket(path):
    return None
  folder = os.path.dirname(os.path.abspath(os.fspath(path)))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{os.fspath(path)}: its folder {folder} does not exist.")
  return folder


@contextlib.contextmanager
def atomic_text(path: str | os.PathLike) -> Iterator[io.StringIO]:
  """A text file that appears at `path` whole when the block ends, and not at all on an error.

  The text is held in memory until then (CSV parts, JSON records: small). A local folder
  that does not exist is named before the block runs, not after its work.
  """
  _check_folder(path)
  buffer = io.StringIO(newline="")
  yield buffer
  write_atomic(path, buffer.getvalue())
