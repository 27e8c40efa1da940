"""host_allocator: freed memory is reused (no page faults once the heap holds the blocks);
the commands apply it when MOBILEIQA_REUSE_FREED_MEMORY=1."""

import os
import platform
import subprocess
import sys

import pytest

from mobileiqa_jax import console
from mobileiqa_jax import host_allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted call with a 128 MB temporary (the transposed map), as the model's programs have:
# glibc's default mmaps a fresh block for it at every call (32,768 pages to fault in). With
# reuse the calls land on pages freed before, once the heap has grown to hold the blocks in
# flight (a block can be freed after the next call began; under load, with calls this short,
# up to ~6 blocks were seen): count the calls after that.
_PROBE = r"""
import resource, sys
from mobileiqa_jax import host_allocator
if sys.argv[1] == "reuse":
  assert host_allocator.reuse_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((32 * 2**20,), jnp.float32)
f = jax.jit(lambda v: jnp.max((v * 2.0 + 1.0)[::-1].reshape(4096, -1).T))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 2**27
for _ in range(16):
  assert float(f(x)) == 3.0
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_eight_calls(mode: str) -> int:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("GLIBC_TUNABLES", None)  # 'default' is glibc's own default.
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       env=env, timeout=120, check=True)
  return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
  default, reuse = _faults_of_eight_calls("default"), _faults_of_eight_calls("reuse")
  # The premise first, so the test can fail: every call faults its 32,768 pages in.
  assert default > 8 * 30_000, default
  # At most one call of eight grows the heap by a block.
  assert reuse < 40_000, (default, reuse)


def test_commands_apply_it_when_the_environment_asks(monkeypatch):
  calls = []
  monkeypatch.setattr(host_allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
  monkeypatch.setattr(console.runpy, "run_module", lambda *a, **k: None)
  monkeypatch.delenv(host_allocator.ENV_VAR, raising=False)
  console.run_command("predict")
  for off in ("0", "false", ""):
    monkeypatch.setenv(host_allocator.ENV_VAR, off)
    console.run_command("predict")
  assert calls == []
  for on in ("1", "On"):
    monkeypatch.setenv(host_allocator.ENV_VAR, on)
    console.run_command("predict")
  assert calls == [1, 1]
