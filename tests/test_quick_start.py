"""A quick second run: the compilation cache, the torch-free .pkl reader, batch size.

- A second process scoring as the commands do (JAX's compilation cache on, the program cache
  handed to `load`) compiles nothing: every XLA compile it asks for is a persistent-cache hit
  (counted with jax.monitoring events in the child); and it traces nothing: the model's
  __call__ and the template builder raise there, and the program cache
  (mobileiqa_jax/commands/program_cache.py) answers.
- `load` and `Scorer` change nothing process-wide: every jax.config value is as it was.
- The cache goes to $XDG_CACHE_HOME/mobileiqa_jax/jax by default; --nocompilation_cache (and
  MOBILEIQA_JAX_CACHE_DIR=0) turn it off; a folder set through JAX's own variable is kept.
- Scores do not depend on the batch size (1 vs 8) beyond 1e-6.
- The authors' .pkl is read with numpy: the same arrays as torch.load(weights_only=True), no
  torch imported while scoring, and a pickle that asks for code (os.system) is refused.

Photos: LIVE Challenge JPEGs from ../shared/data/livec_jpg (see its README for the terms).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import data_fixtures
import support

from mobileiqa_jax.commands import compilation_cache
from mobileiqa_jax.weights import convert
from mobileiqa_jax.commands import program_cache
from mobileiqa_jax.weights import torch_pickle
from mobileiqa_jax.models import mobileiqa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = [os.path.join(data_fixtures.LIVEC_IMAGES, f"{n}.JPG") for n in range(1000, 1008)]
SIZE = "64,64"
# A small head (the cache and the reader do not depend on its size); the authors' backbone.
SMALL = dict(pooled_size=8, width=32)

# Run in a fresh process: load, score the photos in batches of 8 and of 1, and report every
# XLA compile it asked for and how many of them the persistent cache answered.
_CHILD = r"""
import json, os, sys
import jax
if os.environ.get("REFUSE_TRACE"):
  # The program cache's promise: shapes and programs come from disk, the model never runs.
  from mobileiqa_jax.weights import convert
  from mobileiqa_jax.models import mobileiqa
  def refuse(*args, **kwargs):
    raise AssertionError("the second process traced the model")
  mobileiqa.MobileIQA.__call__ = refuse
  convert.variables_template = refuse
counts = {"compiles": 0, "hits": 0}
def on_duration(event, duration_secs, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    counts["compiles"] += 1
def on_event(event, **kwargs):
  if event == "/jax/compilation_cache/cache_hits":
    counts["hits"] += 1
jax.monitoring.register_event_duration_secs_listener(on_duration)
jax.monitoring.register_event_listener(on_event)
import mobileiqa_jax
from mobileiqa_jax.commands import compilation_cache, program_cache
compilation_cache.enable()  # what the scoring commands do
scorer = mobileiqa_jax.load(sys.argv[1], image_size=sys.argv[2],
                            programs=program_cache.for_this_process())
s8 = scorer.score(sys.argv[3:], batch_size=8)
s1 = scorer.score(sys.argv[3:], batch_size=1)
print(json.dumps(dict(counts, s8=s8.tolist(), s1=s1.tolist(), torch="torch" in sys.modules,
                      cache=jax.config.jax_compilation_cache_dir)))
"""


def _env(tmp, **extra):
  """A child's environment: none of the caller's cache settings, XDG_CACHE_HOME in `tmp`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE",
                              compilation_cache.ENV_VAR))}
  env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp / "xdg"),
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), **extra)
  return env


def _run(args, env):
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  return proc


def _child(checkpoint, env):
  proc = _run(["-c", _CHILD, checkpoint, SIZE, *PHOTOS], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _entries(folder):
  """Every file under `folder` (JAX's entries and the program cache's subfolder)."""
  return sorted(os.path.relpath(os.path.join(base, f), folder)
                for base, _, files in os.walk(folder) for f in files)


@pytest.fixture(scope="module")
def student_pkl(tmp_path_factory):
  """A small random student, saved the authors' way (torch.save of its state dict)."""
  pytest.importorskip("torch")
  model = mobileiqa.build_model(mobileiqa.model_config("student", **SMALL))
  return support.save_authors_pkl(
      model, str(tmp_path_factory.mktemp("quick_start") / "MobileNet_IQA.pkl"))


def test_second_process_compiles_nothing_and_batch_size_does_not_matter(student_pkl,
                                                                         tmp_path):
  env = _env(tmp_path)
  folder = compilation_cache.default_dir(env)
  first = _child(student_pkl, env)
  assert first["cache"] == folder
  assert first["compiles"] >= 2 and first["hits"] == 0, first  # batch 8 and batch 1
  written = _entries(folder)
  assert written, "the first run wrote nothing to the cache"
  # Scoring the authors' kind of file imported no torch.
  assert first["torch"] is False
  np.testing.assert_allclose(first["s1"], first["s8"], rtol=0, atol=1e-6)
  assert np.std(first["s8"]) > 0  # the photos got different scores

  programs = [n for n in written if n.startswith(program_cache.SUBFOLDER + os.sep)]
  assert len(programs) == 3, written  # the template, the programs of batch 8 and 1

  # The second process neither traces the model nor builds its template (REFUSE_TRACE).
  second = _child(student_pkl, dict(env, REFUSE_TRACE="1"))
  assert second["compiles"] == second["hits"] >= 2, second  # every compile was a cache hit
  assert _entries(folder) == written  # nothing new written
  np.testing.assert_array_equal(second["s8"], first["s8"])


_UNCHANGED_CHILD = r"""
import json, sys
import jax
before = {k: repr(v) for k, v in jax.config.values.items()}
import mobileiqa_jax
scorer = mobileiqa_jax.load(sys.argv[1], image_size=sys.argv[2])
scores = scorer.score(sys.argv[3:])
after = {k: repr(v) for k, v in jax.config.values.items()}
print(json.dumps({"changed": {k: [before.get(k), after.get(k)] for k in set(before) | set(after)
                              if before.get(k) != after.get(k)},
                  "scores": scores.tolist()}))
"""


def test_load_and_score_change_no_jax_setting(student_pkl, tmp_path):
  proc = _run(["-c", _UNCHANGED_CHILD, student_pkl, SIZE, *PHOTOS[:2]], _env(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  # Neither the compilation cache nor CPU dispatch nor anything else of jax's config.
  assert got["changed"] == {}, got["changed"]
  assert len(got["scores"]) == 2
  assert not os.path.exists(tmp_path / "xdg")  # and no cache folder written


@pytest.mark.slow  # a command process (~10 s)
def test_nocompilation_cache_flag_writes_no_cache(student_pkl, tmp_path):
  env = _env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_own"))
  proc = _run(["launch/predict.py", f"--checkpoint={student_pkl}", f"--image_size={SIZE}",
               "--noprogress", "--nocompilation_cache", PHOTOS[0]], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.reader(io.StringIO(proc.stdout)))
  assert rows[0] == ["path", "score"] and rows[1][0] == PHOTOS[0]
  # Off means off: neither the default folder nor the one JAX's own variable names.
  assert not os.path.exists(tmp_path / "xdg") and not os.path.exists(tmp_path / "jax_own")


def test_where_the_cache_goes():
  resolve = compilation_cache.resolve
  assert resolve(environ={"XDG_CACHE_HOME": "/x"}) == "/x/mobileiqa_jax/jax"
  assert resolve(environ={"HOME": "/h"}).endswith(os.path.join(".cache", "mobileiqa_jax", "jax"))
  # JAX's own setting is respected, ours wins over it, '' and '0' turn it off.
  assert resolve(environ={"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/x"}) == "/j"
  assert resolve(environ={"XDG_CACHE_HOME": "/x"}, jax_configured="/c") == "/c"
  assert resolve(environ={"MOBILEIQA_JAX_CACHE_DIR": "/m", "JAX_COMPILATION_CACHE_DIR": "/j"}) == (
      "/m")
  for off in ("", "0"):
    assert resolve(environ={"MOBILEIQA_JAX_CACHE_DIR": off, "JAX_COMPILATION_CACHE_DIR": "/j"}) is None
    assert resolve(off, environ={"MOBILEIQA_JAX_CACHE_DIR": "/m"}) is None
  # The launcher's flags: an explicit folder, off, or the environment's choice.
  assert resolve("/f", environ={"MOBILEIQA_JAX_CACHE_DIR": "/m"}) == "/f"
  assert compilation_cache.flag_choice("/f", True) == "/f"
  assert compilation_cache.flag_choice("/f", False) == ""
  assert compilation_cache.flag_choice(None, True) is compilation_cache.AUTO


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_asks_for_code_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  plain = tmp_path / "evil.pkl"
  plain.write_bytes(pickle.dumps({"local_cnn.conv_stem.weight": _Evil(marker)}))
  # The same inside a torch.save-style zip (what the authors' .pkl is).
  zipped = tmp_path / "evil_zip.pth"
  with zipfile.ZipFile(zipped, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(collections.OrderedDict(w=_Evil(marker))))
    z.writestr("archive/byteorder", "little")
  for path in (plain, zipped):
    with pytest.raises(convert.ConversionError) as err:
      convert.load_state_dict(path)
    message = str(err.value)
    assert str(path) in message and "refused" in message and "system" in message, message
    assert not marker.exists()

  # On the command line: one line naming the file, a non-zero exit, nothing run.
  proc = _run(["launch/predict.py", f"--checkpoint={plain}", PHOTOS[0]], _env(tmp_path))
  assert proc.returncode == 1 and not marker.exists()
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and str(plain) in lines[0] and "refused" in lines[0], proc.stderr


def test_numpy_reader_equals_torch_load(tmp_path):
  torch = pytest.importorskip("torch")
  base = torch.randn(6, 8)
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  net[1].num_batches_tracked += 5
  saved = collections.OrderedDict(net.state_dict())  # OrderedDict with _metadata, int64 counter
  saved.update({
      "half": torch.randn(3, 5).half(),
      "bfloat16": torch.randn(7).bfloat16(),
      "int32": torch.arange(-3, 4, dtype=torch.int32),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(2.5, dtype=torch.float64),
      "empty": torch.zeros(0, 3),
      # Views of one storage: transposed (strided), offset, strided with offset; shared.
      "base": base, "transposed": base.t(), "offset": base[2], "strided": base[1:, ::3],
  })
  path = tmp_path / "state.pth"
  torch.save(saved, path)
  got = torch_pickle.load(path)
  want = torch.load(path, map_location="cpu", weights_only=True)
  assert list(got) == list(want)
  for key, tensor in want.items():
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    value = got[key].astype(np.float32) if key == "bfloat16" else got[key]
    assert value.dtype == expected.dtype and value.shape == expected.shape, key
    np.testing.assert_array_equal(value, expected, err_msg=key)
  assert got["1.num_batches_tracked"].dtype == np.int64 and got["1.num_batches_tracked"] == 5
  # Views of one storage share it, as torch.load's tensors do.
  for state in (got, want):
    state["base"][0, 1] = 1e6
    assert state["transposed"][1, 0] == 1e6 and state["offset"][1] != 1e6

  # convert reads the same (and unwraps {'state_dict': ...}).
  torch.save({"state_dict": {"a": base}}, tmp_path / "wrapped.pkl")
  np.testing.assert_array_equal(convert.load_state_dict(tmp_path / "wrapped.pkl")["a"],
                                base.numpy())
  # The pre-1.6 format is named, not misread.
  torch.save({"a": base}, tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
  with pytest.raises(convert.ConversionError, match="not a torch.save zip"):
    convert.load_state_dict(tmp_path / "legacy.pkl")


def test_a_command_on_a_cpu_host_starts_quietly_with_the_accelerator_plugins(student_pkl,
                                                                             tmp_path):
  # The gpu-aot and tpu-aot extras install jax's CUDA plugin and libtpu; on a host without
  # such a device the command must not print their failures to find one.
  import importlib.util  # pylint: disable=g-import-not-at-top
  if not (importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu")):
    pytest.fail("install the gpu-aot and tpu-aot extras (as .ci/run does) for this test")
  env = _env(tmp_path)
  env.pop("JAX_PLATFORMS")  # as a user's shell has it
  proc = _run(["launch/predict.py", f"--checkpoint={student_pkl}", f"--image_size={SIZE}",
               "--noprogress", PHOTOS[0]], env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for noise in ("Traceback", "cuInit", "TPU_WORKER_HOSTNAMES", "plugin configuration error",
                "INVALID_ARGUMENT"):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[1].startswith(PHOTOS[0])
