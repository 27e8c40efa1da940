"""TFLite (LiteRT) conversion: a MobileIQA model -> one `.tflite` file; its ops; its interpreter.

`exporter.export` writes the file and its sidecar; `runtime_scorer.ExportedScorer` runs it.

What is converted is the whole scorer: ONE normalised RGB image, NHWC float32 of a fixed
(1, H, W, 3) shape, in ('image'); ONE score, float32 of shape (1,), out ('score'; the student's
sigmoid output in [0, 1]).

## The path, and why this one (jax 0.10.2, TensorFlow(-cpu) 2.21, ai-edge-litert 2.3)

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
  array (616x954x512 float32, 1.2 GB, at 1231x1907), so that graph has 3646 ops whose
  intermediate tensors sum to 11.8 GiB already at 512x512 (row-strip exported), and under
  XNNPACK the process goes from 0.7 GB after loading to 2.1 GB peak at 512x512, and past
  8 GB at 1231x1907. `tf.nn.gelu(approximate=False)` instead converts to TFLite's own GELU op
  in exact mode, one kernel that XNNPACK (and the GPU delegate) run in one pass. Reaching that
  op from StableHLO needs a `jax.lax.composite`, which this TF cannot read (version skew:
  jax 0.10 writes StableHLO 1.15, TF 2.21 reads 1.13; "unregistered operation
  'vhlo.composite_v2'"), hence TF ops for the whole LDA.
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
- Quantisation is the converter's post-training kind, needing no calibration data:
  `float16` stores weights in float16 (about half the file; dequantised at load on CPU),
  `dynamic_int8` stores weights in int8 with dynamic-range int8 kernels for the FULLY_CONNECTED
  / CONV layers (about a quarter of the file). Full integer quantisation would need a
  representative data set and is not offered.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mobileiqa_jax.data import preprocess
from mobileiqa_jax.export import sidecar

# The converter's post-training quantisations (no calibration data needed).
QUANTIZATIONS = ("none", "float16", "dynamic_int8")


class ConversionError(RuntimeError):
  """The TFLite converter could not convert the model (e.g. an op TFLite lacks)."""


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
    quantize: one of `QUANTIZATIONS`: 'none', 'float16' or 'dynamic_int8'.
    select_tf_ops: allow TensorFlow (Flex) kernels for ops TFLite lacks.

  Returns:
    The .tflite flatbuffer bytes; signature 'serving_default', input 'image', output 'score'.

  Raises:
    ValueError: a bad `image_size` or `quantize`.
    ConversionError: the converter failed (e.g. an op TFLite lacks, without `select_tf_ops`).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  h, w = preprocess.parse_image_size(image_size, "image_size")
  if quantize not in QUANTIZATIONS:
    raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}; got {quantize!r}.")
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
    return {sidecar.OUTPUT_NAME: head(*views)}

  module.serve = tf.function(
      serve, autograph=False,
      input_signature=[tf.TensorSpec((1, h, w, 3), tf.float32, name=sidecar.INPUT_NAME)])
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
    raise ConversionError(f"TFLite conversion failed at {h}x{w}, quantize={quantize}: {e}.{hint}"
                      ) from e


def op_counts(tflite_model: bytes) -> dict[str, int]:
  """{op name: count} of the model's main graph (delegation not applied)."""
  it = make_interpreter(model_content=tflite_model, delegate=False)
  counts: dict[str, int] = {}
  for d in it._get_ops_details():  # pylint: disable=protected-access
    counts[d["op_name"]] = counts.get(d["op_name"], 0) + 1
  return counts


def versions() -> dict[str, Any]:
  """The converting libraries' versions, for the sidecar's `exported_with`."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "tensorflow": tf.__version__}


# ----------------------------------------------------------------------------- running it


def make_interpreter(model_path: str | None = None, model_content: bytes | None = None,
                     num_threads: int | None = None, delegate: bool = True):
  """A LiteRT interpreter (`ai_edge_litert`), or TensorFlow's `tf.lite.Interpreter` without it.

  `delegate=False` turns XNNPACK off (the builtin reference kernels; op inspection).
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


def runtime_version() -> str:
  """The interpreter `make_interpreter` uses, with its version ('ai-edge-litert 2.3.0')."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return f"ai-edge-litert {metadata.version('ai-edge-litert')}"
  except metadata.PackageNotFoundError:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return f"tensorflow {tf.__version__} (tf.lite)"
