"""The host's C allocator: keep the memory a call frees, so that the next call reuses it.

On CPU every call of a compiled XLA program allocates its temporaries as one block (206 MB
for the teacher's backbone and LDAs on one 512x512 photo) and frees it at the end. glibc's
malloc serves blocks that large with a fresh `mmap` and returns them with `munmap`, so each
call touches every page anew: ~50,000 page faults per photo there, each a trap and a zeroed
4 KiB page. PyTorch's eager layers pay the same for each large activation.

`reuse_freed_memory` keeps those blocks in glibc's heap instead:
- `jax_cpu_enable_async_dispatch=False`: XLA:CPU runs a computation on the calling thread,
  so its temporaries come from that thread's arena: the main arena for a program's main
  thread. Only the main arena can hold a block that large without `mmap` (the others are
  heaps of at most 64 MB and fall back to `mmap` whatever the settings). The calling thread
  waits for the result, which a scorer does anyway (it converts the scores to numpy);
- `mallopt`: no `mmap` for large blocks, and no trimming of the heap below 2 GiB.
After the first call the temporaries land on pages already mapped, and, the calls being
synchronous, the block freed by one call is free when the next allocates. What loading a
checkpoint freed is given back before scoring (`release_freed_memory`, which `Scorer` calls).
On the 2-core VM (2026-12-06 17:39 UTC, benchmarks/scoring.py, seconds per photo and peak RSS,
without -> with): the teacher at 512x512 0.708 -> 0.667 s, 1.33 -> 1.40 GB; the student at
1231x1907 0.937 -> 0.909 s, 1.69 -> 2.17 GB; compiles within 4%.

The scoring commands (predict, evaluate, explain; launch/ or `mobileiqa`) apply it when they
start, unless MOBILEIQA_REUSE_FREED_MEMORY=0. A Python program that scores on CPU may call it
itself, before scoring; it changes process-wide settings (jax's dispatch, glibc's malloc),
which is why `load` does not.

(The first form set one arena for all threads instead of the synchronous dispatch: it made
XLA's compiles ~50% slower, the compiler threads contending for the arena's lock, and the
asynchronous frees left two or more blocks in the heap. docs/scoring.md has both.)

glibc's half from outside a process, for PyTorch (its layers run on the calling thread):
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

#: The environment variable that turns `reuse_freed_memory` off for the commands ('0').
ENV_VAR = "MOBILEIQA_REUSE_FREED_MEMORY"

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest top-of-heap glibc may keep without returning it.
_TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
  """This process's C library where it is glibc (libc_ver reads the interpreter's binary:
  once is enough), else None."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  return ctypes.CDLL(None)


def keep_freed_blocks() -> bool:
  """glibc's half: M_MMAP_MAX 0 and M_TRIM_THRESHOLD 2 GiB - 1, so that the main arena serves
  large blocks from its heap and keeps them when freed. Returns whether it took effect (False,
  and nothing changed, where the C library is not glibc: macOS, musl)."""
  libc = _glibc()
  if libc is None:
    return False
  mallopt = libc.mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # mallopt returns 1 on success, 0 on an invalid value.
  return all(mallopt(param, value) == 1
             for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))


def reuse_freed_memory() -> bool:
  """Keeps XLA:CPU's per-call temporaries on reused pages; returns whether it took effect.

  `keep_freed_blocks`, then jax's `jax_cpu_enable_async_dispatch` False (calls run on the
  calling thread, whose arena is the main one in a program's main thread).
  """
  if not keep_freed_blocks():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def release_freed_memory() -> None:
  """Returns the heap's free pages to the system (glibc's `malloc_trim(0)`; elsewhere nothing).

  With `keep_freed_blocks` in force nothing else does: what loading a checkpoint allocated
  and freed (the .pkl's arrays, the conversion) would stay resident under the scoring's own
  temporaries (peak RSS of the teacher at 512x512: 1.56 GB against 1.33 without the setting).
  `Scorer` calls it once its weights are on the device, before its first call.
  """
  libc = _glibc()
  if libc is not None:
    libc.malloc_trim(0)


def reuse_freed_memory_unless_disabled() -> bool:
  """`reuse_freed_memory`, unless MOBILEIQA_REUSE_FREED_MEMORY is '0' (or 'false', 'no',
  'off'); what the scoring commands call. Returns whether it took effect."""
  if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  return reuse_freed_memory()
