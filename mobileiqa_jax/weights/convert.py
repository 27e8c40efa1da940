"""PyTorch state dicts <-> Flax variables for MobileIQA and its timm backbones.

The Flax modules of this package name their submodules after the PyTorch modules they port, so
a PyTorch key and a Flax variable path are the same words: `LGF1.cnn1.weight` is
`params['LGF1']['cnn1']['kernel']`. Conversion is therefore one table of leaf names
(`_LEAVES`) and one place where layouts change (`_to_flax` / `_to_torch`).

Conversion is strict: a missing, unexpected or mis-shaped key raises `ConversionError` listing
every offender. The only keys ever dropped are the classifier of a full timm classification
checkpoint (`conv_head.*`, `classifier.*`, `head.*`), which a features backbone does not have,
and PyTorch's `num_batches_tracked` counters; both are logged.

Reading a checkpoint needs no torch: `.pkl`/`.pth`/`.pt`/`.bin` (torch.save zips) are read
with numpy by `torch_pickle`, `.safetensors` with the safetensors library.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any, Callable, Mapping

import flax
import jax
import numpy as np

from mobileiqa_jax import storage

Variables = dict[str, Any]

# (Flax collection, Flax leaf name) -> PyTorch leaf name.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("params", "gamma"): "gamma",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Keys of a full timm classification model that a features_only backbone does not have.
_CLASSIFIER_PREFIXES = ("conv_head.", "classifier.", "head.")
_BN_COUNTER = "num_batches_tracked"


class ConversionError(ValueError):
  """A checkpoint does not match the model: lists every missing, unexpected, mis-shaped key."""


def _to_flax(array: np.ndarray, flax_leaf: str) -> np.ndarray:
  if flax_leaf == "kernel" and array.ndim == 4:  # Conv OIHW -> HWIO (depthwise included).
    return np.transpose(array, (2, 3, 1, 0))
  if flax_leaf == "kernel" and array.ndim == 2:  # Linear (out, in) -> (in, out).
    return np.transpose(array, (1, 0))
  return array


def _to_torch(array: np.ndarray, flax_leaf: str) -> np.ndarray:
  if flax_leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if flax_leaf == "kernel" and array.ndim == 2:
    return np.transpose(array, (1, 0))
  return array


def _torch_key(path: tuple[str, ...]) -> tuple[str, str]:
  """Flax path ('params', 'a', 'b', 'kernel') -> ('a.b.weight', 'kernel')."""
  collection, *modules, leaf = path
  if (collection, leaf) not in _LEAVES:
    raise ConversionError(f"No PyTorch name for Flax variable {'/'.join(path)}.")
  return ".".join([*modules, _LEAVES[(collection, leaf)]]), leaf


def _flat(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)))


def normalize_key(key: str) -> str:
  """Maps a full timm model's `stages.N` to the features wrapper's `stages_N`, at any depth."""
  return re.sub(r"(^|\.)stages\.(\d+)\.", r"\1stages_\2.", key)


def torch_to_flax(
    state_dict: Mapping[str, Any],
    template: Mapping[str, Any],
    *,
    prefix: str = "",
    drop_classifier: bool = False,
    source: str = "checkpoint",
    copy: bool = True,
) -> Variables:
  """Converts a PyTorch state dict to Flax variables shaped like `template`.

  Args:
    state_dict: PyTorch names -> arrays (numpy or torch tensors).
    template: Flax variables (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`)
      giving the expected tree and shapes.
    prefix: only keys under this prefix are read, with the prefix removed (e.g. `global_vit.`
      to take a backbone out of a whole MobileIQA checkpoint). Empty: all keys.
    drop_classifier: drop (with a log line) a timm classification head's keys.
    source: the checkpoint's name for error messages.
    copy: False: float32 arrays of the state dict are returned as they are, kernels as
      transposed views of them (no copy; they share memory with `state_dict`). Scoring takes
      this: `jax.device_put` copies them anyway, and each copy of the weights costs seconds
      at start-up on a loaded CPU.

  Returns:
    {'params': ..., 'batch_stats': ...} as float32 numpy arrays (only the collections the
    template has).

  Raises:
    ConversionError: naming every missing, unexpected or mis-shaped key.
  """
  arrays: dict[str, np.ndarray] = {}
  dropped = []
  for key, value in state_dict.items():
    if prefix:
      if not key.startswith(prefix):
        continue
      key = key[len(prefix):]
    key = normalize_key(key)
    if key.endswith(_BN_COUNTER):
      continue
    if drop_classifier and key.startswith(_CLASSIFIER_PREFIXES):
      dropped.append(key)
      continue
    arrays[key] = _as_numpy(value)
  if dropped:
    logging.info("%s: dropped %d classifier keys a features backbone does not have: %s",
                 source, len(dropped), ", ".join(sorted(dropped)))

  flat_out = {}
  missing, misshaped = [], []
  used = set()
  for path, leaf in _flat(template).items():
    torch_key, flax_leaf = _torch_key(path)
    if torch_key not in arrays:
      missing.append(torch_key)
      continue
    used.add(torch_key)
    value = _to_flax(arrays[torch_key], flax_leaf)
    if flax_leaf == "gamma" and value.shape != tuple(leaf.shape) and value.size == 1:
      value = value.reshape(leaf.shape)
    if value.shape != tuple(leaf.shape):
      misshaped.append(f"{torch_key}: checkpoint {tuple(arrays[torch_key].shape)}, model "
                       f"expects {tuple(_to_torch(np.empty(leaf.shape), flax_leaf).shape)}")
      continue
    flat_out[path] = value.astype(np.float32) if copy else np.asarray(value, np.float32)
  unexpected = sorted(set(arrays) - used)
  if missing or unexpected or misshaped:
    lines = [f"{source} does not match the model{f' (keys under {prefix!r})' if prefix else ''}:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", misshaped)):
      if keys:
        lines.append(f"  {len(keys)} {title}: " + "; ".join(sorted(keys)[:20])
                     + (" ..." if len(keys) > 20 else ""))
    lines.append("Check that --model matches the checkpoint (teacher: MobileViTv2-200 backbone "
                 "'global_vit.*'; student: MobileNetV3 'local_cnn.*').")
    raise ConversionError("\n".join(lines))
  return flax.traverse_util.unflatten_dict(flat_out)


def flax_to_torch(variables: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
  """Flax variables -> a PyTorch state dict (numpy arrays) that the PyTorch model loads strictly.

  BatchNorm layers get the `num_batches_tracked` counter PyTorch expects (0: it only matters
  for momentum=None, which neither backbone uses).
  """
  out = {}
  for path, value in _flat({k: variables[k] for k in ("params", "batch_stats")
                            if k in variables}).items():
    torch_key, flax_leaf = _torch_key(path)
    out[prefix + torch_key] = _to_torch(np.asarray(value, np.float32), flax_leaf)
    if flax_leaf == "var":
      out[prefix + torch_key[: -len("running_var")] + _BN_COUNTER] = np.zeros((), np.int64)
  return out


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
    return value.detach().cpu().float().numpy() if value.is_floating_point() else (
        value.detach().cpu().numpy())
  return np.asarray(value)


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a PyTorch/timm checkpoint file into {name: array}.

  `.safetensors` is read with the safetensors library. Other files (`.pkl`, `.pth`, `.pt`,
  `.bin`: torch.save zips) with numpy (`torch_pickle.load`), admitting what
  `torch.load(weights_only=True)` admits for a state dict; neither needs torch. A state dict
  may be wrapped in {'state_dict': ...} / {'model': ...} or saved from `nn.DataParallel`
  ('module.' prefix).

  Raises:
    FileNotFoundError: no such file.
    ConversionError: not a state dict, or a pickle that asks for anything but tensors (named,
      refused before anything is run).
  """
  path = os.fspath(path)
  storage.check_bucket(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  # Both readers take a local file name: an object in a bucket is read through a local copy.
  with storage.local_file(path, suffix=os.path.splitext(path)[1]) as local:
    state = _read_state_dict_file(path, local)
  for wrapper in ("state_dict", "model", "model_state_dict"):
    if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
      state = state[wrapper]
  if not isinstance(state, Mapping):
    raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict.")
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return dict(state)


def _read_state_dict_file(path: str, local: str) -> Any:
  """What the state-dict file at `local` holds (`path`: its name in messages)."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(local)
  # numpy, not torch.load: scoring the authors' weights needs no PyTorch, and the reader
  # admits only what torch.load(weights_only=True) admits for a state dict.
  import pickle  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import torch_pickle  # pylint: disable=g-import-not-at-top
  try:
    return torch_pickle.load(local)
  except torch_pickle.UnsafePickleError as e:
    raise ConversionError(f"{path} is refused: {e}. Load only weights files you trust; a "
                          "state dict (torch.save(model.state_dict(), path)) is read.") from None
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{path} is not a readable PyTorch state dict: {e}. Save the "
                          "model's state_dict() (torch.save(model.state_dict(), path)).") from e


def variables_template(model: Any, image_hw: tuple[int, int] = (64, 64)) -> Variables:
  """Shapes of a module's variables, without running it (the head does not depend on size)."""
  x = jax.numpy.zeros((1, *image_hw, 3), jax.numpy.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def load_timm_backbone(path: str | os.PathLike, arch: str,
                       backbone_kwargs: Mapping[str, Any] | None = None) -> Variables:
  """A timm ImageNet checkpoint (`.pth`, `.bin`, `.safetensors`) -> backbone variables.

  Accepts a full classification checkpoint (`stages.N` names; its classifier is dropped with a
  log line) or a features_only one (`stages_N`). `backbone_kwargs` are the model's
  (`MobileIQAConfig.backbone_kwargs`, e.g. a depth multiplier): the file must fit that backbone.
  """
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  # 'mobilevitv2_200.cvnets_in22k_ft_in1k' (a timm hub tag) -> 'mobilevitv2_200'.
  template = variables_template(mobileiqa.build_backbone(arch.split(".")[0],
                                                         **dict(backbone_kwargs or {})))
  return torch_to_flax(load_state_dict(path), template, drop_classifier=True,
                       source=os.fspath(path))


def fetch_timm_backbone(spec: str, arch: str,
                        backbone_kwargs: Mapping[str, Any] | None = None,
                        from_scratch: bool = False) -> Variables | None:
  """`config.init.backbone` -> backbone variables {'params', 'batch_stats'}.

  A local file is read as it is; anything else is a timm hub name, fetched with
  huggingface_hub (`timm/<name>`, model.safetensors) when the hub is reachable, and read
  into `arch` built with `backbone_kwargs` (see `load_timm_backbone`). An empty
  `spec` returns None: the backbone then starts from random weights, with a loud warning
  unless the experiment trains `from_scratch` on purpose.
  """
  if not spec and from_scratch:
    logging.info("the %s backbone starts from random weights (init.from_scratch)", arch)
    return None
  if not spec:
    bar = "!" * 78
    logging.warning(
        "\n%s\n!! config.init.backbone is empty: the %s backbone starts from RANDOM weights."
        "\n!! IQA accuracy depends on ImageNet initialisation; the paper's numbers need it."
        "\n!! Set --config.init.backbone to a timm file or hub name.\n%s", bar, arch, bar)
    return None
  if storage.is_bucket(spec) or os.path.exists(spec):
    path = spec
  else:
    try:
      import huggingface_hub  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"config.init.backbone={spec!r} is not a local file and "
                        "huggingface_hub is not installed to fetch it") from e
    name = spec if "/" in spec else f"timm/{spec}"
    try:
      path = huggingface_hub.hf_hub_download(name, "model.safetensors")
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"config.init.backbone={spec!r}: could not fetch {name}/model.safetensors from the "
          f"Hugging Face hub ({type(e).__name__}: {e}). Download it where the hub is reachable "
          "and pass the local file: --config.init.backbone=/path/model.safetensors") from e
  logging.info("backbone %s initialised from %s", arch, path)
  return load_timm_backbone(path, arch, backbone_kwargs)


def merge_backbone(variables: Variables, backbone_name: str, loaded: Variables) -> Variables:
  """`variables` with `loaded` put under `backbone_name`; the trees must match exactly."""
  out = {k: dict(v) for k, v in variables.items()}
  for col in ("params", "batch_stats"):
    have = out.get(col, {}).get(backbone_name)
    new = loaded.get(col, {})
    if have is None:
      continue
    want = _leaf_signatures(have)
    got = _leaf_signatures(new)
    if want != got:
      first = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
      raise ValueError(f"backbone init {col} does not match the model's {backbone_name}: "
                       f"first difference in {'/'.join(first)}: model {want.get(first)} vs "
                       f"file {got.get(first)}")
    out[col][backbone_name] = jax.tree.map(jax.numpy.asarray, new)
  return out


def _leaf_signatures(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  def dtype(v):
    return str(v.dtype) if hasattr(v, "dtype") else str(np.asarray(v).dtype)
  return {k: (tuple(np.shape(v)), dtype(v))
          for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}

# The authors' two models, told apart by the name their backbone has in the state dict.
_BACKBONE_PREFIXES = {"teacher": "global_vit.", "student": "local_cnn."}
_MODEL_NAMES = {"teacher": "teacher (MobileViT-IQA, 'global_vit.*' keys)",
                "student": "student (MobileNet-IQA, 'local_cnn.*' keys)"}


def detect_model(state_dict: Mapping[str, Any], source: str = "checkpoint") -> str:
  """'teacher' or 'student', from the backbone's key prefix (`global_vit.` / `local_cnn.`)."""
  found = [m for m, p in _BACKBONE_PREFIXES.items() if any(k.startswith(p) for k in state_dict)]
  if len(found) != 1:
    raise ConversionError(
        f"{source} is not a MobileIQA state dict: expected keys under exactly one of "
        f"'global_vit.' (teacher) or 'local_cnn.' (student), found "
        f"{'both' if found else 'neither'} (first keys: {', '.join(list(state_dict)[:3])}).")
  return found[0]


def _backbone_candidates(default: str) -> list[str]:
  """Backbone names of the default's family, the default first (the authors' files use it)."""
  from mobileiqa_jax.models import mobilenetv3  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import mobilevitv2  # pylint: disable=g-import-not-at-top
  module = mobilevitv2 if default.startswith("mobilevitv2") else mobilenetv3
  return [default] + [n for n in module.BACKBONES if n != default]


def _shapes(state: Mapping[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
  return {k[len(prefix):]: tuple(np.shape(v)) for k, v in state.items()
          if k.startswith(prefix) and not k.endswith(_BN_COUNTER)}


def model_config_for_state_dict(state_dict: Mapping[str, Any], model: str | None = None,
                                source: str = "checkpoint") -> Any:
  """The `MobileIQAConfig` a MobileIQA state dict was saved from.

  The model (teacher/student) comes from the keys; the head's width, number of MALs and
  pooled side from the shapes (LDA output channels; the pixel attention's dimension is
  views * S * S); the backbone is the preset's when its keys and shapes match, else the first
  of its family that matches. What the weights cannot tell (the regressor's pool, dropout,
  sigmoid) is the preset's. The conversion that follows is still strict: every key must match
  this config exactly.

  Args:
    state_dict: PyTorch names -> arrays.
    model: 'teacher' or 'student' if the caller insists on one (a mismatch is an error).
    source: the file's name for error messages.
  """
  return _read_config(state_dict, model, source)[0]


def _torch_shapes(template: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """PyTorch name -> PyTorch shape of every variable of a Flax template."""
  out = {}
  for path, leaf in _flat(template).items():
    key, flax_leaf = _torch_key(path)
    shape = tuple(leaf.shape)
    if flax_leaf == "kernel" and len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif flax_leaf == "kernel" and len(shape) == 2:
      shape = shape[::-1]
    out[key] = shape
  return out


def _read_config(state_dict: Mapping[str, Any], model: str | None, source: str,
                 variables_template_of: Callable[..., Any] | None = None
                 ) -> tuple[Any, Variables | None]:
  """(`model_config_for_state_dict`, the model's variables template or None).

  `variables_template_of(architecture, build)` gives the preset's variables' shapes (a cache
  may keep them); default `build()`.
  """
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  found = detect_model(state_dict, source)
  if model is not None and model != found:
    if model not in _MODEL_NAMES:
      raise ValueError(f"--model must be 'teacher' or 'student', got {model!r}.")
    raise ConversionError(f"{source} holds the {_MODEL_NAMES[found]}, not the {model}: pass "
                          f"--model={found} (or leave --model out: it is read from the keys).")
  preset = mobileiqa.model_config(found)
  lda = preset.lda_prefix
  views = len({m.group(1) for k in state_dict if (m := re.match(rf"{lda}(\d+)\.", k))})
  mals = len({m.group(1) for k in state_dict if (m := re.match(r"MALs\.(\d+)\.", k))})
  try:
    width = int(np.shape(state_dict[f"{lda}1.cnn2.weight"])[0])
    pixel_dim = int(np.shape(state_dict["MALs.0.feature_attention.c_q.weight"])[0])
  except KeyError as e:
    raise ConversionError(f"{source} lacks the MobileIQA head key {e.args[0]!r}: it is not a "
                          "whole MobileIQA state dict (a bare backbone goes to "
                          "config.init.backbone instead).") from None
  side = int(round(np.sqrt(pixel_dim / max(views, 1))))
  if views == 0 or mals == 0 or views * side * side != pixel_dim:
    raise ConversionError(f"{source}: cannot read the head's size from its keys ({views} "
                          f"{lda}* layers, {mals} MALs, pixel attention of {pixel_dim}).")
  prefix = _BACKBONE_PREFIXES[found]
  have = _shapes(state_dict, prefix)
  head = dict(width=width, num_mals=mals, pooled_size=side)
  # The preset's backbone first, checked inside the whole model's template, which the
  # conversion needs anyway: one trace of the model at start-up instead of two (seconds of a
  # scoring command's start-up on a loaded CPU).
  config = mobileiqa.model_config(found, **head)
  build = lambda: variables_template(mobileiqa.build_model(config))
  template = (build() if variables_template_of is None
              else variables_template_of(config.to_dict(), build))
  want = {k[len(prefix):]: v for k, v in _torch_shapes(template).items() if k.startswith(prefix)}
  if want == have:
    return config, template
  for name in _backbone_candidates(preset.backbone)[1:]:
    want = _torch_shapes(variables_template(mobileiqa.build_backbone(name)))
    if want == have:
      return mobileiqa.model_config(found, backbone=name, **head), None
  return config, template  # No backbone matches: the strict conversion names the keys.


def mobileiqa_from_state_dict(state_dict: Mapping[str, Any], model: str | None = None,
                              source: str = "checkpoint", runtime: Any = None,
                              copy: bool = True,
                              template_of: Callable[..., Any] | None = None,
                              **overrides: Any) -> tuple[Any, Variables, dict[str, Any]]:
  """A MobileIQA state dict -> (module, variables, model config dict), strictly, in memory.

  `overrides` replace fields of the config read from the keys (`model_config_for_state_dict`);
  `runtime` (a `runtime.Runtime`, default `runtime.DEFAULT`) is how the module runs; `copy`
  as in `torch_to_flax`; `template_of(architecture, build)` gives the variables' shapes
  (default `build()`; a cache may keep them).
  """
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  config, template = _read_config(state_dict, model, source, template_of)
  if overrides:
    config = mobileiqa.MobileIQAConfig.from_dict(dict(config.to_dict(), **overrides))
    template = None
  module = mobileiqa.build_model(config, runtime)
  # The runtime changes how the model computes, never its variables' shapes.
  template = template if template is not None else variables_template(module)
  variables = torch_to_flax(state_dict, template, source=source, copy=copy)
  return module, variables, config.to_dict()


def load_mobileiqa(path: str | os.PathLike, model: str | None = None, runtime: Any = None,
                   **overrides: Any) -> tuple[Any, Variables, dict[str, Any]]:
  """The authors' whole-model checkpoint (`.pkl` state dict) -> (module, variables, config).

  Args:
    path: the checkpoint.
    model: 'teacher' (MobileViT-IQA) or 'student' (MobileNet-IQA); None: read from the keys.
    runtime: how the module runs (`runtime.Runtime`); None: `runtime.DEFAULT`.
    **overrides: model config fields to set instead of those read from the keys.
  """
  return mobileiqa_from_state_dict(load_state_dict(path), model, source=os.fspath(path),
                                   runtime=runtime, **overrides)


def _refuse_overwrite(output: str, overwrite: bool) -> None:
  """Nothing already written is lost: an existing output is replaced only when asked."""
  from mobileiqa_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top
  storage.check_bucket(output)
  if storage.is_bucket(output):
    if not storage.exists(output):
      return
  elif not os.path.lexists(output):
    return
  if storage.isdir(output) and not storage.listdir(output):
    return
  if storage.isdir(output) and not checkpoint.is_checkpoint(output):
    raise FileExistsError(f"--output={output} is a folder that holds files but no checkpoint; "
                          "convert refuses to replace it: choose another --output.")
  if not overwrite:
    what = "a checkpoint" if storage.isdir(output) else "a file"
    raise FileExistsError(f"--output={output} already holds {what}; pass --overwrite to "
                          "replace it, or choose another --output.")


def torch_file_to_checkpoint(path: str, model: str | None, output: str,
                             image_size: str = "1231,1907", overwrite: bool = False) -> str:
  """`launch/convert.py` PyTorch -> JAX: writes an orbax checkpoint with the model config.

  Args:
    path: the authors' `.pkl` (or any MobileIQA state dict).
    model: 'teacher' or 'student' to insist on one; None: read from the keys.
    output: the checkpoint folder to write.
    image_size: 'HEIGHT,WIDTH' stored as the default input size.
    overwrite: replace an existing checkpoint at `output` (otherwise an error).

  Returns:
    'teacher' or 'student': what was converted.
  """
  from mobileiqa_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  size_hw = preprocess.parse_image_size(image_size, "--image_size")
  _refuse_overwrite(output, overwrite)
  _, variables, config = load_mobileiqa(path, model)
  checkpoint.save_model(output, variables, config,
                        extra={"image_size": list(size_hw), "source": os.fspath(path)},
                        force=overwrite)
  logging.info("Wrote %s (%s, default input %dx%d).", output, config["variant"], *size_hw)
  return config["variant"]


def checkpoint_to_torch_file(directory: str, output: str, overwrite: bool = False) -> None:
  """`launch/convert.py` JAX -> PyTorch: a state dict the authors' model loads strictly."""
  import torch  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top
  _refuse_overwrite(output, overwrite)
  _, variables, _ = checkpoint.load_model(directory)
  state = {k: torch.from_numpy(np.ascontiguousarray(v))
           for k, v in flax_to_torch(variables).items()}
  buffer = io.BytesIO()  # a local file or a bucket object, written whole
  torch.save(state, buffer)
  storage.write_atomic(output, buffer.getvalue())
  logging.info("Wrote %s (%d tensors).", output, len(state))
