"""Mobile export: a MobileIQA checkpoint -> one `.tflite` file (LiteRT) + a JSON sidecar.

(`--format=onnx` writes an `.onnx` file for ONNX Runtime instead: `export_onnx.py`; the
sidecar and the measurement at export are shared, below.)

    python launch/export.py --checkpoint=DIR --output=model.tflite \
        [--image_size=H,W] [--quantize=none|float16|dynamic_int8]

What is exported is the whole scorer: ONE normalised RGB image, NHWC float32 of a fixed
(1, H, W, 3) shape, in; ONE score, float32 of shape (1,), out (the student's sigmoid output in
[0, 1]). The JSON written beside the model (`model.json` for `model.tflite`) carries what an
app needs to feed it: input size and layout, the resize filter, the ImageNet mean/std, the MOS
mapping when the checkpoint has one, and the quantisation. Decoding and resizing stay in the
app (they are image-library work, not model work); see `sidecar()`.

## The path, and why this one (checked with jax 0.10.2, TensorFlow(-cpu) 2.21, ai-edge-litert 2.3)

    one tf.function (input 'image', output 'score'):
      backbone  --jax2tf.convert-->  XlaCallModule (StableHLO)  -> 5 features
      5 LDAs    written in TensorFlow ops (`_lda_tf`)           -> 5 views (1, S, S, C)
      MALs + fusion MAL + regressor  --jax2tf.convert-->  XlaCallModule  -> score
    --tf.lite.TFLiteConverter.from_concrete_functions-->  the converter legalises the StableHLO
    and the TF ops to TFLite builtins  -->  .tflite, run by `ai_edge_litert.interpreter` with
    its default XNNPACK delegate.

- jax2tf's graph (non-native) serialization is gone in jax 0.10: `native_serialization` and
  `enable_xla` are accepted only as deprecated no-ops, and every conversion is an
  `XlaCallModule` wrapping StableHLO. TF 2.21's TFLite converter deserialises that module and
  legalises StableHLO -> TFLite builtins itself. This is the path the LiteRT documentation
  gives for JAX ("JAX -> jax2tf -> TF -> TFLite converter"); orbax-export is a wrapper around
  the same jax2tf call and adds nothing for a fixed-shape function.
- `tf.lite.TFLiteConverter.experimental_from_jax` is deprecated (it points to this path) and is
  built on the removed HLO-proto export. There is no `ai-edge-jax` on PyPI; `ai-edge-torch` /
  `litert-torch` convert PyTorch, not JAX.
- Why the LDAs are TF ops. Legalised from StableHLO, an exact (erf) GELU becomes XLA's erf
  polynomial: ~60 elementwise builtins (MUL/ADD/DIV/EXP/SELECT/LESS...) each writing a tensor
  as large as the GELU's input. The first LDA's hidden activation is the model's largest
  array (616x954x512 float32, 1.2 GB, at 1231x1907), so that graph had 3646 ops whose
  intermediate tensors summed to 11.8 GiB already at 512x512 (row-strip exported), and under
  XNNPACK the process went from 0.7 GB after loading to 2.1 GB peak at 512x512, and past
  8 GB (killed; 13 GB in an earlier run) at 1231x1907. `tf.nn.gelu(approximate=False)`
  instead converts to TFLite's own GELU op in exact mode, one kernel that XNNPACK (and the GPU
  delegate) run in one pass. Reaching that op from StableHLO needs a `jax.lax.composite`, which
  this TF cannot read (version skew: jax 0.10 writes StableHLO 1.15, TF 2.21 reads 1.13;
  "unregistered operation 'vhlo.composite_v2'"), hence TF ops for the whole LDA.
- Each LDA whose hidden activation exceeds `LDA_STRIP_ELEMENTS` is computed one pooled row
  window at a time (conv1x1 -> GELU -> AVERAGE_POOL_2D over the window's rows), so only one
  window's (K, W, 2C) exists at once (28x954x512 at 1231x1907); the width pooling, PyTorch's
  overlapping windows, is one matmul with a constant averaging matrix on the (S, W, 2C) row
  means. Smaller LDAs are computed whole and pooled by two such matmuls. Same parameters and
  numbers as `mobileiqa.LDA` (`tests/test_export.py` checks both forms against it). The graph
  at 512x768 has 569 ops, intermediates summing to 1.3 GiB; the full student at 1231x1907
  peaks at ~1.1 GB RSS under XNNPACK, weights included (`benchmarks/export.py`).
- The rest converts to builtin ops only (`TFLITE_BUILTINS`): convolutions -> CONV_2D /
  DEPTHWISE_CONV_2D, hard-swish -> HARD_SWISH, the head's matmuls -> FULLY_CONNECTED /
  BATCH_MATMUL, softmax -> SOFTMAX, sigmoid -> LOGISTIC. `select_tf_ops=True`
  (`--select_tf_ops`) lets the converter fall back to TensorFlow (Flex) kernels for anything it
  cannot legalise; such a model needs an interpreter linked with the Flex delegate (the
  `tensorflow` package's `tf.lite.Interpreter`, or the Flex AAR on Android) — `ai-edge-litert`
  alone cannot run it. It is a documented fallback only; the sidecar records `requires_flex`.
- Depthwise convolutions are exported with `depthwise_impl='conv'` (one DEPTHWISE_CONV_2D
  that XNNPACK runs well; `runtime.FOR_EXPORT`), whatever the exporting host would pick: the
  'shift' form (k*k strided slices and multiply-adds, faster under XLA:CPU) reads the same
  parameters and gives the same numbers, but would become k*k STRIDED_SLICE/MUL/ADD ops per
  layer in TFLite.
- After writing the file, `export` runs it once in a fresh LiteRT process (`probe`: XNNPACK,
  2 threads) and the sidecar's `runtime` records the delegate, threads, peak resident memory
  and latency measured there, for the app's budget.
- Quantisation is the converter's post-training kind, needing no calibration data:
  `float16` stores weights in float16 (about half the file; dequantised at load on CPU),
  `dynamic_int8` stores weights in int8 with dynamic-range int8 kernels for the FULLY_CONNECTED
  / CONV layers (about a quarter of the file). Full integer quantisation would need a
  representative data set and is not offered.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from mobileiqa_jax.data import preprocess

SIDECAR_FORMAT = "mobileiqa_jax.tflite/1"
ONNX_SIDECAR_FORMAT = "mobileiqa_jax.onnx/1"
QUANTIZATIONS = ("none", "float16", "dynamic_int8")
# --format: TFLite (LiteRT, phones; the default) or ONNX (ONNX Runtime; `export_onnx.py`).
FORMATS = ("tflite", "onnx")
INPUT_NAME = "image"
OUTPUT_NAME = "score"


class ExportError(RuntimeError):
  """The model could not be converted (e.g. an op TFLite lacks, without --select_tf_ops)."""


# ----------------------------------------------------------------------------- settings


def check_quantize(quantize: str) -> str:
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}; got {quantize!r}.")
  return quantize


def check_format(fmt: str, output: str, quantize: str = "none",
                 select_tf_ops: bool = False) -> str:
  """--format against --output's extension and the TFLite-only settings."""
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}.")
  if not output.endswith("." + fmt):
    raise ValueError(f"--output must name a .{fmt} file for --format={fmt}, got {output!r}.")
  if fmt == "onnx" and quantize != "none":
    raise ValueError(f"--quantize={quantize} applies to --format=tflite only; the ONNX export "
                     "is float32.")
  if fmt == "onnx" and select_tf_ops:
    raise ValueError("--select_tf_ops applies to --format=tflite only.")
  return fmt


# ----------------------------------------------------------------------------- conversion


# LDAs whose hidden activation (H * W * 2C) exceeds this many elements are exported one pooled
# row band at a time (see `_lda_tf`); smaller ones in one piece.
LDA_STRIP_ELEMENTS = 4 * 2**20


def _pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) averaging matrix of PyTorch's adaptive pooling along one axis."""
  from mobileiqa_jax.models import layers  # pylint: disable=g-import-not-at-top
  idx, weights = layers.adaptive_windows(in_size, out_size)
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    np.add.at(m[i], idx[i], weights[i])
  return m


def _row_windows(in_size: int, out_size: int) -> list[tuple[int, int]]:
  """[start, end) rows of each of PyTorch's adaptive pooling windows."""
  return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size))
          for i in range(out_size)]


def _lda_tf(x: Any, params: Mapping[str, Any], pooled_size: int) -> Any:
  """One LDA in TensorFlow ops: conv1x1 (C_i -> 2C) -> exact GELU -> adaptive pool -> conv1x1.

  Written in TF rather than left to the StableHLO legaliser because `tf.nn.gelu(approximate=
  False)` converts to TFLite's own GELU op (exact mode), one kernel that XNNPACK and the GPU
  delegates run in one pass; from StableHLO the exact GELU arrives as XLA's erf polynomial,
  ~20 elementwise ops each writing a tensor the size of the hidden activation.

  A hidden activation above `LDA_STRIP_ELEMENTS` is never formed whole: each pooled row's
  window of input rows is projected, passed through GELU and averaged over its rows
  (AVERAGE_POOL_2D) on its own, so only one window's (K, W, 2C) exists at a time. The width
  pooling (PyTorch's overlapping windows) is then one matmul with a constant averaging matrix
  on the (S, W, 2C) row means. Same parameters and math as `mobileiqa.LDA` (float32 rounding).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  k1 = np.asarray(params["cnn1"]["kernel"], np.float32)
  b1 = np.asarray(params["cnn1"]["bias"], np.float32)
  k2 = np.asarray(params["cnn2"]["kernel"], np.float32)
  b2 = np.asarray(params["cnn2"]["bias"], np.float32)
  s = pooled_size
  _, h, w, _ = x.shape

  def project(t):
    y = tf.nn.conv2d(t, k1, strides=1, padding="VALID") + b1
    return tf.nn.gelu(y, approximate=False)

  pool_w = tf.constant(_pool_matrix(w, s))
  if h * w * k1.shape[-1] > LDA_STRIP_ELEMENTS:
    rows = []
    for start, end in _row_windows(h, s):
      y = project(x[:, start:end])
      if end - start > 1:
        y = tf.nn.avg_pool2d(y, (end - start, 1), (end - start, 1), "VALID")
      rows.append(y)
    y = tf.concat(rows, axis=1)  # (1, S, W, 2C)
  else:
    y = tf.einsum("sh,bhwc->bswc", tf.constant(_pool_matrix(h, s)), project(x))
  y = tf.einsum("sw,bhwc->bhsc", pool_w, y)
  return tf.nn.conv2d(y, k2, strides=1, padding="VALID") + b2


def _backbone_features(model: Any, images: Any) -> Any:
  return getattr(model, model.backbone_name)(images, train=False)


def _head_from_views(model: Any, *views: Any) -> Any:
  """The model after its LDAs: views (B, S, S, C) each -> score (B,)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.stack(views)
  fused = model.fusion_mal(model.MALs(x, False), False)
  return model.regress(fused, False)


def to_tflite(model: Any, variables: Any, image_size: Sequence[int], quantize: str = "none",
              select_tf_ops: bool = False) -> bytes:
  """Converts `model.apply(variables, x, train=False)` at input (1, H, W, 3) to a TFLite model.

  The graph is three parts in one tf.function: the backbone (jax2tf), the LDAs (TensorFlow ops,
  `_lda_tf`), the MALs and regressor (jax2tf).

  Args:
    model: a `mobileiqa.MobileIQA`. Build it with `models.runtime.FOR_EXPORT` (float32, depthwise
      impl 'conv').
    variables: its variables ({'params', 'batch_stats'}); embedded as constants.
    image_size: (H, W), validated by `parse_image_size`.
    quantize: 'none', 'float16' or 'dynamic_int8'.
    select_tf_ops: allow TensorFlow (Flex) kernels for ops TFLite lacks.

  Returns:
    The .tflite flatbuffer bytes; signature 'serving_default', input 'image', output 'score'.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  h, w = preprocess.parse_image_size(image_size, "image_size")
  check_quantize(quantize)
  variables = {c: dict(v) for c, v in dict(variables).items()}
  lda_names = [f"{model.lda_prefix}{i + 1}" for i in range(model._num_views())]  # pylint: disable=protected-access
  bb = model.backbone_name

  def part(keep):
    return {c: {k: v for k, v in tree.items() if keep(k)} for c, tree in variables.items()}

  # The weights enter each XlaCallModule as tf.Variables (the converter freezes them into
  # constants) rather than as constants inside the serialized StableHLO: embedding 80M
  # parameters there made the module string get copied several times and conversion peak
  # at ~12 GB.
  module = tf.Module()

  def as_tf(fn, tree, name):
    leaves, treedef = jax.tree_util.tree_flatten(tree)

    def call(flat, *args):
      return model.apply(jax.tree_util.tree_unflatten(treedef, flat), *args, method=fn)

    weights = [tf.Variable(np.asarray(a), trainable=False) for a in leaves]
    setattr(module, name, weights)
    converted = jax2tf.convert(call, with_gradient=False)
    return lambda *args: converted(weights, *args)

  backbone = as_tf(_backbone_features, part(lambda k: k == bb), "backbone_weights")
  head = as_tf(_head_from_views, part(lambda k: k != bb and k not in lda_names),
               "head_weights")
  lda_params = [variables["params"][n] for n in lda_names]

  def serve(image):
    feats = backbone(image)
    views = [_lda_tf(f, p, model.pooled_size) for f, p in zip(feats, lda_params)]
    return {OUTPUT_NAME: head(*views)}

  module.serve = tf.function(
      serve, autograph=False,
      input_signature=[tf.TensorSpec((1, h, w, 3), tf.float32, name=INPUT_NAME)])
  concrete = module.serve.get_concrete_function()

  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
  ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if select_tf_ops:
    ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
  converter.target_spec.supported_ops = ops
  if quantize == "float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantize == "dynamic_int8":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  try:
    return converter.convert()
  except Exception as e:  # the converter raises ConverterError and friends
    hint = "" if select_tf_ops else (
        " Ops TFLite lacks can run as TensorFlow (Flex) kernels with --select_tf_ops, at the "
        "cost of needing the Flex delegate in the app.")
    raise ExportError(f"TFLite conversion failed at {h}x{w}, quantize={quantize}: {e}.{hint}"
                      ) from e


def op_counts(tflite_model: bytes) -> dict[str, int]:
  """{op name: count} of the model's main graph (delegation not applied)."""
  it = make_interpreter(model_content=tflite_model, delegate=False)
  counts: dict[str, int] = {}
  for d in it._get_ops_details():  # pylint: disable=protected-access
    counts[d["op_name"]] = counts.get(d["op_name"], 0) + 1
  return counts


def _needs_flex(counts: Mapping[str, int]) -> bool:
  return any(name.startswith("Flex") or name == "CUSTOM" for name in counts)


# ----------------------------------------------------------------------------- sidecar


def sidecar_path(tflite_path: str) -> str:
  root, _ = os.path.splitext(tflite_path)
  return root + ".json"


def read_sidecar(model_path: str) -> dict[str, Any] | None:
  """The JSON written beside an exported model (`sidecar`), or None where there is none."""
  path = sidecar_path(model_path)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def sidecar(image_size: Sequence[int], quantize: str, model_config: Mapping[str, Any] | None,
            extra: Mapping[str, Any] | None, tflite_file: str,
            ops: Mapping[str, int] | None = None, source: str | None = None,
            runtime: Mapping[str, Any] | None = None, fmt: str = "tflite") -> dict[str, Any]:
  """The JSON an app reads beside the model: everything to turn a photo into a score.

  `runtime` is `probe()`'s measurement of the written model (delegate or execution
  provider, threads, peak memory, latency on the exporting machine); None leaves it out.
  `fmt` 'onnx' describes an ONNX file: a dynamic batch ('batch' in the shapes, as ONNX
  Runtime reports them), the ONNX opset and converter versions, no Flex question.
  """
  h, w = image_size
  onnx = fmt == "onnx"
  batch: Any = "batch" if onnx else 1
  cfg = dict(model_config or {})
  extra = dict(extra or {})
  sigmoid = bool(cfg.get("sigmoid", True))
  mos_range = extra.get("mos_range")
  mos = None
  if mos_range is not None:
    lo, hi = (float(v) for v in mos_range)
    mos = {"range": [lo, hi], "formula": "mos = lo + score * (hi - lo)", "lo": lo, "hi": hi,
           "note": "the model was trained on MOS min-max normalised from [lo, hi]"}
  meta = {
      "format": ONNX_SIDECAR_FORMAT if onnx else SIDECAR_FORMAT,
      "model_file": os.path.basename(tflite_file),
      "model": {k: cfg.get(k) for k in ("variant", "backbone", "pooled_size", "width")
                if k in cfg},
      "input": {
          "name": INPUT_NAME,
          "shape": [batch, int(h), int(w), 3],
          "dynamic_batch": onnx,
          "dtype": "float32",
          "layout": "NHWC",
          "color": "RGB",
          "height": int(h),
          "width": int(w),
          "preprocess": [
              "decode to RGB (no EXIF rotation)",
              f"resize to width {w} x height {h} with bicubic interpolation "
              "(PIL Image.resize default)",
              "scale to [0, 1] (pixel / 255)",
              "normalise per channel: (x - mean) / std",
          ],
          "resize_filter": "bicubic",
          "scale": 1.0 / 255.0,
          "mean": list(preprocess.IMAGENET_MEAN),
          "std": list(preprocess.IMAGENET_STD),
      },
      "output": {
          "name": OUTPUT_NAME,
          "shape": [batch],
          "dtype": "float32",
          "meaning": "predicted perceptual quality, higher is better",
          "range": [0.0, 1.0] if sigmoid else None,
      },
      "mos_mapping": mos,
      "quantization": quantize,
      "runtime": _runtime_entry(runtime, fmt),
      "requires_flex": _needs_flex(ops or {}),
      "ops": dict(sorted((ops or {}).items())),
      "source_checkpoint": source,
  }
  if onnx:
    from mobileiqa_jax.export import onnx as onnx_lib  # pylint: disable=g-import-not-at-top
    del meta["requires_flex"]
    meta["exported_with"] = onnx_lib.versions()
  else:
    import jax  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    meta["exported_with"] = {"jax": jax.__version__, "tensorflow": tf.__version__}
  return meta


def _runtime_entry(runtime: Mapping[str, Any] | None, fmt: str = "tflite"
                   ) -> dict[str, Any] | None:
  if runtime is None:
    return None
  import platform  # pylint: disable=g-import-not-at-top
  if fmt == "onnx":
    from mobileiqa_jax.export import onnx as onnx_lib  # pylint: disable=g-import-not-at-top
    return {
        "execution_provider": runtime["provider"],
        "num_threads": runtime["num_threads"],
        "expected_peak_rss_bytes": int(runtime["peak_rss_bytes"]),
        "measured_invoke_ms": runtime["invoke_ms"],
        "measured_batch": 1,
        "measured_on": f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime "
                       f"{onnx_lib.runtime_version()}",
        "note": ("peak resident memory of a process that loaded the model and scored one "
                 "image with this execution provider (weights included); latency of that "
                 "run on the exporting machine"),
    }
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    litert_version = metadata.version("ai-edge-litert")
  except Exception:  # pylint: disable=broad-except
    litert_version = None
  return {
      "delegate": runtime["delegate"],
      "num_threads": runtime["num_threads"],
      "expected_peak_rss_bytes": int(runtime["peak_rss_bytes"]),
      "measured_invoke_ms": runtime["invoke_ms"],
      "measured_on": f"{platform.machine()}, {os.cpu_count()} cores, ai-edge-litert "
                     f"{litert_version}",
      "note": ("peak resident memory of a process that loaded the model, allocated it and "
               "scored one image with this delegate (weights included); latency of that "
               "invoke on the exporting machine, not a phone's"),
  }


# ----------------------------------------------------------------------------- entry points


def export(model: Any, variables: Any, output: str, image_size: Sequence[int],
           quantize: str = "none", model_config: Mapping[str, Any] | None = None,
           extra: Mapping[str, Any] | None = None, select_tf_ops: bool = False,
           source: str | None = None, measure: bool = True,
           num_threads: int = 2, fmt: str = "tflite") -> dict[str, Any]:
  """Writes `output` (.tflite, or .onnx with `fmt='onnx'`) and its sidecar JSON.

  Returns the sidecar dict. With `measure`, the written model is run once in a fresh process
  (`probe`: LiteRT with XNNPACK, or `onnx_lib.probe`: ONNX Runtime's CPU provider;
  `num_threads`) and the sidecar records its peak memory and latency.
  """
  size = preprocess.parse_image_size(image_size, "image_size")
  check_quantize(quantize)
  check_format(fmt, output, quantize, select_tf_ops)
  if fmt == "onnx":
    from mobileiqa_jax.export import onnx as onnx_lib  # pylint: disable=g-import-not-at-top
    data = onnx_lib.to_onnx(model, variables, size)
    ops = onnx_lib.op_counts(data)
  else:
    data = to_tflite(model, variables, size, quantize, select_tf_ops)
    ops = op_counts(data)
  meta = sidecar(size, quantize, model_config, extra, output, ops, source, fmt=fmt)
  meta["file_bytes"] = len(data)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "wb") as f:
    f.write(data)
  del data

  def write_sidecar():
    with open(sidecar_path(output), "w") as f:
      json.dump(meta, f, indent=2)
      f.write("\n")

  write_sidecar()
  if measure and fmt == "onnx":
    from mobileiqa_jax.export import onnx as onnx_lib  # pylint: disable=g-import-not-at-top
    try:
      meta["runtime"] = _runtime_entry(onnx_lib.probe(output, num_threads), fmt)
    except (RuntimeError, OSError, ValueError) as e:
      raise ExportError(f"{output} was written, but ONNX Runtime could not run it: {e}") from e
    write_sidecar()
  elif measure and not meta["requires_flex"]:  # ai_edge_litert has no Flex kernels
    try:
      meta["runtime"] = _runtime_entry(probe(output, num_threads))
    except (RuntimeError, OSError, ValueError) as e:
      raise ExportError(f"{output} was written, but LiteRT could not run it: {e}") from e
    write_sidecar()
  return meta


def export_checkpoint(checkpoint: str, output: str, image_size: Any = None,
                      quantize: str = "none", select_tf_ops: bool = False,
                      fmt: str = "tflite") -> dict[str, Any]:
  """The export command: checkpoint -> `output` + sidecar. Settings are validated first.

  `checkpoint` is anything `mobileiqa_jax.load` takes (a checkpoint folder, a workdir, a
  state dict); the default input size is the checkpoint's.
  """
  from mobileiqa_jax.scoring import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  check_quantize(quantize)
  preprocess.parse_image_size(image_size, "--image_size")
  check_format(fmt, output, quantize, select_tf_ops)
  # What `load` accepts (checkpoint, workdir, the authors' .pkl), in float32 as predict scores.
  scorer = scorer_lib.load(checkpoint, image_size, runtime=runtime_lib.FOR_EXPORT)
  return export(scorer.model, scorer.variables, output, scorer.image_size, quantize,
                scorer.model_config, scorer.extra, select_tf_ops, source=scorer.source,
                fmt=fmt)


# ----------------------------------------------------------------------------- running it


def make_interpreter(model_path: str | None = None, model_content: bytes | None = None,
                     num_threads: int | None = None, delegate: bool = True):
  """A LiteRT interpreter (`ai_edge_litert`), or TensorFlow's `tf.lite.Interpreter` without it.

  `delegate=False` turns XNNPACK off (op inspection only).
  """
  kwargs: dict[str, Any] = {"model_path": model_path, "model_content": model_content,
                            "num_threads": num_threads}
  try:
    from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
    cls, resolver = litert.Interpreter, litert.OpResolverType
  except ImportError:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    cls, resolver = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
  if not delegate:
    kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
  return cls(**kwargs)


def probe(model_path: str, num_threads: int = 2, xnnpack: bool = True,
          timeout_s: float = 600.0) -> dict[str, Any]:
  """Runs the model once in a fresh process, as an app would; returns what it cost there.

  The child imports only `ai_edge_litert` and numpy, loads `model_path`, allocates, invokes
  once on a random input (warm-up) and once timed. Returns {'peak_rss_bytes' (the child's
  peak resident memory, VmHWM: the whole process, weights included), 'invoke_ms', 'delegate',
  'num_threads'}.
  Raises RuntimeError with the child's error if it fails.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "mobileiqa_jax.export.tflite", "--probe", model_path,
         str(int(num_threads)), "xnnpack" if xnnpack else "builtin"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"running {model_path} in LiteRT failed: {proc.stderr.strip()[-800:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe_main(model_path: str, num_threads: str, kernels: str) -> None:
  import resource  # pylint: disable=g-import-not-at-top
  it = make_interpreter(model_path=model_path, num_threads=int(num_threads),
                        delegate=kernels == "xnnpack")
  it.allocate_tensors()
  inp = it.get_input_details()[0]
  it.set_tensor(inp["index"],
                np.random.RandomState(0).standard_normal(inp["shape"]).astype(np.float32))
  it.invoke()
  t = time.perf_counter()
  it.invoke()
  ms = 1e3 * (time.perf_counter() - t)
  # VmHWM, not ru_maxrss: after a fork/exec from a large parent (the converting process),
  # ru_maxrss still carries the parent's peak; VmHWM is this process image's own.
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  try:
    with open("/proc/self/status") as f:
      peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
  except (OSError, StopIteration):
    pass
  print(json.dumps({
      "peak_rss_bytes": peak,
      "invoke_ms": round(ms, 1), "num_threads": int(num_threads),
      "delegate": "XNNPACK" if kernels == "xnnpack" else "none (builtin kernels)"}))


class TFLiteScorer:
  """Scores normalised NHWC float32 images with an exported model, one image per invoke.

  `xnnpack`: use LiteRT's default XNNPACK delegate (as apps do); False = the builtin
  reference kernels.
  """

  def __init__(self, model_path: str, num_threads: int | None = None, xnnpack: bool = True):
    self.model_path = model_path
    self.xnnpack = xnnpack
    self.interpreter = make_interpreter(model_path=model_path, num_threads=num_threads,
                                        delegate=xnnpack)
    self.interpreter.allocate_tensors()
    self._in = self.interpreter.get_input_details()[0]
    self._out = self.interpreter.get_output_details()[0]
    self.input_shape = tuple(int(s) for s in self._in["shape"])
    self.meta = read_sidecar(model_path)

  @property
  def image_size(self) -> tuple[int, int]:
    return self.input_shape[1], self.input_shape[2]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
      images = images[None]
    if images.shape[1:] != self.input_shape[1:]:
      raise ValueError(f"the model takes images of shape {self.input_shape[1:]} (H, W, 3), got "
                       f"{images.shape[1:]}")
    out = np.empty(len(images), np.float32)
    for i, img in enumerate(images):
      self.interpreter.set_tensor(self._in["index"], img[None])
      self.interpreter.invoke()
      out[i] = np.asarray(self.interpreter.get_tensor(self._out["index"])).reshape(-1)[0]
    return out

  def score_file(self, path: str) -> float:
    """Decode + the reference preprocessing + score, as an app would."""
    with open(path, "rb") as f:
      img = preprocess.decode_rgb(f.read(), path)
    return float(self(preprocess.resize_normalize(img, self.image_size))[0])

  def time_invoke(self, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds per invoke on a random input."""
    x = np.random.RandomState(0).standard_normal(self.input_shape).astype(np.float32)
    self.interpreter.set_tensor(self._in["index"], x)
    for _ in range(warmup):
      self.interpreter.invoke()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      self.interpreter.invoke()
      times.append(time.perf_counter() - t)
    return float(np.median(times))


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) == 5 and sys.argv[1] == "--probe":
    _probe_main(*sys.argv[2:])
  else:
    sys.exit("usage: python -m mobileiqa_jax.export.tflite --probe MODEL.tflite THREADS xnnpack|builtin"
             " (the export command is launch/export.py)")
