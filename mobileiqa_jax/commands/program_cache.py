"""Scoring programs kept on disk, so that a second scoring command neither traces nor shapes.

JAX's compilation cache (`compilation_cache.py`) spares a second process XLA's compile, but
that process still runs the Flax model in Python twice before its first score: once through
`jax.eval_shape` to learn the variables' shapes for converting a state dict, once to trace and
lower the scoring function. For the one-photo command that is over a third of a second run.
`ProgramCache` (a `scoring.scorer.Programs`, handed to `load` by the scoring commands) keeps
both results in the compilation cache's folder, under `mobileiqa_programs/`:

- `variables_template(config, build)`: the variables' shapes of a model config, as JSON;
- `jit(fn, description)`: a jitted `fn(variables, x)` whose traced and lowered form is kept
  as a serialized `jax.export.Exported`, one per input shape; a later process deserialises
  it and JAX compiles it, from the compilation cache.

An entry's key is everything that decides it: what the caller describes (the module's
`repr`, which lists every field of the architecture and of how it runs, and what the function
does with it), the input and variable shapes and dtypes, the platform, the jax, jaxlib and
flax versions and a hash of this package's source files. An edited model, a new jax or another
platform misses and writes a new entry; nothing stale is ever run. An entry that cannot be
read is a miss, logged, and written again.

Only the commands use it, and only while they have JAX's compilation cache on
(`for_this_process`): one folder, one switch. A Python program calling `load` gets plain
`jax.jit` unless it passes a `ProgramCache` itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Any, Callable, Mapping

from mobileiqa_jax import storage
from mobileiqa_jax.commands import compilation_cache
from mobileiqa_jax.scoring import scorer

SUBFOLDER = "mobileiqa_programs"
# The package's root folder: its sources decide what a cached program computes.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ProgramCache(scorer.Programs):
  """`scorer.Programs` whose results live in `directory` (module docstring)."""

  def __init__(self, directory: str):
    self.directory = directory

  def variables_template(self, config: Mapping[str, Any], build: Callable[[], Any]) -> Any:
    return template(self.directory, config, build)

  def jit(self, fn: Callable[[Any, Any], Any],
          description: Mapping[str, Any]) -> Callable[[Any, Any], Any]:
    return Function(fn, description, self.directory)


def for_this_process() -> ProgramCache | None:
  """The cache in `<compilation cache>/mobileiqa_programs`; None while that cache is off."""
  directory = compilation_cache.current()
  return None if directory is None else ProgramCache(os.path.join(directory, SUBFOLDER))


@functools.lru_cache(maxsize=None)
def source_fingerprint(root: str = _PACKAGE) -> str:
  """sha256 over the relative paths and bytes of every .py file under `root` (this package).

  What a cached program computes is decided by this code (the model, the preprocessing, the
  scoring function) and by the libraries whose versions the key holds; hashing the whole
  package, ~0.5 MB, takes a few milliseconds and leaves no file out by mistake.
  """
  digest = hashlib.sha256()
  for base, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(base, name)
      digest.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        digest.update(f.read() + b"\0")
  return digest.hexdigest()


def key(kind: str, parts: Mapping[str, Any]) -> str:
  """The entry name for `parts` (JSON-able), with the library versions and the source hash."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  # The two jax settings that change what a trace produces (dtypes, dot precision).
  described = dict(parts, kind=kind, jax=jax.__version__, jaxlib=jaxlib.__version__,
                   flax=flax.__version__, source=source_fingerprint(),
                   x64=bool(jax.config.jax_enable_x64),
                   precision=str(jax.config.jax_default_matmul_precision))
  blob = json.dumps(described, sort_keys=True, default=str).encode()
  return f"{kind}-{hashlib.sha256(blob).hexdigest()[:32]}"


def _read(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    logging.warning("program cache: cannot read %s (%s); building it again.", path, e)
    return None


def _write(path: str, data: bytes) -> None:
  """Writes whole or not at all (a temporary file renamed), so a reader never sees half."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_atomic(path, data)
  except OSError as e:
    # A read-only or full disk costs the next process time, never this one its result.
    logging.warning("program cache: cannot write %s (%s); the next run builds it again.",
                    path, e)


def template(directory: str, config: Mapping[str, Any], build: Callable[[], Any]) -> Any:
  """The variables' shapes (`jax.ShapeDtypeStruct` leaves) of the model of `config`.

  Args:
    directory: the cache's folder.
    config: the model's architecture (`MobileIQAConfig.to_dict()`); a runtime never changes
      the variables' shapes.
    build: computes the template when it is not cached (`convert.variables_template`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  path = os.path.join(directory, key("template", {"config": dict(config)}) + ".json")
  data = _read(path)
  if data is not None:
    try:
      return _unflatten({k: jax.ShapeDtypeStruct(tuple(s), np.dtype(d))
                         for k, (s, d) in json.loads(data).items()})
    except (ValueError, TypeError, KeyError) as e:
      logging.warning("program cache: %s is not a template (%s); building it again.", path, e)
  shapes = build()
  flat = {"/".join(p): [list(l.shape), str(l.dtype)] for p, l in _flatten(shapes).items()}
  _write(path, json.dumps(flat).encode())
  return shapes


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (name,)))
    else:
      out[prefix + (name,)] = value
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return out


class Function:
  """`jax.jit(fn)` for `fn(variables, x)`, whose traced program a later process reuses.

  Each new (variables, x) signature is looked up on disk; a hit is deserialised and called
  (`jax.jit(exported.call)`), a miss is exported (`jax.export`: the trace and lowering `jit`
  would do anyway), written, and called the same way, so a first and a second process run
  the same program. Without a usable `description` it is plain `jax.jit`.

  Args:
    fn: a pure function of (a pytree of arrays, an array).
    description: what decides `fn`'s program besides the package's code and the shapes:
      e.g. the module's repr and the name of the method. None: never cached.
    directory: the cache's folder.
  """

  def __init__(self, fn: Callable[[Any, Any], Any], description: Mapping[str, Any] | None,
               directory: str):
    self._fn = fn
    self._directory = directory
    # A repr that holds an object's address differs in every process: it can never hit.
    self._description = (None if description is None or "0x" in json.dumps(
        dict(description), sort_keys=True, default=str) else dict(description))
    self._jitted = None
    self._calls: dict[Any, Callable[[Any, Any], Any]] = {}

  def __call__(self, variables: Any, x: Any) -> Any:
    import jax  # pylint: disable=g-import-not-at-top

    directory = self._directory
    if self._description is None:
      if self._jitted is None:
        self._jitted = jax.jit(self._fn)
      return self._jitted(variables, x)
    signature = (jax.tree.structure(variables),
                 tuple((tuple(l.shape), str(l.dtype)) for l in jax.tree.leaves(variables)),
                 tuple(x.shape), str(x.dtype))
    call = self._calls.get(signature)
    if call is None:
      call = self._calls[signature] = jax.jit(self._exported(directory, variables, x).call)
    return call(variables, x)

  def _exported(self, directory: str, variables: Any, x: Any) -> Any:
    import jax  # pylint: disable=g-import-not-at-top
    from jax import export  # pylint: disable=g-import-not-at-top

    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    avals = jax.tree.map(spec, variables), spec(x)
    tree = jax.tree.structure(avals)
    parts = dict(self._description, platform=jax.default_backend(),
                 tree=str(tree), avals=[(l.shape, str(l.dtype)) for l in jax.tree.leaves(avals)])
    path = os.path.join(directory, key("scoring", parts) + ".exported")
    data = _read(path)
    if data is not None:
      try:
        exported = export.deserialize(bytearray(data))
        if exported.in_tree == jax.tree.structure((avals, {})):
          return exported
        logging.warning("program cache: %s takes other inputs; exporting it again.", path)
      except Exception as e:  # pylint: disable=broad-except  # any unreadable entry is a miss
        logging.warning("program cache: %s cannot be read (%s); exporting it again.", path, e)
    exported = export.export(jax.jit(self._fn))(*avals)
    _write(path, exported.serialize())
    return exported
