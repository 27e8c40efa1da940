"""Training and evaluation scalars: one JSON line each, and TensorBoard event files.

`MetricWriter` writes; the JSON lines (`metrics.jsonl`) are what tests and scripts read, the
event files (tensorboardX, when installed) are for looking at curves. Only process 0 writes.
`StepLog` is what the training loop hands each step's metrics to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping

from absl import logging
import jax
import numpy as np

from mobileiqa_jax import storage


class MetricWriter:
  """`write(step, scalars, kind)` appends to `<workdir>/metrics.jsonl` and TensorBoard.

  A no-op when not `enabled` (processes other than 0).

  In a bucket (`gs://`, `s3://`), which cannot append, rows are kept in memory and
  metrics.jsonl is uploaded whole at flush points: every `flush()` (the trainer's checkpoint
  saves), every evaluation, at most every `BUCKET_FLUSH_S` seconds otherwise, and at `close`;
  never once per step. TensorBoard events are written to a local temporary file and uploaded
  at the same points as a new event file each (TensorBoard reads every event file of a
  folder), so no object is rewritten for them at all. What a kill -9 loses is what followed
  the last flush: at most the rows after the last checkpoint, which the resumed run re-does.
  """

  #: In a bucket: the longest time a row waits for its upload between checkpoints.
  BUCKET_FLUSH_S = 120.0

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._path = storage.join(workdir, "metrics.jsonl")
    self._bucket = storage.is_bucket(workdir)
    self._rows: list[str] = []  # a bucket's metrics.jsonl, held in memory
    self._unflushed = False
    self._flushed_at = time.monotonic()
    if not enabled:
      return
    if self._bucket:
      if storage.exists(self._path):
        self._rows = storage.read_text(self._path).splitlines(keepends=True)
      self._tb = _BucketEvents(workdir)
      return
    self._jsonl = open(self._path, "a", encoding="utf-8")
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(logdir=workdir, flush_secs=30)
    except ImportError:
      logging.warning("tensorboardX not installed: no TensorBoard event files")

  def rewind(self, step: int) -> None:
    """Drops the rows after `step`: a run resumed from step `step` writes them again.

    A run killed without warning (kill -9, a lost host) may have logged steps past its last
    checkpoint; the resumed run re-does those steps and logs them anew. The file is rewritten
    atomically, so a crash here leaves either the old or the new file.
    """
    if not self.enabled:
      return
    if self._bucket:
      lines = self._rows
    else:
      self._jsonl.close()
      with open(self._path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) != len(lines):
      storage.write_atomic(self._path, "".join(keep))
      logging.info("metrics.jsonl: %d rows after step %d dropped (re-done from the checkpoint)",
                   len(lines) - len(keep), step)
    if self._bucket:
      self._rows = keep
    else:
      self._jsonl = open(self._path, "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float], kind: str) -> None:
    """One row `{"step", "kind", **scalars}`; TensorBoard tags are `<kind>/<name>`."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    row = json.dumps({"step": int(step), "kind": kind, **clean}) + "\n"
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{kind}/{k}", v, int(step))
    if not self._bucket:
      self._jsonl.write(row)
      self._jsonl.flush()
      return
    self._rows.append(row)
    self._unflushed = True
    if kind != "train" or time.monotonic() - self._flushed_at > self.BUCKET_FLUSH_S:
      self.flush()

  def flush(self) -> None:
    """Makes every row written so far durable (in a bucket: uploads; locally: already is)."""
    if not (self.enabled and self._bucket and self._unflushed):
      return
    storage.write_atomic(self._path, "".join(self._rows))
    self._tb.flush()
    self._unflushed = False
    self._flushed_at = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _BucketEvents:
  """TensorBoard scalars for a bucket folder: a local event file, uploaded whole per flush."""

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._local = tempfile.mkdtemp(prefix="mobileiqa_jax-events-")
    self._writer = None
    self._segment = 0

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    if self._writer is None:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError:
        return
      self._segment += 1
      # A new event file per flush: tensorboardX names it by the second and host; the
      # segment number keeps two files of one second apart and in order.
      self._writer = tensorboardX.SummaryWriter(logdir=self._local, flush_secs=3600,
                                                filename_suffix=f".{self._segment:06d}")
    self._writer.add_scalar(tag, value, step)

  def flush(self) -> None:
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    for name in sorted(os.listdir(self._local)):
      local = os.path.join(self._local, name)
      with open(local, "rb") as f:
        storage.write_atomic(storage.join(self._workdir, name), f.read())
      os.remove(local)

  def close(self) -> None:
    self.flush()
    shutil.rmtree(self._local, ignore_errors=True)


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return 1 << 62  # a torn last line of a killed run: dropped with the re-done rows


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step and what to do."""


class StepLog:
  """The train steps' metrics: checked, logged every `log_every_steps`, shown in a progress bar.

  `add(step, device_metrics)` keeps the newest step in flight (fetching its metrics would wait
  for the device) and handles the one before; `drain()` handles all. A non-finite loss raises
  NonFiniteLossError naming the step, after `on_nonfinite()` (which may add to the message).
  """

  def __init__(self, writer: MetricWriter, *, batch_size: int, log_every_steps: int,
               steps_per_epoch: int, total_steps: int, initial_step: int,
               lr_at: Callable[[int], float], on_nonfinite: Callable[[], str],
               progress_bar: bool):
    self._writer, self._batch_size, self._every = writer, batch_size, log_every_steps
    self._spe, self._total, self._lr_at, self._on_nonfinite = (steps_per_epoch, total_steps,
                                                               lr_at, on_nonfinite)
    self._pending: list[tuple[int, Any]] = []
    self._t, self._images = time.perf_counter(), 0
    self._bar = _progress_bar(total_steps, initial_step) if progress_bar else None

  def add(self, step: int, metrics: Any) -> None:
    self._pending.append((step, metrics))
    self.drain(keep_last=1)

  def drain(self, keep_last: int = 0) -> None:
    while len(self._pending) > keep_last:
      s, m = self._pending.pop(0)
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      epoch = s // self._spe
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(f"non-finite loss {m['loss']} at step {s} (epoch {epoch}); "
                                 f"stopping. {self._on_nonfinite()}")
      self._images += self._batch_size
      if self._bar is not None:
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{m['loss']:.4g}", epoch=epoch)
      if s % self._every == 0 or s == self._total:
        now = time.perf_counter()
        m["images_per_sec"] = self._images / max(now - self._t, 1e-9)
        m["lr"] = float(self._lr_at(s - 1))
        self._t, self._images = now, 0
        if self._bar is not None:
          self._bar.set_postfix(loss=f"{m['loss']:.4g}", img_s=f"{m['images_per_sec']:.1f}",
                                epoch=epoch)
        self._writer.write(s, m, "train")

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _progress_bar(total: int, initial: int):
  try:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   mininterval=1.0)
