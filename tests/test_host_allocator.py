"""host_allocator: freed memory is reused (no page faults once the heap holds the blocks);
the scoring commands apply it unless MOBILEIQA_REUSE_FREED_MEMORY=0."""

import os
import platform
import subprocess
import sys

import pytest

from mobileiqa_jax import host_allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted call with a 128 MB temporary (the transposed map), as the model's programs have:
# glibc's default mmaps a fresh block for it at every call (32,768 pages to fault in). With
# reuse the calls run on this thread and land on the pages the previous call freed; now and
# then the heap first grows by a block (small allocations took part of the freed one).
_PROBE = r"""
import resource, sys
from mobileiqa_jax import host_allocator
if sys.argv[1] == "reuse":
  assert host_allocator.reuse_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((32 * 2**20,), jnp.float32)
f = jax.jit(lambda v: jnp.max((v * 2.0 + 1.0)[::-1].reshape(4096, -1).T))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 2**27
for _ in range(8):
  assert float(f(x)) == 3.0
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# What is freed stays resident under reuse, until release_freed_memory.
import numpy as np
def rss_mb():
  return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
a = np.ones(2**26, np.float32)
del a
kept = rss_mb()
host_allocator.release_freed_memory()
print(kept - rss_mb())
"""


def _probe(mode: str) -> tuple[int, int]:
  """(page faults of eight warm calls, MB that release_freed_memory gave back)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  for name in ("GLIBC_TUNABLES", "JAX_CPU_ENABLE_ASYNC_DISPATCH"):  # glibc's and jax's defaults
    env.pop(name, None)
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       env=env, timeout=120, check=True)
  faults, released = out.stdout.strip().splitlines()[-2:]
  return int(faults), int(released)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults_and_released_on_demand():
  (default, _), (reuse, released) = _probe("default"), _probe("reuse")
  # The premise first, so the test can fail: every call faults its 32,768 pages in.
  assert default > 8 * 30_000, default
  assert reuse < 40_000, (default, reuse)  # at most one block's growth in eight calls
  assert released >= 200, released  # the 256 MB array freed under reuse


def test_the_environment_can_turn_it_off(monkeypatch):
  calls = []
  monkeypatch.setattr(host_allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
  monkeypatch.delenv(host_allocator.ENV_VAR, raising=False)
  assert host_allocator.reuse_freed_memory_unless_disabled()
  for off in ("0", "false", "Off"):
    monkeypatch.setenv(host_allocator.ENV_VAR, off)
    assert not host_allocator.reuse_freed_memory_unless_disabled()
  monkeypatch.setenv(host_allocator.ENV_VAR, "1")
  assert host_allocator.reuse_freed_memory_unless_disabled()
  assert calls == [1, 1]


# The predict command on a photo that does not exist: it fails once started (one line); at
# exit the process reports jax's dispatch setting, which reuse_freed_memory turns off.
_PREDICT = r"""
import atexit, sys
atexit.register(lambda: print("async dispatch:",
                              sys.modules["jax"].config.values["jax_cpu_enable_async_dispatch"]))
from mobileiqa_jax import console
sys.argv = ["predict.py", "--checkpoint=/nonexistent/model.pkl", "photo.jpg"]
console.run_command("predict")
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize("setting, expected", [(None, "False"), ("0", "True")])
def test_the_predict_command_applies_it(tmp_path, setting, expected):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             MOBILEIQA_JAX_CACHE_DIR=str(tmp_path))
  env.pop(host_allocator.ENV_VAR, None)
  if setting is not None:
    env[host_allocator.ENV_VAR] = setting
  out = subprocess.run([sys.executable, "-c", _PREDICT], capture_output=True, text=True,
                       env=env, timeout=120, cwd=tmp_path)
  assert out.returncode == 1 and "photo.jpg does not exist" in out.stderr, out.stderr[-500:]
  assert f"async dispatch: {expected}" in out.stdout, (out.stdout, out.stderr[-500:])
