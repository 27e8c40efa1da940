"""JAX's persistent compilation cache for scoring: a second run compiles nothing.

XLA compiles the scoring program in each new process (10-27 s at 1231x1907 on a 2-core CPU),
which dwarfs the forward pass of one photo. JAX can keep compiled programs on disk and reuse
them in the next process; this module turns that on, in one per-user folder, for the entry
points that score (`launch/predict.py`, `launch/explain.py`, `launch/evaluate.py`) and for
`mobileiqa_jax.load`. It only sets JAX's own options (`jax_compilation_cache_dir` and the two
thresholds that decide what is written); JAX reads, writes and keys the entries.

Where the cache goes, first match wins:

1. an explicit choice: the launchers' `--compilation_cache_dir=PATH` (`--nocompilation_cache`
   or an empty/'0' value turns it off), or `enable(PATH)` / `enable('')` from Python;
2. `MOBILEIQA_JAX_CACHE_DIR`: a path moves it, '' or '0' turns it off;
3. a folder the user already gave JAX itself (`JAX_COMPILATION_CACHE_DIR`, or
   `jax.config.update('jax_compilation_cache_dir', ...)` before the first `load`);
4. `$XDG_CACHE_HOME/mobileiqa_jax/jax` (default `~/.cache/mobileiqa_jax/jax`).

The decision is made once per process (the first `enable` call); later default calls keep it.
Entries are keyed by JAX on the program, the jax/jaxlib version and the device, so a new jax
or another machine simply misses and compiles. The folder may be deleted at any time.
`program_cache` keeps the traced programs and the variables' shapes in a subfolder, on and
off with this cache.
"""

from __future__ import annotations

import os
from typing import Mapping

ENV_VAR = "MOBILEIQA_JAX_CACHE_DIR"
JAX_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
# What turns the cache off, in the environment variable or the flag.
OFF_VALUES = ("", "0")

# Sentinel: no explicit choice; take the environment's (see the module docstring).
AUTO = None

_decided = False
_directory: str | None = None


def default_dir(environ: Mapping[str, str] | None = None) -> str:
  """$XDG_CACHE_HOME/mobileiqa_jax/jax, or ~/.cache/mobileiqa_jax/jax."""
  environ = os.environ if environ is None else environ
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mobileiqa_jax", "jax")


def resolve(choice: str | None = AUTO, environ: Mapping[str, str] | None = None,
            jax_configured: str | None = None) -> str | None:
  """The cache folder to use, or None for no cache (pure: reads only its arguments).

  Args:
    choice: an explicit folder, '' or '0' for none, or AUTO (None) for the environment's.
    environ: the environment (default `os.environ`).
    jax_configured: a folder already set in JAX's own config, if any.
  """
  environ = os.environ if environ is None else environ
  if choice is not AUTO:
    return None if choice in OFF_VALUES else os.path.expanduser(choice)
  if ENV_VAR in environ:
    value = environ[ENV_VAR]
    return None if value in OFF_VALUES else os.path.expanduser(value)
  if jax_configured:
    return jax_configured
  if environ.get(JAX_ENV_VAR):
    return environ[JAX_ENV_VAR]
  return default_dir(environ)


def enable(choice: str | None = AUTO) -> str | None:
  """Sets JAX's persistent compilation cache for this process; returns its folder or None.

  The first call decides; a later call with AUTO keeps that decision (so `load` may call it
  every time), while an explicit `choice` decides again (before the first compile it takes
  effect; JAX opens its cache at the first compile).

  Args:
    choice: a folder, '' or '0' for no cache, or AUTO for the environment's (module docstring).
  """
  global _decided, _directory
  if _decided and choice is AUTO:
    return _directory
  import jax  # pylint: disable=g-import-not-at-top

  configured = jax.config.jax_compilation_cache_dir
  directory = resolve(choice, jax_configured=configured)
  if directory is None:
    # Off even where JAX's own variable asked for a cache: the user said so in our terms.
    jax.config.update("jax_compilation_cache_dir", None)
  else:
    jax.config.update("jax_compilation_cache_dir", directory)
    # JAX writes only programs that took >= 1 s to compile; scoring also runs small ones
    # (the padded last batch's shape, the explain maps) whose compile still costs the second
    # run time, so write everything unless the user set the threshold through JAX's variable.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  _decided, _directory = True, directory
  return directory


def current() -> str | None:
  """The folder `enable` chose for this process; None when it chose none or has not run."""
  return _directory if _decided else None


def flag_choice(directory: str | None, enabled: bool) -> str | None:
  """The launchers' two flags -> `enable`'s choice: '' when off, the folder, or AUTO."""
  if not enabled:
    return ""
  return directory if directory is not None else AUTO


def define_flags() -> None:
  """Defines --compilation_cache_dir and --[no]compilation_cache for a launcher.

  Once per process: several commands can run in one process (the tests run launchers
  in-process), and absl refuses a flag defined twice.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "compilation_cache_dir" in flags.FLAGS:
    return
  flags.DEFINE_string(
      "compilation_cache_dir", None,
      f"Folder of JAX's compilation cache, which makes a second run skip compiling (default: "
      f"${ENV_VAR}, else JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/mobileiqa_jax/jax; "
      "'' or '0' turns it off).")
  flags.DEFINE_boolean("compilation_cache", True,
                       "Use JAX's compilation cache (--nocompilation_cache: compile afresh).")


def enable_from_flags() -> str | None:
  """`enable` with the choice of the flags `define_flags` defined."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return enable(flag_choice(flags.FLAGS.compilation_cache_dir, flags.FLAGS.compilation_cache))
