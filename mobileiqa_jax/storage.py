"""Files on a local disk or in a bucket (`gs://`, `s3://`), through `etils.epath`.

Every path the package reads or writes may be a local path or a bucket URL; this module holds
the few operations whose meaning differs between the two, so that callers write one line for
both. Local paths behave as plain files always did (absolute paths, `os.replace`, `O_EXCL`).

What an object store lacks, and what stands in for it (docs/training.md, "Runs in a bucket"):

- no partial file: an object appears whole when its upload completes, so `write_atomic`
  writes a bucket path in one upload (a local path: a temporary file renamed over it);
- no append: writers that append locally (metrics.jsonl, TensorBoard events) keep their rows
  in memory and upload at flush points instead (`training/metric_writer.py`);
- no atomic rename: `move_tree` copies and then deletes, moving the objects that mark the
  source complete last, so a kill half-way never leaves two complete copies;
- no file lock: `create_exclusive` writes an object only if none exists (a GCS generation
  precondition `ifGenerationMatch=0`, S3's `If-None-Match: *`), which is what `O_EXCL` gives
  locally (`training/workdir_lock.py`).

Endpoints and credentials come from each client's own variables (STORAGE_EMULATOR_HOST for
gcsfs, TENSORSTORE_GCS_HTTP_URL for orbax's tensorstore, AWS_ENDPOINT_URL and the AWS
credential chain for s3fs); EPATH_USE_TF=false keeps etils off tf.io.gfile, which ignores
the emulator. A missing bucket or refused credentials is `BucketError`: one line naming the
bucket and what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import posixpath
import shutil
import socket
import tempfile
from typing import Iterator

from etils import epath

#: URI schemes of the object stores the package reads and writes.
BUCKET_SCHEMES = ("gs://", "s3://")


def prepare_clients() -> None:
  """Settles what must be set before gcsfs is first imported (it reads it then).

  The GCS emulator serves the JSON API only; gcsfs's bucket-layout lookup (on by default in
  recent gcsfs) asks the storage-control gRPC API, which the emulator lacks, and logs a
  warning on every operation. Against real GCS gcsfs keeps its default.
  """
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


prepare_clients()


class BucketError(OSError):
  """A bucket that does not exist, or credentials the object store refuses (one line)."""


def is_bucket(path: str | os.PathLike) -> bool:
  """Whether `path` names an object in a bucket (`gs://`, `s3://`) rather than a local file."""
  return os.fspath(path).startswith(BUCKET_SCHEMES)


def absolute(path: str | os.PathLike) -> str:
  """`path` made absolute: a local path from the working directory; a bucket URL as it is.

  (`os.path.abspath("gs://b/x")` would make a local folder named `gs:`.)
  """
  path = os.fspath(path)
  if is_bucket(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath(rest)}" if rest.strip("/") else path
  return os.path.abspath(os.path.expanduser(path))


def as_path(path: str | os.PathLike) -> epath.Path:
  """An `epath.Path` for `path` (absolute when local)."""
  if is_bucket(path):
    prepare_clients()
  return epath.Path(absolute(path))


def join(path: str | os.PathLike, *names: str) -> str:
  """`os.path.join` for local paths, '/' for bucket URLs."""
  path = os.fspath(path)
  if is_bucket(path):
    return posixpath.join(path, *names)
  return os.path.join(path, *names)


def dirname(path: str | os.PathLike) -> str:
  """The folder of `path` (a bucket URL's parent prefix)."""
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip("/")) if is_bucket(path) else os.path.dirname(path)


def basename(path: str | os.PathLike) -> str:
  """The last name of `path`."""
  path = os.fspath(path)
  return posixpath.basename(path.rstrip("/")) if is_bucket(path) else os.path.basename(path)


def bucket_of(path: str | os.PathLike) -> str:
  """`gs://bucket` of `gs://bucket/a/b` (the scheme and bucket of a bucket URL)."""
  scheme, rest = os.fspath(path).split("://", 1)
  return f"{scheme}://{rest.split('/', 1)[0]}"


def _fresh(path: str | os.PathLike) -> epath.Path:
  """`as_path(path)` after dropping the client's cached listings.

  gcsfs and s3fs cache what they listed, and objects written by others (orbax writes through
  tensorstore, other hosts write their shards) would not show; listings are the few calls
  whose answer must be current.
  """
  _fs(path).invalidate_cache()
  return as_path(path)


def exists(path: str | os.PathLike) -> bool:
  """Whether a file, folder, object or non-empty prefix is at `path`."""
  return _fresh(path).exists() if is_bucket(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
  """A local folder, or a bucket prefix with at least one object under it."""
  return _fresh(path).is_dir() if is_bucket(path) else os.path.isdir(path)


def isfile(path: str | os.PathLike) -> bool:
  """Whether `path` is a file (an object)."""
  return _fresh(path).is_file() if is_bucket(path) else os.path.isfile(path)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names in a folder (a bucket prefix: the next level of names under it)."""
  if is_bucket(path):
    try:
      return [p.name for p in _fresh(path).iterdir()]
    except FileNotFoundError:  # a prefix whose last object just went: an empty folder
      return []
  return os.listdir(path)


def walk_files(path: str | os.PathLike) -> list[str]:
  """Every file under `path`, as full paths (bucket URLs for a bucket), sorted."""
  if is_bucket(path):
    root = os.fspath(path).rstrip("/")
    return sorted(f"{root}/{rel}" for rel in file_sizes(root))
  return sorted(os.path.join(r, n) for r, _, names in os.walk(path) for n in names)


def file_sizes(path: str | os.PathLike) -> dict[str, int]:
  """{path relative to `path` ('/'-separated in a bucket): size} of every file under it.

  One listing in a bucket (not one request per object).
  """
  if is_bucket(path):
    root = os.fspath(path).rstrip("/")
    _fs(root).invalidate_cache()
    found = _fs(root).find(_key(root), detail=True)
    prefix = _key(root) + "/"
    return {k[len(prefix):]: int(v["size"]) for k, v in found.items()
            if k.startswith(prefix) and v.get("type") != "directory"}
  path = os.fspath(path)
  return {os.path.relpath(f, path): os.path.getsize(f) for f in walk_files(path)}


def getsize(path: str | os.PathLike) -> int:
  """The size of a file or object in bytes."""
  return as_path(path).stat().length if is_bucket(path) else os.path.getsize(path)


def mtime_ns(path: str | os.PathLike) -> int:
  """The modification time of a file or object (an object's last upload), in nanoseconds."""
  if not is_bucket(path):
    return os.stat(path).st_mtime_ns
  fs = _fs(path)
  fs.invalidate_cache()  # a heartbeat's age must be the object's now
  info = fs.info(_key(path))
  # gcsfs: 'mtime' (datetime) / 'updated' (RFC 3339); s3fs: 'LastModified' (datetime).
  for key in ("mtime", "LastModified", "updated"):
    value = info.get(key)
    if isinstance(value, str):
      value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime.datetime):
      return int(value.timestamp() * 1e9)
  raise OSError(f"{path}: the store reports no modification time ({sorted(info)}).")


def makedirs(path: str | os.PathLike) -> None:
  """A local folder and its parents; nothing for a bucket (prefixes need no creating)."""
  if not is_bucket(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
  """The content of a file or object."""
  return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
  """The content of a file or object, as UTF-8 text."""
  return as_path(path).read_text(encoding="utf-8")


def remove(path: str | os.PathLike) -> None:
  """Removes one file or object (FileNotFoundError when absent)."""
  if is_bucket(path):
    _fs(path).rm_file(_key(path))
  else:
    os.remove(path)


def rmtree(path: str | os.PathLike) -> None:
  """Removes a folder (a bucket prefix: every object under it); absent is fine."""
  if is_bucket(path):
    with contextlib.suppress(FileNotFoundError):
      if _fresh(path).exists():
        _fs(path).rm(_key(path), recursive=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def _fs(path: str | os.PathLike):
  """The fsspec filesystem (gcsfs, s3fs) epath itself uses for a bucket URL."""
  prepare_clients()
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem(os.fspath(path).split("://", 1)[0])


def _key(path: str | os.PathLike) -> str:
  """`bucket/a/b` of `gs://bucket/a/b` (how fsspec names objects)."""
  return os.fspath(path).split("://", 1)[1]


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` so that readers see the old file, no file, or all of `data`.

  Raises:
    FileNotFoundError: a local path whose folder does not exist (named).
  """
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_bucket(path):
    as_path(path).write_bytes(raw)
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


def create_exclusive(path: str | os.PathLike, data: bytes | str) -> bool:
  """Writes `data` to `path` only if nothing is there; False when something already was.

  Locally `O_CREAT | O_EXCL`; in a bucket one upload with a create-only precondition (GCS
  `ifGenerationMatch=0`, S3 `If-None-Match: *`): of two writers exactly one succeeds.
  """
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_bucket(path):
    try:
      _fs(path).pipe_file(_key(path), raw, mode="create")
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(raw)
  return True


def move_tree(src: str | os.PathLike, dst: str | os.PathLike,
              markers: tuple[str, ...] = ()) -> None:
  """Moves folder `src` to `dst` (which must not exist).

  Locally one `os.rename`. In a bucket, where there is no rename, a copy of every object and
  then the deletion of the originals. `markers` (names inside `src`: the objects that mark it
  complete) go last, deleted from `src` before they are written to `dst`, so a kill half-way
  never leaves two complete copies (at worst, neither is marked complete).
  """
  if not is_bucket(src):
    os.rename(src, dst)
    return
  fs = _fs(src)
  src, dst = os.fspath(src).rstrip("/"), os.fspath(dst).rstrip("/")
  marks = {join(src, m) for m in markers}
  files = walk_files(src)
  for f in files:
    if f not in marks:
      fs.copy(_key(f), _key(dst + f[len(src):]))
  held = {f: read_bytes(f) for f in files if f in marks}
  for f in held:
    fs.rm_file(_key(f))
  for f, data in held.items():
    write_atomic(dst + f[len(src):], data)
  rmtree(src)


def orbax_can_write(path: str | os.PathLike) -> bool:
  """Whether orbax-checkpoint reads and writes checkpoints at `path` itself.

  Locally and in `gs://` (tensorstore's gcs driver) it does. For any other bucket orbax
  builds a tensorstore *file* spec and refuses the URL ("Checkpoint path should be
  absolute"), and it has no option that names another tensorstore driver; such checkpoints
  are staged on local disk and copied (`download_tree`, `upload_tree`).
  """
  path = os.fspath(path)
  return not is_bucket(path) or path.startswith("gs://")


def download_tree(src: str | os.PathLike, dst: str, names: tuple[str, ...] | None = None
                  ) -> str:
  """Copies the objects under bucket prefix `src` into local folder `dst`; returns `dst`.

  `names`: only these top-level names (sub-folders or files) of `src`.
  """
  src = os.fspath(src).rstrip("/")
  for rel in file_sizes(src):
    if names is not None and rel.split("/", 1)[0] not in names:
      continue
    local = os.path.join(dst, *rel.split("/"))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    _fs(src).get_file(_key(f"{src}/{rel}"), local)
  return dst


def upload_tree(src: str, dst: str | os.PathLike, last: str | None = None) -> None:
  """Copies local folder `src` to bucket prefix `dst`, the file `last` (relative) last: a
  reader that finds `last` finds everything else."""
  dst = os.fspath(dst).rstrip("/")
  files = sorted(os.path.relpath(f, src) for f in walk_files(src))
  if last in files:
    files.remove(last)
    files.append(last)
  for rel in files:
    _fs(dst).put_file(os.path.join(src, rel), _key(f"{dst}/{rel.replace(os.sep, '/')}"))


@contextlib.contextmanager
def local_tree(path: str | os.PathLike, names: tuple[str, ...] | None = None
               ) -> Iterator[str]:
  """A local folder holding the tree at `path`: itself, or a temporary download of it."""
  if not is_bucket(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="mobileiqa_jax-") as tmp:
    yield download_tree(path, os.path.join(tmp, basename(path)), names)


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
  that does not exist is named before the block runs, not after its work; so is a bucket
  that does not exist.
  """
  _check_folder(path)
  check_bucket(path)
  buffer = io.StringIO(newline="")
  yield buffer
  write_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def local_file(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """A local path holding the file at `path`: itself, or a temporary download of the object.

  For readers that take only a local file name (safetensors, the zip reader of .pkl files).
  """
  if not is_bucket(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="mobileiqa_jax-") as tmp:
    local = os.path.join(tmp, "file" + suffix)
    with open(local, "wb") as f:
      f.write(read_bytes(path))
    yield local


# ----------------------------------------------------------------------------- bucket errors

_CREDENTIALS_HELP = {
    "gs": ("gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS=<key "
           "file>; on a TPU VM its service account needs the bucket's Storage Object Admin "
           "role"),
    "s3": "AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the host's IAM role",
}


def _scheme(path: str) -> str:
  return path.split("://", 1)[0]


def _is_refusal(error: BaseException) -> bool:
  """Whether `error` says the object store refused the credentials (401/403, none found)."""
  name = type(error).__name__
  code = getattr(error, "code", None) or getattr(error, "status", None)
  if isinstance(error, PermissionError) or code in (401, 403, "401", "403"):
    return True
  if name in ("DefaultCredentialsError", "RefreshError", "NoCredentialsError",
              "PartialCredentialsError"):
    return True
  response = getattr(error, "response", None)
  if isinstance(response, dict):
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status in (401, 403)
  text = str(error)
  return any(m in text for m in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                 "401 Unauthorized", "403 Forbidden", "Permission denied"))


def bucket_problem(path: str, error: BaseException) -> BucketError | None:
  """`error`, raised while reaching bucket URL `path`, as a one-line `BucketError`, or None
  when it is not about the bucket or the credentials (e.g. a missing object)."""
  bucket, scheme = bucket_of(path), _scheme(path)
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if _is_refusal(e):
      first = " ".join(str(e).split())[:160] or type(e).__name__
      return BucketError(
          f"{bucket}: access refused ({first}). Give this host credentials that may read and "
          f"write the bucket: {_CREDENTIALS_HELP[scheme]}.")
    e = e.__cause__ or e.__context__
  return None


def check_bucket(path: str | os.PathLike) -> None:
  """Raises `BucketError` (one line naming the bucket and what to do) when the bucket of a
  bucket URL does not exist or refuses these credentials; nothing for a local path."""
  path = os.fspath(path)
  if not is_bucket(path):
    return
  bucket = bucket_of(path)
  try:
    found = _fs(path).exists(_key(bucket))
  except Exception as e:  # pylint: disable=broad-except  (each client raises its own)
    problem = bucket_problem(path, e)
    if problem is None:
      raise BucketError(f"{bucket} cannot be reached ({' '.join(str(e).split())[:200]}). Check "
                        f"the bucket's name and this host's network and credentials.") from e
    raise problem from e
  if not found:
    make = "gcloud storage buckets create" if _scheme(path) == "gs" else "aws s3 mb"
    raise BucketError(f"bucket {bucket} does not exist (or these credentials cannot see it): "
                      f"create it ({make} {bucket}) or fix the path {path}.")


# The storage clients epath and orbax use: their own exception types are not OSErrors.
_CLIENT_MODULES = ("gcsfs", "s3fs", "fsspec", "botocore", "aiobotocore", "google.auth",
                   "google.api_core", "google.cloud")


def client_error(error: BaseException) -> str | None:
  """One line for an error a storage client raised mid-command (not yet named by
  `check_bucket`), or None when `error` did not come from one."""
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if type(e).__module__.startswith(_CLIENT_MODULES):
      first = " ".join(str(e).split())[:200] or type(e).__name__
      if _is_refusal(e):
        return (f"the object store refused this host's credentials ({first}). For gs:// "
                f"{_CREDENTIALS_HELP['gs']}; for s3:// {_CREDENTIALS_HELP['s3']}.")
      return (f"the object store failed ({type(e).__name__}: {first}). Check the bucket's "
              f"name, this host's network and its credentials, then rerun.")
    e = e.__cause__ or e.__context__
  return None
