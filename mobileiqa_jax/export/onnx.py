"""ONNX export: a MobileIQA checkpoint -> one `.onnx` file (ONNX Runtime) + the JSON sidecar.

    python launch/export.py --format=onnx --checkpoint=DIR --output=model.onnx [--image_size=H,W]

What is exported is the whole scorer, as for TFLite (`mobileiqa_jax/export/tflite.py`), but with a
dynamic batch: normalised RGB images, NHWC float32 of shape (batch, H, W, 3), in ('image');
scores, float32 (batch,), out ('score'). The sidecar (`model.json`) is `tflite.sidecar`'s.

## The route, and why this one (measured 2026-12-03; jax 0.10.2, TF 2.21, onnx 1.23.2,
## onnxruntime 1.32.0; docs/performance.md has the numbers)

    jax2onnx.to_onnx(model.apply with the weights closed over, [('batch', H, W, 3)])
    --> ONNX opset 21: Conv (grouped for the depthwise layers), Einsum, Gelu, Softmax, ...
        and each banded LDA's `lax.scan` as one ONNX Loop over its pooled row bands.

- tf2onnx on the TensorFlow graph the TFLite export builds fails: jax 0.10's jax2tf writes
  every JAX part as an `XlaCallModule` (StableHLO), and tf2onnx 1.17 (its latest release) has
  no handler for that op; it stops on the op's attributes ("Could not infer the attribute
  type"). Only the LDAs there are TF ops. That route would need the whole model rewritten in
  TF ops.
- jax2onnx (PyPI, Apache-2.0, releases monthly, 0.17.1 of 2026-10-13) converts the jaxpr
  directly. It handles this model unchanged (one call-site keyword in `layers.avg_pool2d`,
  where its flax plugin takes `window_shape` by keyword only), with a symbolic batch. The
  model's banded LDA (`mobileiqa._banded_gelu_pool_rows`, a `lax.scan` over pooled row bands)
  becomes an ONNX Loop, so ONNX Runtime holds one band's (B, K, W, 2C) hidden activation at a
  time, never the (B, H, W, 2C) one: the full student at 1231x1907 peaks at 1.25-1.40 GB RSS
  under the CPU provider, weights included, and scores as JAX does to float32 rounding.
- jax2onnx's metadata pins `orbax-checkpoint<0.11.37` and pulls equinox, dm-pix, netron and
  orbax-export, for its own examples and for plugins of other libraries; its converter needs
  only onnx, onnx-ir and numpy (plugins whose library is absent are skipped with a logged
  warning, silenced here). Installing it with its dependencies would downgrade this
  project's orbax-checkpoint, so it is installed with `pip install --no-deps jax2onnx` (the
  `onnx` extra in pyproject.toml holds the rest; `.ci/run` does both).
- No quantisation: the ONNX model is float32 (ONNX Runtime's own quantiser could be applied
  to the file afterwards; not offered here).
- After writing the file, `export` runs it once in a fresh process that imports only
  onnxruntime and numpy (`probe`: CPU provider, 2 intra-op threads); the sidecar's `runtime`
  records the peak resident memory and latency measured there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Iterator, Sequence

import numpy as np

from mobileiqa_jax.data import preprocess

OPSET = 21
BATCH_DIM = "batch"
INPUT_NAME = "image"
OUTPUT_NAME = "score"
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
    proto = jax2onnx.to_onnx(score, [(BATCH_DIM, h, w, 3)], model_name="mobileiqa",
                             opset=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
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
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out: dict[str, Any] = {}
  for name in ("jax", "jax2onnx", "onnx"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  out["opset"] = OPSET
  return out


def runtime_version() -> str | None:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("onnxruntime")
  except Exception:  # pylint: disable=broad-except
    return None


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


def probe(model_path: str, num_threads: int = 2, timeout_s: float = 600.0) -> dict[str, Any]:
  """Runs the model once in a fresh process (onnxruntime and numpy only); what it cost there.

  Returns {'peak_rss_bytes' (the child's VmHWM: the whole process, weights included),
  'invoke_ms' (the second of two runs on a random (1, H, W, 3) input), 'provider',
  'num_threads'}. Raises RuntimeError with the child's error if it fails.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "mobileiqa_jax.export.onnx", "--probe", model_path,
         str(int(num_threads))]
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s,
                        check=False)
  if proc.returncode:
    raise RuntimeError(f"running {model_path} in ONNX Runtime failed: "
                       f"{proc.stderr.strip()[-800:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe_main(model_path: str, num_threads: str) -> None:
  session = make_session(model_path, int(num_threads))
  inp = session.get_inputs()[0]
  shape = [1 if isinstance(d, str) or d is None else int(d) for d in inp.shape]
  x = np.random.RandomState(0).standard_normal(shape).astype(np.float32)
  session.run(None, {inp.name: x})
  t = time.perf_counter()
  session.run(None, {inp.name: x})
  ms = 1e3 * (time.perf_counter() - t)
  with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
  print(json.dumps({"peak_rss_bytes": peak, "invoke_ms": round(ms, 1),
                    "num_threads": int(num_threads), "provider": PROVIDER}))


class OnnxScorer:
  """Scores normalised NHWC float32 images with an exported `.onnx` model (CPU provider).

  `batch_size`: images per run (None: all given at once; the model takes any batch).
  """

  def __init__(self, model_path: str, num_threads: int | None = None,
               batch_size: int | None = None):
    self.model_path = model_path
    self.batch_size = batch_size
    self.session = make_session(model_path, num_threads)
    inp = self.session.get_inputs()[0]
    self.input_name = inp.name
    self.input_shape = tuple(inp.shape)
    from mobileiqa_jax.export import tflite  # pylint: disable=g-import-not-at-top
    self.meta = tflite.read_sidecar(model_path)

  @property
  def image_size(self) -> tuple[int, int]:
    return int(self.input_shape[1]), int(self.input_shape[2])

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
      images = images[None]
    if images.shape[1:] != (*self.image_size, 3):
      raise ValueError(f"the model takes images of shape {(*self.image_size, 3)} (H, W, 3), "
                       f"got {images.shape[1:]}")
    step = self.batch_size or len(images)
    return np.concatenate([
        np.asarray(self.session.run(None, {self.input_name: images[i:i + step]})[0],
                   np.float32).reshape(-1) for i in range(0, len(images), step)])

  def score_file(self, path: str) -> float:
    """Decode + the reference preprocessing + score, as an app would."""
    with open(path, "rb") as f:
      img = preprocess.decode_rgb(f.read(), path)
    return float(self(preprocess.resize_normalize(img, self.image_size))[0])


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) == 4 and sys.argv[1] == "--probe":
    _probe_main(*sys.argv[2:])
  else:
    sys.exit("usage: python -m mobileiqa_jax.export.onnx --probe MODEL.onnx THREADS"
             " (the export command is launch/export.py --format=onnx)")
