"""Helpers shared by the test files: not a test file itself.

- `REPO`, `TESTS`: where the repository and its tests are.
- `run_python`, `python_env`: the one way tests start Python subprocesses (one environment:
  the repository and tests/ on PYTHONPATH, JAX_PLATFORMS=cpu and conftest's compilation cache
  inherited from this process).
- `run_launcher`: a launch/ command's `__main__` in this process (no interpreter start).
- `run_peers`, `free_port`: the processes of one multi-process job, started together.
- `rel_err`: max |got - ref| / max |ref|, the parity measure of the model tests.
- `random_variables`, `save_authors_pkl`: random weights of a model's shapes, as Flax
  variables or an authors'-format `.pkl` (`mobileiqa_jax.weights.synthetic`'s).
- `randomize_torch`: non-trivial norms and biases for a PyTorch / timm module.
- `tiny_config`, `tiny_data`, `SMALLEST`: the tiny training settings.
- `IMAGENET_MEAN`, `IMAGENET_STD`: the reference's normalisation, written out here so that the
  preprocessing tests do not read the constants of the code they test.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import socket
import subprocess
import sys
import traceback
from typing import Any, Sequence

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import student as student_config  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import teacher as teacher_config  # noqa: E402  pylint: disable=g-import-not-at-top
# Random weights of a model's shapes, for the tests that import them from here.
from mobileiqa_jax.weights import synthetic  # noqa: E402  pylint: disable=g-import-not-at-top

random_variables = synthetic.random_variables
save_authors_pkl = synthetic.save_authors_pkl


# ---------------------------------------------------------------------------- subprocesses


def python_env(**extra: str) -> dict[str, str]:
  """The environment of every Python subprocess a test starts.

  This process's environment (conftest put JAX_PLATFORMS=cpu and the compilation cache in it)
  plus the repository and tests/ first on PYTHONPATH: the editable install may point at
  another checkout, and scripts run with `-c` import the test helpers.
  """
  env = dict(os.environ, **extra)
  env["JAX_PLATFORMS"] = "cpu"  # also when a caller's environment says otherwise: no TPU probe
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO, TESTS, os.environ.get("PYTHONPATH", "")) if p)
  return env


def run_python(args: Sequence[str], *, timeout: float = 600, env: dict[str, str] | None = None,
               cwd: str = REPO) -> subprocess.CompletedProcess:
  """`python *args` from the repository root, output captured as text."""
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env or python_env(),
                        capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_peers(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], log_dir: Any,
              *, timeout: float = 900, cwd: str = REPO) -> list[subprocess.CompletedProcess]:
  """Starts the processes of one job together and waits for all of them.

  Each one's stdout and stderr go to files in `log_dir` (`peer{i}.out`, `peer{i}.err`), read
  back into the results. Why files, not pipes: while a test waits on one peer, another that
  fills its pipe (jax logs a lot to stderr) blocks, and with it the job (seen once: 36
  minutes). Any peer still running when this returns or raises is killed: a peer whose
  partner died would wait for it until jax's own timeout.
  """
  procs, files = [], []
  try:
    for i, (command, env) in enumerate(zip(commands, envs, strict=True)):
      out = open(os.path.join(log_dir, f"peer{i}.out"), "w+")  # pylint: disable=consider-using-with
      err = open(os.path.join(log_dir, f"peer{i}.err"), "w+")  # pylint: disable=consider-using-with
      files.append((out, err))
      procs.append(subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out, stderr=err,
                                    text=True))
    for p in procs:
      p.wait(timeout=timeout)
    results = []
    for p, (out, err) in zip(procs, files):
      out.seek(0)
      err.seek(0)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
    return results
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for out, err in files:
      out.close()
      err.close()


def run_launcher(script: str, args: Sequence[str]) -> subprocess.CompletedProcess:
  """Runs `python script *args` in this process, as `runpy` runs a file as `__main__`.

  For tests of what a command prints and returns: no interpreter start and no second import of
  jax and TensorFlow, which cost more than most commands' own work. The exit status is the
  SystemExit's code (1 with the traceback on stderr for another exception, as an interpreter
  exits); stdout and stderr are what Python code wrote to sys.stdout/sys.stderr (not native
  logs). The absl flags the script defines are removed afterwards and the flag
  values unparsed, so that the next command can define its own.
  """
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, script)
  argv, environ, out, err = sys.argv, dict(os.environ), io.StringIO(), io.StringIO()
  # What the commands' quiet mode (commands.errors.quiet_logs) changes for the process.
  verbosity, root_level = logging.get_verbosity(), std_logging.getLogger().level
  code: Any = 0
  flags_before = set(flags.FLAGS)
  sys.argv = [path, *args]
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
        warnings.catch_warnings():
      try:
        runpy.run_path(path, run_name="__main__")
      except SystemExit as e:
        code = e.code
      except Exception:  # pylint: disable=broad-except
        traceback.print_exc()  # as the interpreter would, exiting 1
        code = 1
  finally:
    sys.argv = argv
    os.environ.clear()
    os.environ.update(environ)
    logging.set_verbosity(verbosity)
    std_logging.getLogger().setLevel(root_level)
    # Remove what the run defined: the script's flags (absl files them under its path) and the
    # config overrides ml_collections creates while parsing (filed under absl.flags._flag);
    # flags of library modules the run imported for the first time stay, as their modules do.
    library = {f.name for module, defined in flags.FLAGS.flags_by_module_dict().items()
               if module in sys.modules and module != "absl.flags._flag" for f in defined}
    for name in set(flags.FLAGS) - flags_before - library:
      if name in flags.FLAGS:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
  if code is None:
    code = 0
  elif not isinstance(code, int):  # sys.exit("message") prints the message and exits 1
    err.write(f"{code}\n")
    code = 1
  return subprocess.CompletedProcess([path, *args], code, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------------------- numerics


def _numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().numpy()
  return np.asarray(x, np.float64)


def nchw_to_nhwc(x) -> np.ndarray:
  """A torch (..., C, H, W) tensor or array as numpy (..., H, W, C)."""
  return np.moveaxis(_numpy(x), -3, -1)


def rel_err(got, ref) -> float:
  """max |got - ref| / max |ref| in float64; arrays or torch tensors of the same shape."""
  got, ref = _numpy(got), _numpy(ref)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def randomize_torch(module, seed: int = 0, conv_bias: bool = True):
  """Non-trivial weights for parity tests, in place; returns `module`.

  Fresh 0/1 norms and zero biases hide bugs (a swapped mean/var, a dropped bias): BatchNorm and
  GroupNorm affine and BatchNorm running statistics, parameters named `gamma` and (with
  `conv_bias`) conv biases are drawn from a seeded generator. Other weights keep PyTorch's
  (seeded by the caller) init. `conv_bias=False` keeps the draws of the head reference's tests.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)

  def u(shape, lo, hi):
    return torch.rand(shape, generator=g) * (hi - lo) + lo

  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.split(".")[-1] == "gamma":
        p.copy_(u(p.shape, 0.5, 1.5))
    for m in module.modules():
      if isinstance(m, nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
        m.weight.copy_(u(m.weight.shape, 0.5, 1.5))
        m.bias.copy_(u(m.bias.shape, -0.2, 0.2))
        m.running_mean.copy_(u(m.running_mean.shape, -0.2, 0.2))
        m.running_var.copy_(u(m.running_var.shape, 0.5, 1.5))
      elif isinstance(m, nn.GroupNorm) and m.affine:
        m.weight.copy_(u(m.weight.shape, 0.5, 1.5))
        m.bias.copy_(u(m.bias.shape, -0.2, 0.2))
      elif conv_bias and isinstance(m, nn.Conv2d) and m.bias is not None:
        m.bias.copy_(u(m.bias.shape, -0.2, 0.2))
  return module


# ---------------------------------------------------------------------------- tiny training

# Fewest operations that still exercise every part (backbone stages, one MAL, the LDAs and
# the regressor): the multi-device tests compile several steps, and XLA:CPU's compile time
# grows with the number of operations, not with the tiny images.
# torchvision's ImageNet statistics, as the authors' transforms.Normalize uses them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SMALLEST = {"model.num_mals": 1, "model.backbone_kwargs": {"depth_multiplier": 0.1}}


def tiny_config(kind: str = "teacher", backbone: str = "mobilenetv3_small_050", **overrides):
  """A teacher or student demo config shrunk to run a step in well under a second.

  The backbone defaults to the smallest MobileNetV3 for both kinds (fastest to compile);
  the teacher test passes mobilevitv2_050. Depthwise convs as grouped convs: XLA:CPU
  compiles them several times faster than the shifted form.
  """
  c = (teacher_config if kind == "teacher" else student_config).get_config("demo")
  c.model.backbone = backbone
  c.depthwise_impl = "conv"
  c.model.width = 16
  c.model.pooled_size = 6
  c.model.regressor_pool = 2
  c.model.dropout_rate = 0.1
  c.teacher_checkpoint = ""
  c.data.image_size = (32, 32)
  c.data.train_crop = (0, 0)
  c.batch_size = 8
  c.data.eval_batch_size = 8
  c.num_epochs = 2
  c.eval_every_epochs = 3  # a test run evaluates at its last epoch, not after each one
  c.log_every_steps = 1
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.progress_bar = False
  c.scatter_plot = False
  c.optimizer.lr = 1e-3
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def tiny_data(config, n_train: int = 24, n_eval: int = 12, seed: int = 0, **kwargs):
  """In-memory random images whose MOS is a smooth function of them (learnable, not constant)."""
  from mobileiqa_jax.training import train_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  h, w = config.data.image_size
  x = rng.normal(size=(n_train + n_eval, h, w, 3)).astype(np.float32)
  blur = np.linspace(0.0, 1.0, n_train + n_eval, dtype=np.float32)
  rng.shuffle(blur)
  x = x * (1.0 - 0.8 * blur[:, None, None, None])
  mos = (1.0 - blur).astype(np.float32)
  return train_data.from_arrays(x[:n_train], mos[:n_train], x[n_train:], mos[n_train:], config,
                         **kwargs)


# What train.train_and_evaluate reads of a config besides build_steps: the training loop's
# length, logging and checkpointing, and the teacher's path (its module is passed separately).
_LOOP_ONLY_KEYS = ("num_epochs", "max_steps", "log_every_steps", "eval_every_epochs",
                   "checkpoint", "scatter_plot", "progress_bar", "teacher_checkpoint")
_STEPS_MEMO: dict[str, Any] = {}


def memoized_build_steps(build_steps):
  """`train.build_steps` memoised on everything it reads: tests share compiled steps.

  Each call of the real function makes fresh jit closures, so every run would trace and
  compile (or load from the persistent cache) its steps again. The key is the whole config but
  for `_LOOP_ONLY_KEYS`, the mesh, steps per epoch and the teacher module. The steps are
  stateless (state and batches are arguments), so sharing them changes no result.
  """

  def build(config, mesh, steps_per_epoch, teacher=None, runtime=None):
    plain = config.to_dict()
    for k in _LOOP_ONLY_KEYS:
      plain.pop(k, None)
    key = repr((sorted(plain.items(), key=lambda kv: kv[0]), mesh.shape_tuple,
                [d.id for d in mesh.devices.flat], steps_per_epoch, repr(teacher),
                repr(runtime)))
    if key not in _STEPS_MEMO:
      _STEPS_MEMO[key] = build_steps(config, mesh, steps_per_epoch, teacher, runtime)
    return _STEPS_MEMO[key]

  return build
