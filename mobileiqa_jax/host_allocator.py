"""The host's C allocator: keep the memory a call frees, so that the next call reuses it.

On CPU every call of a compiled XLA program allocates its temporaries as one block (206 MB
for the teacher's backbone and LDAs on one 512x512 photo) and frees it at the end. glibc's
malloc serves blocks that large with a fresh `mmap` and returns them with `munmap`, so each
call touches every page anew: ~50,000 page faults per photo there, each a trap and a zeroed
4 KiB page. PyTorch's eager layers pay the same for each large activation. On the 2-core VM
(2026-12-06 16:35 UTC, benchmarks/scoring.py; seconds per photo, default -> reuse):

    student 512x512    JAX 0.290 -> 0.279   PyTorch 0.498 -> 0.380
    teacher 512x512    JAX 0.694 -> 0.653   PyTorch 1.133 -> 0.721
    teacher 1231x1907  JAX 4.161 -> 4.060   PyTorch 10.606 -> 6.051

`reuse_freed_memory` tells glibc to keep freed memory in its heap instead: one arena (XLA's
threads would otherwise get arenas of at most 64 MB, whose larger blocks always fall back to
`mmap`), no `mmap` for large blocks, and no trimming below 2 GiB. After the first call the
temporaries land on pages already mapped.

It is off unless asked for, because it costs as much as it buys JAX:
- compiles are ~50% slower (the teacher's 512x512 scoring program 3.2 -> 4.8 s, the
  student's 3.0 -> 4.6 s): XLA's compiler threads then contend for the one arena. A run that
  finds its programs in the compilation cache compiles nothing; a first run pays it (the
  one-photo command's first run took 8.86 against 8.08 s);
- the process keeps its peak footprint until it exits, and as XLA frees a call's block
  asynchronously the heap can hold two or more blocks of the largest temporaries (peak RSS
  +0.01 to +0.50 GB in the table of docs/scoring.md);
- all threads share one arena's lock.
A long CPU scoring job whose programs are cached gains the 2-6%.

It must run before any thread has allocated (glibc fixes a thread's arena at its first
allocation), so the commands do it first, in `mobileiqa_jax.console.run_command` (every
launch/ script but training, and the `mobileiqa` command), when the environment variable
MOBILEIQA_REUSE_FREED_MEMORY is 1. A Python program calls it before importing jax:

    from mobileiqa_jax import host_allocator
    host_allocator.reuse_freed_memory()
    import mobileiqa_jax
    ...

The same settings from outside the process, for any program (PyTorch's included):
GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647
"""

from __future__ import annotations

import ctypes
import os
import platform

#: The environment variable that turns `reuse_freed_memory` on for the commands ('1').
ENV_VAR = "MOBILEIQA_REUSE_FREED_MEMORY"

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt takes an int: the largest top-of-heap glibc may keep without returning it.
_TRIM_THRESHOLD = 2**31 - 1


def enabled_by_environment() -> bool:
  """True when MOBILEIQA_REUSE_FREED_MEMORY is '1' (or 'true', 'yes', 'on')."""
  return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def reuse_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse; returns whether it took effect.

  False, and nothing changed, where the C library is not glibc (macOS, musl).
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  mallopt = libc.mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # mallopt returns 1 on success, 0 on an invalid value.
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
