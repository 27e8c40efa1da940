"""The package as users get it: a wheel built from pyproject.toml holds the whole package.

The wheel is built from a copy of the source files a build reads (pyproject.toml, setup.py,
README.md, LICENSE, mobileiqa_jax/), so a stale `build/` folder in the checkout cannot hide a
missing sub-package, and the checkout is left untouched. `--no-build-isolation --no-deps`
uses the installed setuptools and needs no network (about a second).
"""

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import mobileiqa_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "mobileiqa_jax")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(PACKAGE, src / "mobileiqa_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  out = tmp_path_factory.mktemp("wheel")
  result = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
       "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  wheels = list(out.glob("*.whl"))
  assert len(wheels) == 1, wheels
  with zipfile.ZipFile(wheels[0]) as zf:
    yield zf


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
  name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
  return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_wheel_holds_every_module_of_the_package(wheel):
  expected = set()
  for root, dirs, files in os.walk(PACKAGE):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    rel = os.path.relpath(root, REPO)
    expected |= {os.path.join(rel, f).replace(os.sep, "/") for f in files if f.endswith(".py")}
  names = set(wheel.namelist())
  assert "mobileiqa_jax/models/mobileiqa.py" in expected  # The walk found the package.
  assert expected <= names, sorted(expected - names)
  # Only the package: no tests, launchers or configs at the wheel's top level.
  tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert tops == {"mobileiqa_jax"}, tops


def test_wheel_metadata_version_license_and_extras(wheel):
  meta = _metadata(wheel)
  assert meta["Name"] == "mobileiqa_jax"
  # The version is written once, in mobileiqa_jax/__init__.py, and the wheel reads it there.
  assert meta["Version"] == mobileiqa_jax.__version__
  assert meta["License-Expression"] == "Apache-2.0"
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())
  assert meta["Requires-Python"] == ">=3.10"
  # CI installs these extras by name (.ci/run); gpu-aot is for deviceless GPU compiles.
  assert set(meta.get_all("Provides-Extra")) >= {"test", "torch", "tf", "tpu-aot", "gpu-aot"}
  assert "Paper, https://arxiv.org/abs/2409.01212" in meta.get_all("Project-URL")


def test_version_is_importable_without_jax():
  code = ("import sys, mobileiqa_jax; print(mobileiqa_jax.__version__); "
          "print('jax' in sys.modules)")
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, check=True).stdout.split()
  assert out == [mobileiqa_jax.__version__, "False"]


def test_wheel_installs_the_mobileiqa_command(wheel):
  name = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
  text = wheel.read(name).decode()
  assert "[console_scripts]" in text and "mobileiqa = mobileiqa_jax.commands.dispatch:main" in text


def test_console_lists_commands_and_rejects_unknown_ones(capsys):
  from mobileiqa_jax.commands import dispatch  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    dispatch.main(["mobileiqa", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert all(f"  {n}" in out for n in ("predict", "convert", "export", "explain", "evaluate",
                                       "aot"))
  with pytest.raises(SystemExit) as e:
    dispatch.main(["mobileiqa", "nope"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and "unknown command 'nope'" in err
