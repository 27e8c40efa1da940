"""Scoring with an exported model, as an app would: LiteRT for `.tflite`, ONNX Runtime for `.onnx`.

    scorer = ExportedScorer("student.tflite", num_threads=2)
    score = scorer.score_file("photo.jpg")

`ExportedScorer` picks the runtime from the sidecar's "format" (`sidecar.model_format`), or
from the file's extension where there is no sidecar. `probe` runs one in a fresh process and
reports what that cost (peak resident memory, latency): the figures `exporter.export` records
in the sidecar's `runtime`.

The runtimes, as apps run them:
- TFLite: `ai_edge_litert`'s interpreter (TensorFlow's `tf.lite.Interpreter` without it) with
  its default XNNPACK delegate, or (`xnnpack=False`) its builtin reference kernels. The model
  takes one image per invoke.
- ONNX: ONNX Runtime's CPU execution provider. The model takes a dynamic batch; `batch_size`
  images go into each run.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mobileiqa_jax.data import preprocess
from mobileiqa_jax.export import onnx as onnx_lib
from mobileiqa_jax.export import sidecar
from mobileiqa_jax.export import tflite as tflite_lib
from mobileiqa_jax.profiling import process


class ExportedScorer:
  """Scores normalised NHWC float32 images with an exported `.tflite` or `.onnx` model.

  Attributes:
    model_path: the model file.
    format: 'tflite' or 'onnx'.
    meta: its sidecar (`sidecar.read_sidecar`), or None where there is none.
    input_shape: the model's input shape as the runtime reports it: (1, H, W, 3) for TFLite,
      ('batch', H, W, 3) for ONNX.
    runtime: what runs it, in words: 'XNNPACK', 'none (builtin kernels)' or ONNX Runtime's
      provider.
  """

  def __init__(self, model_path: str, num_threads: int | None = None, *,
               xnnpack: bool = True, batch_size: int | None = None):
    """Loads `model_path` into its runtime.

    Args:
      model_path: a `.tflite` or `.onnx` file written by `exporter.export`.
      num_threads: the runtime's threads (None: its default).
      xnnpack: TFLite only: LiteRT's default XNNPACK delegate, as apps use; False: the
        builtin reference kernels.
      batch_size: ONNX only: images per run (None: all given at once). A TFLite model takes
        one image per invoke.

    Raises:
      ValueError: the format cannot be told, or a setting of the other format is given.
    """
    self.model_path = model_path
    self.meta = sidecar.read_sidecar(model_path)
    self.format = sidecar.model_format(model_path, self.meta)
    self.num_threads = num_threads
    if self.format == "tflite":
      if batch_size not in (None, 1):
        raise ValueError(f"{model_path} takes one image per invoke; batch_size={batch_size} "
                         "applies to an ONNX model only.")
      self.batch_size = 1
      self.runtime = "XNNPACK" if xnnpack else "none (builtin kernels)"
      self._interpreter = tflite_lib.make_interpreter(model_path=model_path,
                                                      num_threads=num_threads, delegate=xnnpack)
      self._interpreter.allocate_tensors()
      self._in = self._interpreter.get_input_details()[0]
      self._out = self._interpreter.get_output_details()[0]
      self.input_shape: tuple[Any, ...] = tuple(int(s) for s in self._in["shape"])
    else:
      if not xnnpack:
        raise ValueError(f"{model_path} runs in ONNX Runtime; xnnpack=False applies to a "
                         "TFLite model only.")
      self.batch_size = batch_size
      self.runtime = onnx_lib.PROVIDER
      self._session = onnx_lib.make_session(model_path, num_threads)
      inp = self._session.get_inputs()[0]
      self._input_name = inp.name
      self.input_shape = tuple(inp.shape)

  @property
  def image_size(self) -> tuple[int, int]:
    """(H, W) of the model's input."""
    return int(self.input_shape[1]), int(self.input_shape[2])

  def _run(self, images: np.ndarray) -> np.ndarray:
    """Scores of one runtime call on `images` (len 1 for TFLite), float32 (len(images),)."""
    if self.format == "tflite":
      self._interpreter.set_tensor(self._in["index"], images)
      self._interpreter.invoke()
      out = self._interpreter.get_tensor(self._out["index"])
    else:
      out = self._session.run(None, {self._input_name: images})[0]
    return np.asarray(out, np.float32).reshape(-1)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Scores of normalised images, (N, H, W, 3) or one (H, W, 3); float32 (N,)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
      images = images[None]
    if images.shape[1:] != (*self.image_size, 3):
      raise ValueError(f"the model takes images of shape {(*self.image_size, 3)} (H, W, 3), "
                       f"got {images.shape[1:]}")
    step = self.batch_size or len(images)
    return np.concatenate([self._run(images[i:i + step])
                           for i in range(0, len(images), step)])

  def score_file(self, path: str) -> float:
    """Decode + the reference preprocessing + score, as an app would."""
    with open(path, "rb") as f:
      img = preprocess.decode_rgb(f.read(), path)
    return float(self(preprocess.resize_normalize(img, self.image_size))[0])

  def time_invoke(self, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of one runtime call on one random image, after `warmup` calls."""
    x = np.random.RandomState(0).standard_normal((1, *self.image_size, 3)).astype(np.float32)
    for _ in range(warmup):
      self._run(x)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      self._run(x)
      times.append(time.perf_counter() - t)
    return float(np.median(times))

  def runtime_version(self) -> str:
    """The runtime library and its version ('ai-edge-litert 2.3.0', 'onnxruntime 1.32.0')."""
    if self.format == "tflite":
      return tflite_lib.runtime_version()
    return onnx_lib.runtime_version()


def measure_once(model_path: str, num_threads: int = 2, xnnpack: bool = True
                 ) -> dict[str, Any]:
  """Loads `model_path` in THIS process and scores one random image twice; what it cost.

  What `probe` runs in a fresh process: the second run is timed, the first pays for
  allocation. Returns {'peak_rss_bytes' (this process's peak, weights included),
  'invoke_ms', 'num_threads', 'runtime' (library and version) and 'delegate' (TFLite) or
  'provider' (ONNX)}.
  """
  scorer = ExportedScorer(model_path, num_threads, xnnpack=xnnpack)
  ms = 1e3 * scorer.time_invoke(repeats=1, warmup=1)
  out = {"peak_rss_bytes": process.peak_rss_bytes(), "invoke_ms": round(ms, 1),
         "num_threads": int(num_threads), "runtime": scorer.runtime_version()}
  out["delegate" if scorer.format == "tflite" else "provider"] = scorer.runtime
  return out


def probe(model_path: str, num_threads: int = 2, xnnpack: bool = True,
          timeout_s: float = 600.0) -> dict[str, Any]:
  """Runs the model once in a fresh process, as an app would; returns what it cost there.

  The child imports the runtime (LiteRT or ONNX Runtime), numpy and this module, no JAX or
  TensorFlow, so its peak resident memory is the model's and the runtime's: see
  `measure_once` for what it returns.

  Raises:
    process.MeasurementError: the child failed or timed out (with its last error line).
  """
  fmt = sidecar.model_format(model_path, sidecar.read_sidecar(model_path))
  what = f"running {model_path} in {'LiteRT' if fmt == 'tflite' else 'ONNX Runtime'}"
  return process.call_in_child("mobileiqa_jax.export.runtime_scorer:measure_once",
                               [model_path, int(num_threads), bool(xnnpack)], what=what,
                               timeout_s=timeout_s)
