"""Measuring in a fresh process: one way to run a function there, one way to read its peak.

A measurement of memory belongs to a process of its own: the peak resident set of the process
that converted a model, or that ran a test before, is not the model's. `call_in_child`
runs `module.function(*args)` in a fresh Python process and returns its JSON result;
`peak_rss_bytes` is what such a function reports of itself.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any, Mapping, Sequence

# The folder holding the `mobileiqa_jax` package: a child imports this very copy of it,
# whatever is installed.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MeasurementError(RuntimeError):
  """The measuring process failed; the message ends with its last line of error output."""


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def peak_rss_bytes() -> int:
  """This process's peak resident memory.

  Linux's VmHWM where there is one: after a fork/exec from a large parent, `ru_maxrss` still
  carries the parent's peak, while VmHWM is this process image's own. Elsewhere `ru_maxrss`.
  """
  kib = _status_kib("VmHWM")
  if kib is None:
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  return kib * 1024


def rss_bytes() -> int | None:
  """This process's resident memory now (VmRSS), or None where /proc is missing."""
  kib = _status_kib("VmRSS")
  return None if kib is None else kib * 1024


def call_in_child(function: str, args: Sequence[Any] = (), *, what: str = "the measurement",
                  timeout_s: float | None = None,
                  env: Mapping[str, str] | None = None) -> Any:
  """`function(*args)` in a fresh Python process; its JSON-serialisable result.

  Args:
    function: 'package.module:name', importable in the child (this package is on its path).
    args: JSON-serialisable positional arguments.
    what: what the child does, for the error message.
    timeout_s: a bound on the child's run (None: none).
    env: variables to add to the child's environment.

  Raises:
    MeasurementError: the child failed or timed out (names `what` and its last error line).
  """
  module, name = function.split(":")
  code = (f"import json, sys; from {module} import {name} as f; "
          "print(json.dumps(f(*json.loads(sys.argv[1]))))")
  child_env = dict(os.environ, **(env or {}))
  child_env["PYTHONPATH"] = os.pathsep.join(
      p for p in (_PACKAGE_ROOT, child_env.get("PYTHONPATH")) if p)
  child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    out = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))],
                         capture_output=True, text=True, env=child_env, timeout=timeout_s,
                         check=False, cwd=_PACKAGE_ROOT)
  except subprocess.TimeoutExpired as e:
    raise MeasurementError(f"{what} did not finish in {timeout_s:g} s") from e
  if out.returncode:
    tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
    raise MeasurementError(f"{what} failed (status {out.returncode}): {tail[0]}")
  return json.loads(out.stdout.strip().splitlines()[-1])
