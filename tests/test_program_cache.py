"""The program cache (mobileiqa_jax/commands/program_cache.py): what it keeps, when it misses.

- A `Function` writes one exported program per input signature; a new `Function` (as in a new
  process) runs it without exporting again, with the same result as plain `jax.jit`.
- A corrupt entry is a miss: logged, exported and written again, the result unchanged.
- A description holding an object's address is never cached; with the cache off nothing is
  written.
- `template` builds once per config, then reads the shapes back equal.
- The key changes with the package's sources, the description, the shapes and jax's
  matmul-precision setting.

The whole-process check (a second `launch/predict.py` traces nothing) is in test_quick_start.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobileiqa_jax.commands import program_cache


def _fn(v, x):
  return jnp.tanh(x @ v["w"] + v["b"]).sum(-1)


def _inputs(batch=3):
  rng = np.random.default_rng(0)
  v = {"w": rng.normal(size=(5, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
  return v, rng.normal(size=(batch, 5)).astype(np.float32)


@pytest.fixture
def folder(tmp_path):
  return str(tmp_path / program_cache.SUBFOLDER)


def _entries(where):
  return sorted(os.listdir(where)) if os.path.isdir(where) else []


def test_a_new_function_runs_the_written_program_without_exporting(folder, monkeypatch):
  v, x = _inputs()
  want = np.asarray(jax.jit(_fn)(v, x))
  first = program_cache.Function(_fn, {"function": "test"}, folder)
  np.testing.assert_array_equal(np.asarray(first(v, x)), want)
  np.testing.assert_array_equal(np.asarray(first(v, _inputs(2)[1])).shape, (2,))
  written = _entries(folder)
  assert len(written) == 2 and all(n.endswith(".exported") for n in written), written

  def refuse(*args, **kwargs):
    raise AssertionError("exported again although the entry was on disk")

  monkeypatch.setattr(jax.export, "export", refuse)
  again = program_cache.Function(_fn, {"function": "test"}, folder)
  np.testing.assert_array_equal(np.asarray(again(v, x)), want)
  assert _entries(folder) == written


def test_a_corrupt_entry_is_exported_again(folder, caplog):
  v, x = _inputs()
  program_cache.Function(_fn, {"function": "corrupt"}, folder)(v, x)
  (name,) = _entries(folder)
  path = os.path.join(folder, name)
  with open(path, "wb") as f:
    f.write(b"not a program")
  with caplog.at_level(logging.WARNING):
    got = program_cache.Function(_fn, {"function": "corrupt"}, folder)(v, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(_fn)(v, x)), rtol=1e-6)
  assert any(name in r.getMessage() for r in caplog.records), caplog.text
  assert os.path.getsize(path) > len(b"not a program")  # written again, whole


def test_uncacheable_descriptions_and_the_cache_off_write_nothing(folder, monkeypatch):
  v, x = _inputs()
  program_cache.Function(_fn, {"module": f"<object at {hex(id(v))}>"}, folder)(v, x)
  program_cache.Function(_fn, None, folder)(v, x)
  assert _entries(folder) == []
  # With JAX's compilation cache off, the commands get no program cache at all.
  monkeypatch.setattr(program_cache.compilation_cache, "current", lambda: None)
  assert program_cache.for_this_process() is None


def test_template_is_built_once_per_config(folder):
  built = []
  shapes = {"params": {"a": {"kernel": jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32)}},
            "batch_stats": {"a": {"mean": jax.ShapeDtypeStruct((16,), jnp.float32)}}}

  def build():
    built.append(1)
    return shapes

  assert program_cache.template(folder, {"width": 8}, build) is shapes
  again = program_cache.template(folder, {"width": 8}, build)
  assert len(built) == 1
  assert jax.tree.structure(again) == jax.tree.structure(shapes)
  assert jax.tree.leaves(again) == jax.tree.leaves(shapes)
  program_cache.template(folder, {"width": 16}, build)  # another config: its own entry
  assert len(built) == 2


def test_the_key_follows_sources_description_and_shapes(tmp_path):
  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "net.py").write_text("WIDTH = 8\n")
  before = program_cache.source_fingerprint(str(tmp_path))
  (tmp_path / "models" / "net.py").write_text("WIDTH = 9\n")
  edited = program_cache.source_fingerprint.__wrapped__(str(tmp_path))
  assert edited != before
  # Only Python sources count: a data file beside them changes nothing.
  (tmp_path / "notes.txt").write_text("x")
  assert program_cache.source_fingerprint.__wrapped__(str(tmp_path)) == edited
  k = program_cache.key("scoring", {"module": "A", "avals": [[1, 64, 64, 3]]})
  assert k == program_cache.key("scoring", {"module": "A", "avals": [[1, 64, 64, 3]]})
  assert k != program_cache.key("scoring", {"module": "B", "avals": [[1, 64, 64, 3]]})
  assert k != program_cache.key("scoring", {"module": "A", "avals": [[2, 64, 64, 3]]})
  # A jax setting that changes the trace (the default dot precision) is part of the key too.
  with jax.default_matmul_precision("highest"):
    assert k != program_cache.key("scoring", {"module": "A", "avals": [[1, 64, 64, 3]]})
