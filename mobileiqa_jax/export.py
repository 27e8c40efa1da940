"""Mobile export: a MobileIQA checkpoint -> one `.tflite` file (LiteRT) + a JSON sidecar.

    python launch/export.py --checkpoint=DIR --output=model.tflite \
        [--image_size=H,W] [--quantize=none|float16|dynamic_int8]

What is exported is the whole scorer: ONE normalised RGB image, NHWC float32 of a fixed
(1, H, W, 3) shape, in; ONE score, float32 of shape (1,), out (the student's sigmoid output in
[0, 1]). The JSON written beside the model (`model.json` for `model.tflite`) carries what an
app needs to feed it: input size and layout, the resize filter, the ImageNet mean/std, the MOS
mapping when the checkpoint has one, and the quantisation. Decoding and resizing stay in the
app (they are image-library work, not model work); see `sidecar()`.

## The path, and why this one (checked with jax 0.10.2, TensorFlow(-cpu) 2.21, ai-edge-litert 2.3)

    model.apply  --jax2tf.convert (native serialization)-->  tf.function holding ONE
    XlaCallModule op (the StableHLO of the jitted scorer, weights as constants)
      --tf.lite.TFLiteConverter.from_concrete_functions-->  the converter legalises the
    StableHLO to TFLite builtin ops  -->  .tflite, run by `ai_edge_litert.interpreter`.

- jax2tf's graph (non-native) serialization is gone in jax 0.10: `native_serialization` and
  `enable_xla` are accepted only as deprecated no-ops, and every conversion is an
  `XlaCallModule` wrapping StableHLO. TF 2.21's TFLite converter deserialises that module and
  legalises StableHLO -> TFLite builtins itself, so no TF-op graph is needed. This is the path
  the LiteRT documentation gives for JAX ("JAX -> jax2tf -> TF -> TFLite converter"); orbax-export
  is a wrapper around the same jax2tf call and adds nothing for a single fixed-shape function.
- `tf.lite.TFLiteConverter.experimental_from_jax` is deprecated (it points to this path) and is
  built on the removed HLO-proto export. There is no `ai-edge-jax` on PyPI; `ai-edge-torch` /
  `litert-torch` convert PyTorch, not JAX.
- The student converts to builtin ops only (`TFLITE_BUILTINS`): convolutions -> CONV_2D /
  DEPTHWISE_CONV_2D, hard-swish -> HARD_SWISH, the head's matmuls -> FULLY_CONNECTED /
  BATCH_MATMUL, softmax -> SOFTMAX, sigmoid -> LOGISTIC; the exact (erf) GELU becomes XLA's
  erf polynomial in elementwise builtins (MUL/ADD/DIV/EXP/SELECT...), so it stays exact to
  float32 rounding instead of switching to the tanh GELU; PyTorch's overlapping adaptive
  pooling becomes slices/gathers and sums (whatever `layers.adaptive_avg_pool2d` lowers to). `select_tf_ops=True` (`--select_tf_ops`) lets the converter
  fall back to TensorFlow (Flex) kernels for anything it cannot legalise; such a model needs an
  interpreter linked with the Flex delegate (the `tensorflow` package's `tf.lite.Interpreter`,
  or the Flex AAR on Android) — `ai-edge-litert` alone cannot run it. It is a documented
  fallback only; the sidecar records `requires_flex`.
- Depthwise convolutions are exported with `depthwise_impl='conv'` (one DEPTHWISE_CONV_2D
  that XNNPACK runs well), whatever the checkpoint's config says: the 'shift' form (k*k
  strided slices and multiply-adds, faster under XLA:CPU) reads the same parameters and gives
  the same numbers, but would become k*k STRIDED_SLICE/MUL/ADD ops per layer in TFLite.
- Version skew: jax 0.10 writes StableHLO 1.15 while TF 2.21 reads 1.13. Plain ops
  deserialise fine, but newer constructs do not: a `jax.lax.composite` (tried, to map the
  exact GELU to TFLite's GELU op) fails with "unregistered operation 'vhlo.composite_v2'".
  If a future model change trips this, the converter error names the vhlo op.
- Memory at full resolution: TFLite materialises every intermediate of the erf expansion at
  full size, so the first LDA's (616, 954, 512) hidden activation at 1231x1907 is exported in
  row strips (`_lda_in_strips`, same math). LiteRT's default XNNPACK delegate still needed
  > 13 GB there; the builtin CPU kernels do not (`TFLiteScorer(xnnpack=None)` picks).
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
# One reader of --image_size for every command (and its MIN_SIDE), shared with predict.
from mobileiqa_jax.inference import MIN_SIDE, parse_image_size  # noqa: F401

SIDECAR_FORMAT = "mobileiqa_jax.tflite/1"
QUANTIZATIONS = ("none", "float16", "dynamic_int8")
INPUT_NAME = "image"
OUTPUT_NAME = "score"


class ExportError(RuntimeError):
  """The model could not be converted (e.g. an op TFLite lacks, without --select_tf_ops)."""


# ----------------------------------------------------------------------------- settings


def check_quantize(quantize: str) -> str:
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}; got {quantize!r}.")
  return quantize


def export_model_for(model_config: Mapping[str, Any]):
  """The Flax model to export for a stored model config: float32, depthwise_impl='conv'."""
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  cfg = dict(model_config)
  cfg["depthwise_impl"] = "conv"
  cfg["dtype"] = "float32"
  return mobileiqa.build_model(cfg)


# ----------------------------------------------------------------------------- conversion


# LDAs whose hidden activation (H * W * 2C) exceeds this many elements are exported row strip by
# row strip (see `_lda_in_strips`).
LDA_STRIP_ELEMENTS = 4 * 2**20


def _lda_in_strips(lda: Any, x: Any) -> Any:
  """`LDA.__call__` computed one output row of the adaptive pool at a time.

  Same parameters and the same math (conv1x1 -> exact GELU -> PyTorch adaptive average pool ->
  conv1x1); only the order of the window sums differs. TFLite materialises every elementwise
  intermediate of XLA's erf/erfc expansion at full size, so at 1231x1907 the first LDA's
  (616, 954, 512) hidden activation made the interpreter need more than 20 GB; computed per
  pooled row it needs about 1/S of that.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import layers  # pylint: disable=g-import-not-at-top

  params = lda.variables["params"]
  s = lda.pooled_size

  def conv1x1(y, p):
    y = jax.lax.conv_general_dilated(y, p["kernel"].astype(y.dtype), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"].astype(y.dtype)

  x = x.astype(lda.dtype)
  h = x.shape[1]
  rows = []
  for i in range(s):
    start, end = (i * h) // s, -((-(i + 1) * h) // s)
    y = layers.gelu(conv1x1(x[:, start:end], params["cnn1"]))
    rows.append(jnp.mean(y, axis=1, keepdims=True))
  y = layers.adaptive_avg_pool2d(jnp.concatenate(rows, axis=1), (s, s))
  return conv1x1(y, params["cnn2"])


def _strip_interceptor(next_fun, args, kwargs, context):
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  mod = context.module
  if isinstance(mod, mobileiqa.LDA) and context.method_name == "__call__" and not kwargs:
    x = args[0]
    if x.shape[1] * x.shape[2] * 2 * mod.width > LDA_STRIP_ELEMENTS:
      return _lda_in_strips(mod, x)
  return next_fun(*args, **kwargs)


def to_tflite(model: Any, variables: Any, image_size: Sequence[int], quantize: str = "none",
              select_tf_ops: bool = False) -> bytes:
  """Converts `model.apply(variables, x, train=False)` at input (1, H, W, 3) to a TFLite model.

  Args:
    model: a Flax module whose apply takes (images, train=False) and returns scores (B,).
      Export a MobileIQA with depthwise_impl='conv' (`export_model_for`).
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

  h, w = parse_image_size(image_size, "image_size")
  check_quantize(quantize)
  # The weights enter the XlaCallModule as tf.Variables (the converter freezes them into
  # constants) rather than as constants inside the serialized StableHLO: embedding 80M
  # parameters there made the module string get copied several times and conversion peak
  # at ~12 GB.
  leaves, treedef = jax.tree_util.tree_flatten(dict(variables))

  def score(flat, images):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    with nn.intercept_methods(_strip_interceptor):
      return model.apply(jax.tree_util.tree_unflatten(treedef, flat), images, train=False)

  fn = jax2tf.convert(score, with_gradient=False)
  module = tf.Module()
  module.weights = [tf.Variable(np.asarray(a), trainable=False) for a in leaves]
  module.serve = tf.function(
      lambda image: {OUTPUT_NAME: fn(module.weights, image)}, autograph=False,
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


def sidecar(image_size: Sequence[int], quantize: str, model_config: Mapping[str, Any] | None,
            extra: Mapping[str, Any] | None, tflite_file: str,
            ops: Mapping[str, int] | None = None, source: str | None = None) -> dict[str, Any]:
  """The JSON an app reads beside the model: everything to turn a photo into a score."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  h, w = image_size
  cfg = dict(model_config or {})
  extra = dict(extra or {})
  sigmoid = bool(cfg.get("sigmoid", True))
  mos_range = extra.get("mos_range")
  mos = None
  if mos_range is not None:
    lo, hi = (float(v) for v in mos_range)
    mos = {"range": [lo, hi], "formula": "mos = lo + score * (hi - lo)", "lo": lo, "hi": hi,
           "note": "the model was trained on MOS min-max normalised from [lo, hi]"}
  return {
      "format": SIDECAR_FORMAT,
      "model_file": os.path.basename(tflite_file),
      "model": {k: cfg.get(k) for k in ("variant", "backbone", "pooled_size", "width")
                if k in cfg},
      "input": {
          "name": INPUT_NAME,
          "shape": [1, int(h), int(w), 3],
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
          "shape": [1],
          "dtype": "float32",
          "meaning": "predicted perceptual quality, higher is better",
          "range": [0.0, 1.0] if sigmoid else None,
      },
      "mos_mapping": mos,
      "quantization": quantize,
      "runtime_note": (
          "LiteRT's default XNNPACK delegate needed > 13 GB at 1231x1907 in ai-edge-litert 2.3;"
          " above ~1 Mpx create the interpreter without default delegates (builtin kernels)"
          if h * w > XNNPACK_MAX_PIXELS else None),
      "requires_flex": _needs_flex(ops or {}),
      "ops": dict(sorted((ops or {}).items())),
      "source_checkpoint": source,
      "exported_with": {"jax": jax.__version__, "tensorflow": tf.__version__},
  }


# ----------------------------------------------------------------------------- entry points


def export(model: Any, variables: Any, output: str, image_size: Sequence[int],
           quantize: str = "none", model_config: Mapping[str, Any] | None = None,
           extra: Mapping[str, Any] | None = None, select_tf_ops: bool = False,
           source: str | None = None) -> dict[str, Any]:
  """Writes `output` (.tflite) and its sidecar JSON; returns the sidecar dict."""
  size = parse_image_size(image_size, "image_size")
  check_quantize(quantize)
  data = to_tflite(model, variables, size, quantize, select_tf_ops)
  ops = op_counts(data)
  meta = sidecar(size, quantize, model_config, extra, output, ops, source)
  meta["file_bytes"] = len(data)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "wb") as f:
    f.write(data)
  with open(sidecar_path(output), "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  return meta


def export_checkpoint(checkpoint: str, output: str, image_size: Any = None,
                      quantize: str = "none", select_tf_ops: bool = False) -> dict[str, Any]:
  """The export command: checkpoint -> `output` + sidecar. Settings are validated first.

  `checkpoint` is anything `mobileiqa_jax.load` takes (a checkpoint folder, a workdir, a
  state dict); the default input size is the checkpoint's.
  """
  from mobileiqa_jax import inference  # pylint: disable=g-import-not-at-top
  check_quantize(quantize)
  parse_image_size(image_size, "--image_size")
  if not output.endswith(".tflite"):
    raise ValueError(f"--output must name a .tflite file, got {output!r}.")
  # What `load` accepts (checkpoint, workdir, the authors' .pkl), in float32 as predict scores.
  scorer = inference.load(checkpoint, image_size)
  model = export_model_for(scorer.model_config)
  return export(model, scorer.variables, output, scorer.image_size, quantize,
                scorer.model_config, scorer.extra, select_tf_ops, source=scorer.source)


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


# Measured with ai-edge-litert 2.3 on the full student: at 1231x1907 the XNNPACK delegate (on
# by default) took the process past 13 GB (and 20 GB before the LDA strips) while the builtin
# CPU kernels run it in about 1 GB above the model; at 512x512 XNNPACK runs fine.
XNNPACK_MAX_PIXELS = 1024 * 1024


def _input_pixels(model_path: str) -> int:
  it = make_interpreter(model_path=model_path, delegate=False)
  shape = it.get_input_details()[0]["shape"]
  return int(shape[1]) * int(shape[2])


class TFLiteScorer:
  """Scores normalised NHWC float32 images with an exported model, one image per invoke.

  `xnnpack`: use LiteRT's default XNNPACK delegate; None = only for inputs up to
  XNNPACK_MAX_PIXELS (see there).
  """

  def __init__(self, model_path: str, num_threads: int | None = None,
               xnnpack: bool | None = None):
    self.model_path = model_path
    if xnnpack is None:
      xnnpack = _input_pixels(model_path) <= XNNPACK_MAX_PIXELS
    self.xnnpack = xnnpack
    self.interpreter = make_interpreter(model_path=model_path, num_threads=num_threads,
                                        delegate=xnnpack)
    self.interpreter.allocate_tensors()
    self._in = self.interpreter.get_input_details()[0]
    self._out = self.interpreter.get_output_details()[0]
    self.input_shape = tuple(int(s) for s in self._in["shape"])
    meta_path = sidecar_path(model_path)
    self.meta = None
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        self.meta = json.load(f)

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
