"""ONNX conversion: a MobileIQA model -> one `.onnx` file (ONNX Runtime); its ops; its session.

`exporter.export(..., fmt='onnx')` writes the file and its sidecar;
`runtime_scorer.ExportedScorer` runs it.

What is converted is the whole scorer, as for TFLite (`tflite.py`), but with a dynamic batch:
normalised RGB images, NHWC float32 of shape (batch, H, W, 3), in ('image'); scores, float32
(batch,), out ('score').

## The route, and why this one (jax 0.10.2, TF 2.21, onnx 1.23.2, onnxruntime 1.32.0;
## docs/performance.md has the numbers)

    jax2onnx.to_onnx(model.apply with the weights closed over, [('batch', H, W, 3)])
    --> ONNX opset 21: Conv (grouped for the depthwise layers), Einsum, Gelu, Softmax, ...
        and each banded LDA's `lax.scan` as one ONNX Loop over its pooled row bands.

- tf2onnx on the TensorFlow graph the TFLite export builds fails: jax 0.10's jax2tf writes
  every JAX part as an `XlaCallModule` (StableHLO), and tf2onnx 1.17 (its latest release) has
  no handler for that op; it stops on the op's attributes ("Could not infer the attribute
  type"). Only the LDAs there are TF ops. That route would need the whole model rewritten in
  TF ops.
- jax2onnx (PyPI, Apache-2.0; 0.17.1 here) converts the jaxpr directly. It handles this model
  unchanged (one call-site keyword in `layers.avg_pool2d`, where its flax plugin takes
  `window_shape` by keyword only), with a symbolic batch. The model's banded LDA
  (`mobileiqa._banded_gelu_pool_rows`, a `lax.scan` over pooled row bands) becomes an ONNX
  Loop, so ONNX Runtime holds one band's (B, K, W, 2C) hidden activation at a time, never the
  (B, H, W, 2C) one: the full student at 1231x1907 peaks at 1.25-1.40 GB RSS under the CPU
  provider, weights included, and scores as JAX does to float32 rounding.
- jax2onnx's metadata pins `orbax-checkpoint<0.11.37` and pulls equinox, dm-pix, netron and
  orbax-export, for its own examples and for plugins of other libraries; its converter needs
  only onnx, onnx-ir and numpy (plugins whose library is absent are skipped with a logged
  warning, silenced here). Installing it with its dependencies would downgrade this
  project's orbax-checkpoint, so it is installed with `pip install --no-deps jax2onnx` (the
  `onnx` extra in pyproject.toml holds the rest; `.ci/run` does both).
- No quantisation: the ONNX model is float32 (ONNX Runtime's own quantiser could be applied
  to the file afterwards; not offered here).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

from mobileiqa_jax.data import preprocess
from mobileiqa_jax.export import sidecar

OPSET = 21
PROVIDER = "CPUExecutionProvider"


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
  """jax2onnx logs a traceback per plugin whose library is absent, onnx_ir a line per
  untyped constant; neither is about this model."""
  loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def to_onnx(model: Any, variables: Any, image_size: Sequence[int]) -> bytes:
  """Converts `model.apply(variables, x, train=False)` at input (batch, H, W, 3) to ONNX.

  Args:
    model: a `mobileiqa.MobileIQA`, built with `models.runtime.FOR_EXPORT` (float32,
      depthwise impl 'conv': one grouped Conv per layer). Its GELU is written as
      `jax.nn.gelu` here, which jax2onnx maps to one Gelu op (`runtime.Runtime.gelu`).
    variables: its variables ({'params', 'batch_stats'}); embedded as initializers.
    image_size: (H, W), validated by `parse_image_size`.

  Returns:
    The serialised ModelProto; input 'image' (batch, H, W, 3), output 'score' (batch,).
  """
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("--format=onnx needs jax2onnx, onnx and onnxruntime: pip install "
                      "-e '.[onnx]' && pip install --no-deps jax2onnx") from e
  h, w = preprocess.parse_image_size(image_size, "image_size")
  variables = {c: dict(v) for c, v in dict(variables).items()}
  model = model.clone(gelu_form="jax_nn")

  def score(images):
    return model.apply(variables, images, train=False)

  with _quiet_converter():
    proto = jax2onnx.to_onnx(score, [(sidecar.BATCH_DIM, h, w, 3)], model_name="mobileiqa",
                             opset=OPSET, input_names=[sidecar.INPUT_NAME],
                             output_names=[sidecar.OUTPUT_NAME])
  return proto.SerializeToString()


def op_counts(model_bytes: bytes) -> dict[str, int]:
  """{op type: count} over the model's graph and its subgraphs (the Loop bodies)."""
  import onnx  # pylint: disable=g-import-not-at-top
  counts: dict[str, int] = {}

  def walk(graph):
    for node in graph.node:
      counts[node.op_type] = counts.get(node.op_type, 0) + 1
      for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
          walk(attr.g)

  walk(onnx.load_from_string(model_bytes).graph)
  return dict(sorted(counts.items()))


def versions() -> dict[str, Any]:
  """The converting libraries' versions and the opset, for the sidecar's `exported_with`."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out: dict[str, Any] = {}
  for name in ("jax", "jax2onnx", "onnx"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  out["opset"] = OPSET
  return out


def runtime_version() -> str:
  """ONNX Runtime with its version ('onnxruntime 1.32.0')."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  return f"onnxruntime {ort.__version__}"


# ----------------------------------------------------------------------------- running it


def make_session(model_path: str, num_threads: int | None = None,
                 enable_profiling: bool = False, profile_prefix: str | None = None):
  """An ONNX Runtime session on the CPU provider (`num_threads` intra-op threads)."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  opts = ort.SessionOptions()
  opts.log_severity_level = 3  # the initializers the optimiser drops are not news
  if num_threads:
    opts.intra_op_num_threads = int(num_threads)
  if enable_profiling:
    opts.enable_profiling = True
    if profile_prefix:
      opts.profile_file_prefix = profile_prefix
  return ort.InferenceSession(model_path, opts, providers=[PROVIDER])
