"""The `mobileiqa` command that `pip install` puts on PATH: `mobileiqa <command> [flags] ARGS`.

    mobileiqa predict --checkpoint=MobileNet_IQA.pkl photos/ > scores.csv
    mobileiqa convert --torch_checkpoint=MobileViT_IQA.pkl --output=ckpt/teacher
    mobileiqa train --config=configs/teacher.py:demo
    mobileiqa predict --help                      # the command's flags
    mobileiqa --version

Each command is a module of `mobileiqa_jax.commands` with its absl flags and `main`, the same
code `python launch/<script>.py` runs (the launch/ scripts are shims of `run_command`), so
flags, output and exit statuses are the same either way.

`run_command` is also where a command decides which of jax's platforms it may start: on a
host without a GPU or TPU device, only the CPU (`choose_platforms`). Otherwise jax would
initialise every installed plugin (the `gpu-aot` and `tpu-aot` extras bring the CUDA plugin
and libtpu) and each would print its failure to find a device.

Absl flags are defined when their module runs, so only the chosen command's module is run
(as `__main__`, as `python -m` would): `mobileiqa --help` reads the one-line summaries from
the modules' docstrings without importing them.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import runpy
import sys
from typing import Sequence

from mobileiqa_jax.commands import errors

# Command name -> module of mobileiqa_jax.commands (and the launch/ script that runs it).
COMMANDS = {
    "predict": "predict",            # launch/predict.py
    "convert": "convert",            # launch/convert.py
    "export": "export",              # launch/export.py
    "explain": "explain",            # launch/explain.py
    "evaluate": "evaluate",          # launch/evaluate.py
    "aot": "aot_compile",            # launch/aot_compile.py
    "profile": "model_card",         # launch/model_card.py
    "prepare_data": "prepare_data",  # launch/prepare_data.py
    "train": "train",                # launch/train.py
}
PROG = "mobileiqa"


# Device files whose presence says this host has an accelerator jax could drive: NVIDIA
# (/dev/nvidia0...), AMD (/dev/kfd), Cloud TPU VMs (/dev/accel0... on v2-v4, /dev/vfio/0... on
# v5e and later).
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def choose_platforms(environ: dict[str, str] | None = None) -> str | None:
  """Restricts jax to the CPU on a host without accelerator devices; returns what it set.

  A user's JAX_PLATFORMS is kept as it is. Takes effect before jax starts its backends, also
  when jax is already imported.
  """
  environ = os.environ if environ is None else environ
  if environ.get("JAX_PLATFORMS") or any(glob.glob(p) for p in _ACCELERATOR_DEVICES):
    return None
  environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  return "cpu"


def run_command(name: str, prog: str | None = None) -> None:
  """Runs command `name` as `__main__` with sys.argv[1:] as its flags and arguments.

  Args:
    name: a key of COMMANDS.
    prog: the name its errors start with (default: the running script's file name, e.g.
      `predict.py` for launch/predict.py).
  """
  errors.program_name = prog or os.path.basename(sys.argv[0])
  choose_platforms()
  try:
    # alter_sys: sys.argv[0] becomes the module's file while it runs, which is where absl
    # files the flags it defines, so `--help` lists them.
    runpy.run_module(f"mobileiqa_jax.commands.{COMMANDS[name]}", run_name="__main__",
                     alter_sys=True)
  finally:
    errors.program_name = None


def summary(name: str) -> str:
  """The first line of command `name`'s docstring, read from its source (nothing imported)."""
  spec = importlib.util.find_spec(f"mobileiqa_jax.commands.{COMMANDS[name]}")
  with open(spec.origin, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
  width = max(len(n) for n in COMMANDS)
  lines = [f"usage: {PROG} <command> [flags] [ARGS]   ({PROG} <command> --help: its flags)", "",
           "commands:"]
  lines += [f"  {n:<{width}}  {summary(n)}" for n in COMMANDS]
  lines += ["", f"{PROG} --version prints the package's version."]
  return "\n".join(lines) + "\n"


def _make_configs_importable(args: Sequence[str]) -> None:
  """Puts the folder above a --config file on sys.path: config files import `configs.common`.

  (launch/ scripts put the repository root there; an installed command has no repository.)
  """
  for arg in args:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
      if root not in sys.path:
        sys.path.insert(0, root)


def main(argv: Sequence[str] | None = None) -> None:
  """`mobileiqa <command> ...`; exits with the command's status (2: no or unknown command)."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "-?", "help"):
    (sys.stdout if len(argv) >= 2 else sys.stderr).write(usage())
    raise SystemExit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name in ("--version", "-V", "version"):
    from mobileiqa_jax import __version__  # pylint: disable=g-import-not-at-top
    sys.stdout.write(f"{PROG} {__version__}\n")
    raise SystemExit(0)
  if name not in COMMANDS:
    errors.program_name = PROG
    try:
      errors.fail(f"unknown command {name!r}; the commands are {', '.join(COMMANDS)} "
               f"({PROG} --help says what each does).", status=2)
    finally:
      errors.program_name = None
  saved = sys.argv
  sys.argv = [f"{PROG} {name}", *argv[2:]]
  _make_configs_importable(argv[2:])
  try:
    run_command(name, prog=f"{PROG} {name}")
  finally:
    sys.argv = saved
