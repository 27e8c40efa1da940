"""SIGTERM as a flag: a preempted run finishes its step, saves and returns.

Cluster schedulers (and TPU maintenance events) send SIGTERM some seconds before they kill a
job. The training loop polls `Preemption.requested` after each step on every process
(`sharding.any_process`), so all processes stop at the same step and save it together.
"""

from __future__ import annotations

import signal
import threading

from absl import logging


class Preemption:
  """Context manager: while active, SIGTERM sets `requested` instead of killing the process.

  Installs the handler only on the main thread (Python allows no other); elsewhere
  `requested` stays False and SIGTERM keeps its previous meaning.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: finishing this step, then saving and exiting")
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
