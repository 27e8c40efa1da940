"""One writer per training workdir: a lock file naming its holder, kept fresh by a heartbeat.

Two trainers on one workdir would interleave their metrics and overwrite each other's
checkpoints, so `launch/train.py` takes `<workdir>/train.lock` before it writes anything:

- the file is created with O_CREAT | O_EXCL (atomic on local and network file systems), and
  holds JSON {host, pid, started, boot_id}; in a bucket, which has no file locks, it is an
  object uploaded with a create-only precondition (`storage.create_exclusive`: GCS
  `ifGenerationMatch=0`, S3 `If-None-Match: *`), of which exactly one of two writers succeeds;
- while the run lives, a daemon thread refreshes it every `HEARTBEAT_S` seconds (its mtime,
  an object's update time, is the heartbeat);
- a lock is stale, and is taken over with a warning, when its holder is on this host and its
  pid is gone (kill -9, a crash), or when its heartbeat is older than `STALE_AFTER_S` (a lost
  host, whose pid cannot be checked from here);
- otherwise the launch is refused with `WorkdirLockedError`, naming the holder.

Taking over a stale lock must let only one of two launches win. Locally the stale file is
renamed aside (one rename succeeds). A bucket has no rename, so the taker first creates
`train.lock.takeover-<holder>` create-only, naming the stale holder: one taker gets it and
replaces the lock, the other finds the token, looks again and sees the new live holder. The
token goes with the lock when its holder releases it.

On a pod the lock belongs to the job, not to each host: process 0 takes it and broadcasts
the outcome, so every process either proceeds or raises the same error (`acquire_for_job`);
no host is left waiting in a collective that the others never join.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from typing import Any

from absl import logging
import numpy as np

from mobileiqa_jax import storage

LOCK_NAME = "train.lock"
# A live holder rewrites the lock this often; one whose lock is older than STALE_AFTER_S on
# another host is presumed lost. Ten missed heartbeats: a slow shared file system or a long
# stop-the-world pause must not hand a live run's workdir to a second trainer.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_MESSAGE_BYTES = 1024  # the broadcast refusal message (UTF-8, zero padded)


class WorkdirLockedError(OSError):
  """Another live run holds the workdir."""


def _boot_id() -> str:
  """Distinguishes two boots of one host (a pid from before a reboot is not alive)."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _read(path: str) -> dict[str, Any] | None:
  """The holder's record; None when the file vanished; {} when it is unreadable."""
  try:
    return json.loads(storage.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # half-written by a holder that died while creating it: stale below


def _describe(holder: dict[str, Any]) -> str:
  return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}"


class WorkdirLock:
  """`<workdir>/train.lock`, held from `acquire()` to `release()` (or as a context manager)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.workdir = storage.absolute(workdir)
    self.path = storage.join(self.workdir, LOCK_NAME)
    self._bucket = storage.is_bucket(self.workdir)
    self._token: str | None = None  # the takeover token this holder created (bucket)
    self._heartbeat_s, self._stale_after_s = heartbeat_s, stale_after_s
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                    "boot_id": _boot_id()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _stale_reason(self, holder: dict[str, Any], path: str | None = None) -> str | None:
    """Why `holder` (of the lock, or of the file `path`) is gone, or None when it may live."""
    if not holder:
      return "its lock file is unreadable"
    same_host = (holder.get("host") == self._record["host"] and
                 holder.get("boot_id", "") == self._record["boot_id"])
    if same_host and isinstance(holder.get("pid"), int):
      return None if _pid_alive(holder["pid"]) else "that process is gone"
    try:
      age = time.time() - storage.mtime_ns(path or self.path) / 1e9
    except FileNotFoundError:
      return "its lock file vanished"
    if age > self._stale_after_s:
      return f"its heartbeat stopped {age:.0f} s ago"
    return None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock, or raises `WorkdirLockedError` naming the live holder.

    Raises:
      WorkdirLockedError: a live run holds the workdir.
      OSError: the workdir cannot be created or written.
    """
    storage.makedirs(self.workdir)
    if self._bucket:
      return self._acquire_bucket()
    for _ in range(3):  # a lost race with another taker-over: look again
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read(self.path)
        if holder is None:
          continue
        reason = self._refuse_unless_stale(holder)
        # Rename, not delete: of two processes taking over together, exactly one succeeds.
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
          os.rename(self.path, aside)
        except FileNotFoundError:
          continue
        os.remove(aside)
        logging.warning("taking over %s from %s: %s", self.path, _describe(holder), reason)
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self._record, f)
      return self._held()
    raise self._contended()

  def _refuse_unless_stale(self, holder: dict[str, Any]) -> str:
    """Why `holder`'s lock is stale; raises `WorkdirLockedError` when it may be alive."""
    reason = self._stale_reason(holder)
    if reason is None:
      raise WorkdirLockedError(
          f"{self.workdir} is in use by another training run ({_describe(holder)}, lock "
          f"{self.path}); wait for it to finish, stop it, or pass another --workdir. If "
          f"that run is gone for good and its host is unreachable, the lock is taken over "
          f"{self._stale_after_s:.0f} s after its last heartbeat, or delete the lock file.")
    return reason

  def _contended(self) -> WorkdirLockedError:
    return WorkdirLockedError(f"{self.path}: could not take the lock (other processes keep "
                              f"taking it over); retry, or pass another --workdir.")

  def _held(self) -> "WorkdirLock":
    self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _acquire_bucket(self) -> "WorkdirLock":
    """`acquire` in a bucket: a create-only upload; a stale lock replaced through a token."""
    storage.check_bucket(self.workdir)
    record = json.dumps(self._record)
    for _ in range(3):
      if storage.create_exclusive(self.path, record):
        return self._held()
      holder = _read(self.path)
      if holder is None:
        continue
      reason = self._refuse_unless_stale(holder)
      # One token per stale holder: of two takers, the one that creates it replaces the lock.
      name = hashlib.sha256(json.dumps(holder, sort_keys=True).encode()).hexdigest()[:16]
      token = f"{self.path}.takeover-{name}"
      if not storage.create_exclusive(token, record):
        # Another taker won: look at the lock again (it is now theirs). Unless that taker
        # died before it replaced the lock: then its token is stale too and goes.
        taker = _read(token)
        if _read(self.path) == holder and taker is not None and (
            self._stale_reason(taker, token) is not None):
          storage.remove(token)
        continue
      if _read(self.path) != holder:  # replaced or released meanwhile: not ours to take
        storage.remove(token)
        continue
      storage.write_atomic(self.path, record)
      self._token = token
      logging.warning("taking over %s from %s: %s", self.path, _describe(holder), reason)
      return self._held()
    raise self._contended()

  def _is_mine(self, holder: dict[str, Any] | None) -> bool:
    return bool(holder) and holder.get("pid") == self._record["pid"] and (
        holder.get("host") == self._record["host"]) and (
            holder.get("started") == self._record["started"])

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        if not self._bucket:
          os.utime(self.path)
        elif self._is_mine(_read(self.path)):
          # An object's update time changes only with a new upload.
          storage.write_atomic(self.path, json.dumps(self._record))
        else:  # presumed lost and taken over: never overwrite the new holder's lock
          logging.warning("%s is no longer this run's: heartbeat stopped", self.path)
          return
      except OSError as e:  # keep training; a later launch may then see a stale lock
        logging.warning("could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this process's."""
    self._stop.set()
    if self._thread is None:
      return
    self._thread.join()
    self._thread = None
    if self._is_mine(_read(self.path)):
      storage.remove(self.path)
    if self._token is not None:
      storage.remove(self._token)
      self._token = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc: Any) -> None:
    self.release()


def acquire_for_job(workdir: str, is_main: bool, process_count: int, **kwargs: Any
                    ) -> WorkdirLock | None:
  """Takes the workdir lock once for the whole job (process 0) and shares the outcome.

  Every process must call it, before any other collective. With several processes, process
  0's refusal message is broadcast so every process raises the same error instead of
  waiting for the others.

  Returns:
    The held lock on process 0; None on the others.

  Raises:
    WorkdirLockedError: on every process when a live run holds the workdir.
  """
  lock, error = None, ""
  if is_main:
    try:
      lock = WorkdirLock(workdir, **kwargs).acquire()
    except OSError as e:
      if process_count == 1:
        raise
      error = f"{type(e).__name__}:{e}"
  if process_count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    buf = np.zeros(_MESSAGE_BYTES, np.uint8)
    raw = error.encode("utf-8")[:_MESSAGE_BYTES]
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    error = bytes(buf).rstrip(b"\0").decode("utf-8", "replace")
    if error:
      kind, _, message = error.partition(":")
      raise (WorkdirLockedError if kind == "WorkdirLockedError" else OSError)(message)
  return lock
