"""The JSON sidecar written beside an exported model: everything an app needs to score with it.

Each model file has its own sidecar, named after the WHOLE file name: `student.tflite.json`
beside `student.tflite`, `student.onnx.json` beside `student.onnx`. Exports of one checkpoint
to both formats in one folder therefore never share (and overwrite) a sidecar.

The sidecar carries the input size and layout, the resize filter, the ImageNet mean/std, the
MOS mapping when the checkpoint has one, the quantisation, the op counts, the versions that
exported it and (`runtime_entry`) what running the file once cost on the exporting machine.
Decoding and resizing stay in the app: they are image-library work, not model work.

This module imports no converter and no runtime; the converters, the runtime scorer and the
exporter all read it.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any, Mapping, Sequence

from mobileiqa_jax import storage
from mobileiqa_jax.data import preprocess

# The sidecar's "format" field, one per model format.
SIDECAR_FORMATS = {"tflite": "mobileiqa_jax.tflite/1", "onnx": "mobileiqa_jax.onnx/1"}
SIDECAR_FORMAT = SIDECAR_FORMATS["tflite"]
ONNX_SIDECAR_FORMAT = SIDECAR_FORMATS["onnx"]
# The exported model's one input and one output, in both formats.
INPUT_NAME = "image"
OUTPUT_NAME = "score"
# The symbolic batch dimension of a dynamic-batch (ONNX) model, as ONNX Runtime reports it.
BATCH_DIM = "batch"


def sidecar_path(model_path: str) -> str:
  """The sidecar of `model_path`: the whole file name plus `.json` (`m.tflite.json`)."""
  return os.fspath(model_path) + ".json"


def read_sidecar(model_path: str) -> dict[str, Any] | None:
  """The sidecar written beside `model_path`, or None where there is none."""
  path = sidecar_path(model_path)
  if not storage.exists(path):
    return None
  return json.loads(storage.read_text(path))


def write_sidecar(model_path: str, meta: Mapping[str, Any]) -> str:
  """Writes `meta` as the sidecar of `model_path`; returns the sidecar's path."""
  path = sidecar_path(model_path)
  storage.write_atomic(path, json.dumps(meta, indent=2) + "\n")
  return path


def model_format(model_path: str, meta: Mapping[str, Any] | None = None) -> str:
  """'tflite' or 'onnx': from the sidecar's "format" where there is one, else the extension.

  Raises:
    ValueError: neither names a format this package exports.
  """
  if meta and meta.get("format"):
    for fmt, tag in SIDECAR_FORMATS.items():
      if meta["format"] == tag:
        return fmt
    raise ValueError(f"{sidecar_path(model_path)} describes a {meta['format']!r} model; "
                     f"this package reads {', '.join(SIDECAR_FORMATS.values())}.")
  ext = os.path.splitext(os.fspath(model_path))[1].lstrip(".").lower()
  if ext not in SIDECAR_FORMATS:
    raise ValueError(f"{model_path} is not a .tflite or .onnx file and has no sidecar "
                     f"({sidecar_path(model_path)}) naming its format.")
  return ext


def build(image_size: Sequence[int], quantize: str, model_config: Mapping[str, Any] | None,
            extra: Mapping[str, Any] | None, model_file: str,
            ops: Mapping[str, int] | None = None, source: str | None = None,
            runtime: Mapping[str, Any] | None = None, fmt: str = "tflite",
            exported_with: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The JSON an app reads beside the model: everything to turn a photo into a score.

  Args:
    image_size: (H, W) of the model's input.
    quantize: the quantisation the model was converted with ('none' for ONNX).
    model_config: the checkpoint's model config (variant, backbone, head sizes, sigmoid).
    extra: the checkpoint's extra metadata; its 'mos_range' becomes `mos_mapping`.
    model_file: the model's path; its base name is recorded.
    ops: {op: count} of the converted graph.
    source: the checkpoint the model was exported from.
    runtime: `runtime_entry` of a measured run, or None to leave it out.
    fmt: 'tflite' (fixed batch 1; `requires_flex` recorded) or 'onnx' (a dynamic batch,
      'batch' in the shapes as ONNX Runtime reports them).
    exported_with: versions of the converting libraries.
  """
  h, w = image_size
  onnx = fmt == "onnx"
  batch: Any = BATCH_DIM if onnx else 1
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
      "format": SIDECAR_FORMATS[fmt],
      "model_file": storage.basename(model_file),
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
      "runtime": None if runtime is None else dict(runtime),
      "requires_flex": needs_flex(ops or {}),
      "ops": dict(sorted((ops or {}).items())),
      "source_checkpoint": source,
      "exported_with": dict(exported_with or {}),
  }
  if onnx:  # ONNX Runtime has no Flex question
    del meta["requires_flex"]
  return meta


def needs_flex(counts: Mapping[str, int]) -> bool:
  """Whether a TFLite model's ops include TensorFlow (Flex) or custom kernels."""
  return any(name.startswith("Flex") or name == "CUSTOM" for name in counts)


def runtime_entry(measured: Mapping[str, Any]) -> dict[str, Any]:
  """The sidecar's `runtime`: a probe's measurement (`runtime_scorer.probe`) for the app's budget.

  A LiteRT run records its `delegate`, an ONNX Runtime run its `execution_provider`.
  """
  entry: dict[str, Any] = {}
  if "provider" in measured:
    entry["execution_provider"] = measured["provider"]
  else:
    entry["delegate"] = measured["delegate"]
  entry.update({
      "num_threads": measured["num_threads"],
      "expected_peak_rss_bytes": int(measured["peak_rss_bytes"]),
      "measured_invoke_ms": measured["invoke_ms"],
      "measured_batch": 1,
      "measured_on": f"{platform.machine()}, {os.cpu_count()} cores, {measured['runtime']}",
      "note": ("peak resident memory of a fresh process that loaded the model and scored one "
               "image with this runtime (weights included); latency of that run on the "
               "exporting machine, not a phone's"),
  })
  return entry
