"""Test-session set-up shared by every test file.

- JAX_PLATFORMS=cpu for this process and (inherited through `support.python_env`) every
  subprocess: CI installs libtpu, and without it each process would probe for a TPU at start-up.
  The TPU compile tests (test_aot) get their topologies from libtpu without a TPU backend.
- EPATH_USE_TF=false: gs:// paths through gcsfs (the emulators of `bucket_servers`).
- One persistent compilation cache for the session and its subprocesses, set before any test
  module imports jax: tests and subprocesses compile the same tiny programs again (fresh jit
  closures, launchers), and an XLA:CPU compile costs seconds to tens of seconds on 2 cores. It
  lives under the pytest cache (cold in a clean clone; `pytest --cache-clear` empties it).
"""

import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
# etils decides once per process (and caches) whether gs:// paths go through tf.io.gfile,
# which ignores the GCS emulator (conftest.bucket_servers); the first gs:// path may come
# from any import (tfds names its own bucket), so it is set before anything runs.
os.environ["EPATH_USE_TF"] = "false"

# Loading triton's extension (torch imports it, e.g. through timm) after TensorFlow's crashes
# the process with a segmentation fault (torch 2.14 / triton 3.8 / TF 2.21); the other order
# is fine. Tests import both (the PyTorch reference, tfds preparation, TFLite export), so load
# the PyTorch side first when it is installed.
try:
  import torch  # noqa: F401  pylint: disable=unused-import
  import triton  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass

import pytest  # pylint: disable=g-import-not-at-top


def pytest_configure(config):
  cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
  if cache is not None:
    cache_dir = str(cache.mkdir("jax_compilation_cache"))
  else:
    cache_dir = tempfile.mkdtemp(prefix="mobileiqa_jax_xla_cache_")
  # Environment variables reach the subprocesses; jax reads them when it is imported.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  # Scoring's own cache (mobileiqa_jax/commands/compilation_cache.py) goes there too, not to ~/.cache.
  os.environ["MOBILEIQA_JAX_CACHE_DIR"] = cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  import jax  # pylint: disable=g-import-not-at-top
  # In case a plugin imported jax before this ran.
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture
def fast_compile():
  """XLA's optimisation passes off while a test runs (much faster CPU compiles).

  Only for tests whose tolerances were checked to hold unoptimised: the numbers differ in
  rounding (fewer fusions reorder float32 sums), never in what is computed.
  """
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def bucket_servers():
  """fake-gcs-server and moto's S3 server for the session (tests/buckets.py), each with a
  bucket ("gs://mobileiqa-test", "s3://mobileiqa-test"); the clients' variables are set in
  this process's environment (and so its subprocesses') while they run."""
  import buckets  # pylint: disable=g-import-not-at-top
  servers = buckets.Servers().start()
  before = buckets.apply_env(servers.env)
  try:
    servers.make_bucket("gs://mobileiqa-test")
    servers.make_bucket("s3://mobileiqa-test")
    yield servers
  finally:
    buckets.restore_env(before)
    servers.stop()


@pytest.fixture
def shared_train_steps(monkeypatch):
  """train.build_steps memoised for the session (support.memoized_build_steps)."""
  import support  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.training import trainer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(trainer, "build_steps", support.memoized_build_steps(trainer.build_steps))


# The heaviest test files first (seconds on the 2-core VM, 2026-12-03, one process, under
# load): with `--dist loadfile` the two workers take files in this order as they free up, so
# the long ones start at once and the short ones fill in at the end (longest first is what
# keeps the two workers finishing together). A file not listed keeps its collection order after
# these; a stale entry only changes the order, never what runs.
HEAVY_FIRST = (
    "test_train.py",         # 224 s: trainer runs, sharing compiled steps
    "test_aot_gpu.py",       # 200 s: deviceless GPU compiles
    "test_sharding.py",      # 193 s: 8-device and two-process subprocesses
    "test_device_check.py",  # 169 s: the GPU script's processes at toy size
    "test_convert.py",       # 154 s: .pkl round trips against PyTorch
    "test_train_torch.py",   # 148 s: distillation against PyTorch
    "test_aot.py",           # 124 s: TPU compiles
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
