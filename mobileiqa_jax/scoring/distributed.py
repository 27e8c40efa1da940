"""Scoring one set of photos on many processes (hosts): `predict --distributed --output=F`.

Every process runs the same command (`jax.distributed` set up as training does:
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or discovered on TPU pods and
SLURM/Open MPI). The expanded, ordered file list (`scorer_lib.expand_paths`) is cut into
*parts*: contiguous runs of files, each a whole number of batches and at most `part_size`
files, so a part's batches are the very batches a one-process run scores (same numbers,
bit for bit). Process p takes the p-th contiguous block of parts and, part by part, scores
it and writes it to `F.parts/<index>-of-<count>-<digest>.csv` (written to a temporary name,
then renamed: a part file that exists is complete; in a bucket, where F may be a gs:// or
s3:// URL, each part is one upload, which appears whole or not at all). Then:

1. a barrier of the live processes (jax's coordination service; a process that died is left
   out once its heartbeat stops, after at most 100 s);
2. process 0 checks that every part exists and, if so, concatenates them in order into F
   (again temporary + rename) and removes F.parts; otherwise it names each process whose
   parts are missing (with its host) and keeps what was written;
3. process 0 publishes the outcome; every process exits with it: 0, 1 when any file could
   not be scored (each reported on the stderr of the process that read it, again on a rerun
   that reuses its part), or 1 with the same one-line error when a process failed.

Resuming: a part's digest covers the settings that decide its numbers (checkpoint path and
newest modification time, image size, model, batch size) and its files' paths, so a rerun
of the same command scores only the parts that are missing and gives the same F. Without
jax.distributed (one process) the same code runs with one share.

The coordination service (key-value store and the live-process barrier) is reached through
the client `jax.distributed.initialize` made, as `jax.experimental.multihost_utils` does;
tasks are started as recoverable (`jax_enable_recoverability`) so that a process that stops
does not abort the others: they report it instead.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import socket
import time
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

from mobileiqa_jax import storage
from mobileiqa_jax.scoring import predict
from mobileiqa_jax.scoring import scorer as scorer_lib
from mobileiqa_jax.data import preprocess

# Files per part (the unit a rerun reuses); smaller when that leaves a process without work.
DEFAULT_PART_SIZE = 1024
PARTS_SUFFIX = ".parts"
_PART_HEADER = ["path", "score", "error"]
_KEY = "mobileiqa_jax/scoring"
# How long the others wait for process 0's merge (it reads every part once).
_MERGE_TIMEOUT_MS = 60 * 60 * 1000


class ScoringProcessError(RuntimeError):
  """A process of a --distributed run did not write its share (named in the message)."""


@dataclasses.dataclass(frozen=True)
class Part:
  """Files [start, stop) of the expanded list, written to one part file."""

  index: int
  start: int
  stop: int


def plan_parts(num_files: int, num_processes: int, part_size: int,
               batch_size: int) -> list[Part]:
  """Contiguous parts covering `num_files` files in order.

  Each part but the last holds a multiple of `batch_size` files (so its batches are a
  one-process run's), at most `part_size` rounded up to a batch, and at most what one process
  would get if the files were split evenly (so no process is left idle when there are few).
  """
  if part_size < 1:
    raise ValueError(f"--part_size must be >= 1, got {part_size}.")
  if num_files == 0:
    return []
  size = min(part_size, math.ceil(num_files / num_processes))
  size = math.ceil(size / batch_size) * batch_size
  return [Part(i, start, min(start + size, num_files))
          for i, start in enumerate(range(0, num_files, size))]


def share(parts: Sequence[Part], process: int, num_processes: int) -> list[Part]:
  """Process `process`'s parts: its contiguous block (neighbouring photos on one host)."""
  n = len(parts)
  return list(parts[process * n // num_processes:(process + 1) * n // num_processes])


def owner(part: Part, num_parts: int, num_processes: int) -> int:
  """The process whose `share` holds `part`."""
  return next(p for p in range(num_processes)
              if p * num_parts // num_processes <= part.index < (p + 1) * num_parts // num_processes)


def _newest_mtime(path: str) -> int:
  if storage.is_bucket(path):
    if not storage.isdir(path):
      return storage.mtime_ns(path)
    return max(storage.mtime_ns(f) for f in storage.walk_files(path))
  if not os.path.isdir(path):
    return os.stat(path).st_mtime_ns
  newest = os.stat(path).st_mtime_ns
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      with contextlib.suppress(OSError):
        newest = max(newest, os.stat(os.path.join(root, name)).st_mtime_ns)
  return newest


def settings_key(checkpoint: str, image_size: Any, model: str | None, batch_size: int,
                 preprocessing: str | None = None) -> str:
  """What decides the numbers of a part besides its files (for the part's digest)."""
  return json.dumps({"checkpoint": storage.absolute(checkpoint),
                     "checkpoint_mtime_ns": _newest_mtime(checkpoint),
                     "image_size": preprocess.parse_image_size(image_size),
                     "model": model, "batch_size": batch_size,
                     "preprocessing": preprocessing}, sort_keys=True)


def part_path(parts_dir: str, part: Part, num_parts: int, files: Sequence[str],
              settings: str) -> str:
  digest = hashlib.sha256("\0".join([settings, *files[part.start:part.stop]]).encode())
  return storage.join(parts_dir,
                      f"{part.index:06d}-of-{num_parts:06d}-{digest.hexdigest()[:16]}.csv")


def write_part(path: str, results: Iterable[scorer_lib.Result]) -> None:
  with storage.atomic_text(path) as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(_PART_HEADER)
    for r in results:
      if r.error is None:
        writer.writerow([r.path, predict.format_score(r.score), ""])
      else:
        writer.writerow([r.path, "", r.error])


def read_part(path: str) -> list[list[str]]:
  """A part's rows [path, score, error] (score '' where error is set)."""
  rows = list(csv.reader(io.StringIO(storage.read_text(path), newline="")))
  if not rows or rows[0] != _PART_HEADER:
    raise ValueError(f"{path} is not a scoring part (header {rows[:1]}): remove it and rerun.")
  return rows[1:]


def score_share(mine: Sequence[Part], paths_of: Callable[[Part], str],
                files: Sequence[str], score_files: Callable[[Sequence[str]], Iterable[Any]],
                err: TextIO) -> int:
  """Scores the parts of `mine` whose file is missing; returns how many files failed.

  `score_files(files)` yields `scorer_lib.Result`s in order (it is called only when there is
  work, so a rerun with every part written loads no model). Errors are written to `err`,
  also those a reused part recorded.
  """
  failed = 0
  for part in mine:
    path = paths_of(part)
    if not storage.exists(path):
      write_part(path, score_files(files[part.start:part.stop]))
    for _, _, error in read_part(path):
      if error:
        failed += 1
        err.write(error + "\n")
  return failed


def missing_parts_message(missing: Sequence[Part], num_parts: int, num_processes: int,
                          live: set[int], hosts: dict[int, str], parts_dir: str) -> str:
  """One line naming each process whose parts are missing, and what to do."""
  by_process: dict[int, list[int]] = {}
  for part in missing:
    by_process.setdefault(owner(part, num_parts, num_processes), []).append(part.index)
  said = []
  for p, indices in sorted(by_process.items()):
    host = f" on {hosts[p]}" if p in hosts else ""
    state = "failed (see its stderr)" if p in live else "stopped"
    said.append(f"process {p}{host} {state}: {len(indices)} of its parts missing")
  return (f"{'; '.join(said)} ({len(missing)} of {num_parts} parts). The parts written are "
          f"kept in {parts_dir}: rerun the same command to score only the missing ones.")


def merge_parts(part_files: Sequence[str], output: str, parts_dir: str) -> tuple[int, int]:
  """Concatenates the parts in order into `output` (path,score); removes `parts_dir`.

  Returns (rows written, files that could not be scored).
  """
  written = failed = 0
  with storage.atomic_text(output) as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["path", "score"])
    for path in part_files:
      for name, score, error in read_part(path):
        if error:
          failed += 1
        else:
          writer.writerow([name, score])
          written += 1
  storage.rmtree(parts_dir)
  return written, failed


class _Coordination:
  """The processes' meeting points: jax's coordination service, or nothing for one process."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    self.process, self.count = jax.process_index(), jax.process_count()
    self._client = distributed.global_state.client if self.count > 1 else None
    self._values: dict[str, str] = {}

  def set(self, key: str, value: str) -> None:
    if self._client is None:
      self._values[key] = value
    else:
      self._client.key_value_set(f"{_KEY}/{key}", value)

  def get(self, key: str) -> str:
    if self._client is None:
      return self._values[key]
    return self._client.blocking_key_value_get(f"{_KEY}/{key}", _MERGE_TIMEOUT_MS)

  def values(self, prefix: str) -> dict[str, str]:
    if self._client is None:
      return {k[len(prefix):]: v for k, v in self._values.items() if k.startswith(prefix)}
    full = f"{_KEY}/{prefix}"
    return {k[len(full):]: v for k, v in self._client.key_value_dir_get(full)}

  def leave(self) -> None:
    """Disconnects the others from process 0's service before process 0 shuts it down."""
    if self._client is None:
      return
    import jax  # pylint: disable=g-import-not-at-top
    if self.process != 0:
      self.set(f"left/{self.process}", "1")
      jax.distributed.shutdown()
    else:
      for p in range(1, self.count):
        self._client.blocking_key_value_get(f"{_KEY}/left/{p}", _MERGE_TIMEOUT_MS)
      time.sleep(1.0)  # their shutdown RPCs
      jax.distributed.shutdown()

  def live_barrier(self) -> set[int]:
    """Waits for every live process; returns their indices (a stopped one is left out)."""
    if self._client is None:
      return {0}
    return set(self._client.get_live_nodes(list(range(self.count))))


def initialize() -> None:
  """`jax.distributed` as training sets it up, with tasks that may stop without aborting all."""
  import jax  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.training import sharding  # pylint: disable=g-import-not-at-top
  if not jax.distributed.is_initialized():
    jax.config.update("jax_enable_recoverability", True)
  sharding.maybe_initialize_distributed(True)


def _merge_or_name_missing(parts: Sequence[Part], paths_of: Callable[[Part], str], output: str,
                           parts_dir: str, coord: _Coordination, live: set[int], err: TextIO,
                           num_files: int) -> dict[str, Any]:
  missing = [p for p in parts if not storage.exists(paths_of(p))]
  if missing:
    hosts = {int(k): v for k, v in coord.values("host/").items()}
    return {"error": missing_parts_message(missing, len(parts), coord.count, live, hosts,
                                           parts_dir)}
  _, failed = merge_parts([paths_of(p) for p in parts], output, parts_dir)
  if failed:
    err.write(f"{failed} of {num_files} files could not be scored.\n")
  return {"failed": failed}


def predict_csv_distributed(
    checkpoint: str,
    paths: Sequence[str],
    output: str,
    err: TextIO,
    image_size: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    model: str | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    preprocessing: str | None = None,
    programs: scorer_lib.Programs | None = None,
) -> int:
  """`predict --distributed`: this process's share, then (process 0) the merged `output`.

  Every process calls this with the same arguments. Returns the exit status, the same on
  every process: 0, or 1 when any file could not be scored.

  Raises:
    ValueError, FileNotFoundError: a bad setting, a missing path, an unloadable checkpoint
      (this process's own mistake, raised after the others were told).
    ScoringProcessError: another process did not write its share (named).
  """
  if not paths:
    raise ValueError("no PATH given: name image files or folders to score.")
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {batch_size}.")
  if part_size < 1:
    raise ValueError(f"--part_size must be >= 1, got {part_size}.")
  preprocess.parse_image_size(image_size)
  storage.check_bucket(output)
  if storage.is_bucket(output) and output.endswith("/"):
    raise IsADirectoryError(f"--output={output} is a prefix: name the CSV object to write.")
  if not storage.is_bucket(output):
    if os.path.isdir(output):
      raise IsADirectoryError(f"--output={output} is a folder: name the CSV file to write.")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
      raise FileNotFoundError(f"{output}: its folder {out_dir} does not exist.")
  files = scorer_lib.expand_paths(paths)

  initialize()
  plan_batch = batch_size
  if plan_batch is None:
    # After initialize: asking for the backend before it would start jax's backends early.
    # The Scorer's own default is the same, so each part is whole batches.
    import jax  # pylint: disable=g-import-not-at-top
    plan_batch = scorer_lib.default_batch_size(jax.default_backend())
  batch = min(plan_batch, len(files))  # as predict_csv: one compiled shape, no idle padding
  settings = settings_key(checkpoint, image_size, model, batch, preprocessing)
  coord = _Coordination()
  coord.set(f"host/{coord.process}", socket.gethostname())
  parts = plan_parts(len(files), coord.count, part_size, batch)
  parts_dir = output + PARTS_SUFFIX
  paths_of = lambda part: part_path(parts_dir, part, len(parts), files, settings)
  mine = share(parts, coord.process, coord.count)

  def score_files(part_files: Sequence[str]) -> Iterator[scorer_lib.Result]:
    if scorer[0] is None:
      scorer[0] = scorer_lib.load(
          checkpoint, image_size, model=model, batch_size=batch_size, num_workers=workers,
          preprocessing=preprocessing,
          # From the whole folder, not this process's share: every process runs one form,
          # so the CSV does not depend on how the parts fell.
          attention=scorer_lib.attention_for(len(files)), programs=programs)
    return scorer[0].score_files(part_files, bar.update if bar else None,
                                 min(scorer[0].batch_size, batch))

  scorer: list[Any] = [None]
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    todo = sum(p.stop - p.start for p in mine if not storage.exists(paths_of(p)))
    bar = tqdm.tqdm(total=todo, unit="img", file=err, dynamic_ncols=True,
                    desc=f"process {coord.process}" if coord.count > 1 else None)
  own_error = None
  try:
    storage.makedirs(parts_dir)
    score_share(mine, paths_of, files, score_files, err)
  except Exception as e:  # pylint: disable=broad-except
    # Still meet the others (they would otherwise wait for this process's heartbeat to
    # stop); the error is raised once they know.
    own_error = e
  finally:
    if bar:
      bar.close()
  live = coord.live_barrier()
  if coord.process == 0:
    try:
      outcome = _merge_or_name_missing(parts, paths_of, output, parts_dir, coord, live, err,
                                       len(files))
    except BaseException as e:
      coord.set("outcome", json.dumps({"error": f"process 0 could not write {output}: {e}"}))
      raise
    coord.set("outcome", json.dumps(outcome))
  outcome = json.loads(coord.get("outcome"))
  # Process 0 hosts the service: the others leave it first, cleanly, and say so.
  coord.leave()
  if own_error is not None:
    raise own_error
  if "error" in outcome:
    raise ScoringProcessError(outcome["error"])
  return 1 if outcome["failed"] else 0

