"""Mobile export: a MobileIQA checkpoint -> one model file (TFLite or ONNX) + its JSON sidecar.

    python launch/export.py --checkpoint=DIR --output=model.tflite \
        [--image_size=H,W] [--quantize=none|float16|dynamic_int8] [--overwrite]
    python launch/export.py --format=onnx --checkpoint=DIR --output=model.onnx [--overwrite]

`export` converts (`tflite.to_tflite`: LiteRT, a fixed batch of 1; `onnx.to_onnx`: ONNX
Runtime, a dynamic batch, float32), writes the file and its sidecar (`sidecar.build`, at
`<output>.json`: `model.tflite.json`), then runs the written file once in a fresh process
(`runtime_scorer.probe`: LiteRT with XNNPACK or ONNX Runtime's CPU provider, 2 threads) and
records in the sidecar's `runtime` the peak resident memory and latency measured there, for
the app's budget.

An existing model file or sidecar at the output is never replaced without `overwrite`
(`--overwrite`): a finished export takes minutes to redo.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from mobileiqa_jax import storage
from mobileiqa_jax.data import preprocess
from mobileiqa_jax.export import onnx as onnx_lib
from mobileiqa_jax.export import runtime_scorer
from mobileiqa_jax.export import sidecar
from mobileiqa_jax.export import tflite as tflite_lib

# --format: TFLite (LiteRT, phones; the default) or ONNX (ONNX Runtime).
FORMATS = ("tflite", "onnx")
# --quantize: the TFLite converter's post-training kinds.
QUANTIZATIONS = tflite_lib.QUANTIZATIONS


class ExportError(RuntimeError):
  """The model could not be converted, or the written file could not be run.

  E.g. an op TFLite lacks, without --select_tf_ops.
  """


# ----------------------------------------------------------------------------- settings


def check_quantize(quantize: str) -> str:
  """--quantize, checked against `QUANTIZATIONS`."""
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


def check_overwrite(output: str, overwrite: bool) -> None:
  """Refuses to replace an existing model file or sidecar unless `overwrite`.

  Nothing already exported is lost by a repeated or mistyped command.

  Raises:
    FileExistsError: `output` or its sidecar exists and `overwrite` is False; one line that
      names the file and says to pass --overwrite.
  """
  if overwrite:
    return
  storage.check_bucket(output)
  if storage.exists(output) or os.path.lexists(output):
    raise FileExistsError(f"--output={output} already holds a file; pass --overwrite to "
                          "replace it, or choose another --output.")
  side = sidecar.sidecar_path(output)
  if storage.exists(side) or os.path.lexists(side):
    raise FileExistsError(f"{side} (the sidecar of --output={output}) already exists; pass "
                          "--overwrite to replace it, or choose another --output.")


# ----------------------------------------------------------------------------- entry points


def export(model: Any, variables: Any, output: str, image_size: Sequence[int],
           quantize: str = "none", model_config: Mapping[str, Any] | None = None,
           extra: Mapping[str, Any] | None = None, select_tf_ops: bool = False,
           source: str | None = None, measure: bool = True,
           num_threads: int = 2, fmt: str = "tflite", overwrite: bool = False
           ) -> dict[str, Any]:
  """Writes `output` (.tflite, or .onnx with `fmt='onnx'`) and its sidecar JSON.

  Args:
    model: a `mobileiqa.MobileIQA` built with `models.runtime.FOR_EXPORT`.
    variables: its variables ({'params', 'batch_stats'}).
    output: the model file to write; the sidecar goes to `sidecar.sidecar_path(output)`.
    image_size: (H, W) of the exported input.
    quantize: one of `QUANTIZATIONS` (TFLite only).
    model_config: the model's config, recorded in the sidecar.
    extra: the checkpoint's extra metadata ('mos_range' becomes the sidecar's MOS mapping).
    select_tf_ops: TFLite only: allow TensorFlow (Flex) kernels for ops TFLite lacks.
    source: the checkpoint exported, recorded in the sidecar.
    measure: run the written model once in a fresh process (`runtime_scorer.probe`,
      `num_threads`) and record its peak memory and latency in the sidecar's `runtime`. A
      TFLite model that needs Flex kernels is not run: `ai_edge_litert` has none.
    num_threads: the runtime's threads for that run.
    fmt: one of `FORMATS`.
    overwrite: replace an existing `output` or sidecar.

  Returns:
    The sidecar dict.

  Raises:
    ValueError: a bad setting.
    FileExistsError: `output` or its sidecar exists and `overwrite` is False.
    ExportError: the conversion failed, or the written model could not be run.
  """
  size = preprocess.parse_image_size(image_size, "image_size")
  check_quantize(quantize)
  check_format(fmt, output, quantize, select_tf_ops)
  check_overwrite(output, overwrite)
  if fmt == "onnx":
    data = onnx_lib.to_onnx(model, variables, size)
    ops = onnx_lib.op_counts(data)
    versions = onnx_lib.versions()
  else:
    try:
      data = tflite_lib.to_tflite(model, variables, size, quantize, select_tf_ops)
    except tflite_lib.ConversionError as e:
      raise ExportError(str(e)) from e
    ops = tflite_lib.op_counts(data)
    versions = tflite_lib.versions()
  meta = sidecar.build(size, quantize, model_config, extra, output, ops, source, fmt=fmt,
                       exported_with=versions)
  meta["file_bytes"] = len(data)
  storage.makedirs(storage.dirname(storage.absolute(output)))
  storage.write_atomic(output, data)
  del data
  sidecar.write_sidecar(output, meta)
  if measure and not meta.get("requires_flex", False):
    try:
      # The runtimes open a local file: a model written to a bucket is run from a copy.
      with storage.local_file(output, os.path.splitext(output)[1]) as local:
        measured = runtime_scorer.probe(local, num_threads)
    except (RuntimeError, OSError, ValueError) as e:  # the probe's message names the runtime
      raise ExportError(f"{output} was written; {e}") from e
    meta["runtime"] = sidecar.runtime_entry(measured)
    sidecar.write_sidecar(output, meta)
  return meta


def export_checkpoint(checkpoint: str, output: str, image_size: Any = None,
                      quantize: str = "none", select_tf_ops: bool = False,
                      fmt: str = "tflite", overwrite: bool = False) -> dict[str, Any]:
  """The export command: checkpoint -> `output` + sidecar. Settings are checked first.

  `checkpoint` is anything `mobileiqa_jax.load` takes (a checkpoint folder, a workdir, a
  state dict); the default input size is the checkpoint's. An existing `output` or sidecar
  is refused before anything is loaded unless `overwrite`.
  """
  from mobileiqa_jax.models import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.scoring import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  check_quantize(quantize)
  preprocess.parse_image_size(image_size, "--image_size")
  check_format(fmt, output, quantize, select_tf_ops)
  check_overwrite(output, overwrite)
  # What `load` accepts (checkpoint, workdir, the authors' .pkl), in float32 as predict scores.
  scorer = scorer_lib.load(checkpoint, image_size, runtime=runtime_lib.FOR_EXPORT)
  return export(scorer.model, scorer.variables, output, scorer.image_size, quantize,
                scorer.model_config, scorer.extra, select_tf_ops, source=scorer.source,
                fmt=fmt, overwrite=overwrite)
