"""The model card: what a MobileIQA checkpoint costs (parameters, MACs, FLOPs, time, memory).

    card = model_card.profile("MobileNet_IQA.pkl", image_size=(1231, 1907))
    print("\\n".join(model_card.table(card)))

`launch/model_card.py` prints it. The figures, for one image (batch 1) at the given size:

- params, params_backbone, params_head: parameters (not BatchNorm statistics); the backbone
  is the `global_vit` / `local_cnn` subtree, the head everything else (LDAs, MALs, fusion
  MAL, regressor). They do not depend on the weights or the input size.
- gmacs: multiply-accumulates of one forward pass, counted from the jaxpr as fvcore and
  ptflops count them (`mobileiqa_jax/profiling/macs.py` says exactly what is counted), with
  `macs_by_kind` beside it. The model is traced in its reference form: depthwise convolutions
  as grouped convolutions and the LDAs unbanded (`count_model_macs`).
- gflops: floating-point operations of the compiled forward pass by XLA's own cost
  analysis on this host (the form that runs here), for comparison: a MAC is two FLOPs, and
  XLA also counts elementwise operations.
- jax_latency_s, jax_compile_s, jax_peak_rss_gb: the jitted float32 forward pass on this
  machine, timed in a fresh child process (median of `repeats` runs after the compiling
  one); peak RSS is that whole process's (weights, compiled program, buffers). The load
  average beside them says how busy the machine was.

- exports (opt-in, `exports=('tflite', 'onnx')`, `--exports` of launch/model_card.py): per
  format, the checkpoint exported at the card's size (`exporter.export_checkpoint`, float32,
  in a child process) into a temporary folder and run once in a fresh process, as an app
  would (`runtime_scorer.probe`: LiteRT with XNNPACK; ONNX Runtime's CPU provider; 2
  threads): latency, that process's peak RSS and the file size, from the sidecar's
  `runtime`. Conversion takes minutes at full size.

Every measurement runs in a fresh process (`process.call_in_child`): there, the peak memory
(`process.peak_rss_bytes`) is the model's alone and a conversion's memory stays out of the
caller.

`AIM2024_UHD_IQA_BUDGET_GMACS` is the AIM 2024 UHD-IQA challenge's cap per image.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from typing import Any, Mapping, Sequence

from mobileiqa_jax.profiling import process

# The AIM 2024 UHD-IQA challenge capped entries at 50 GMACs per image; MobileIQA scores its
# photos at 1231x1907, the size the card is checked at in the README.
AIM2024_UHD_IQA_BUDGET_GMACS = 50.0


def param_counts(variables: Mapping[str, Any], backbone_name: str) -> dict[str, int]:
  """Parameters in total, in the backbone (`variables['params'][backbone_name]`) and the head."""
  import jax  # pylint: disable=g-import-not-at-top

  def n(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))

  params = variables["params"]
  total = n(params)
  backbone = n(params.get(backbone_name, {}))
  return {"params": total, "params_backbone": backbone, "params_head": total - backbone}


def count_model_macs(model_config: Mapping[str, Any], image_size: Sequence[int],
                     batch: int = 1) -> Any:
  """`macs.MacCount` of one inference forward pass of the model `model_config` describes.

  Traced in the reference form (see `mobileiqa_jax/profiling/macs.py`): grouped-conv
  depthwise layers and unbanded LDAs, in float32. Nothing is computed; no weights are needed.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mobileiqa_jax.profiling import macs  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import runtime  # pylint: disable=g-import-not-at-top

  # Float32 and grouped-conv depthwise layers: the form whose convolutions the counter sees.
  # The LDAs whole: where PyTorch's pooling windows overlap, the row bands compute the shared
  # rows twice, which is this implementation's work, not the model's.
  model = mobileiqa.build_model(model_config, dataclasses.replace(runtime.FOR_EXPORT,
                                                                  lda="whole"))
  images = jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  return macs.count_macs(lambda v, x: model.apply(v, x, train=False), variables, images)


def measure_forward(checkpoint: str, image_size: Sequence[int], repeats: int = 3
                    ) -> dict[str, Any]:
  """Compiles and times the jitted forward pass in THIS process (see `measure_in_child`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mobileiqa_jax.scoring import scorer as scorer_lib  # pylint: disable=g-import-not-at-top

  scorer = scorer_lib.load(checkpoint, image_size, batch_size=1, attention="reference")
  forward = jax.jit(lambda v, x: scorer.model.apply(v, x, train=False))
  variables = jax.device_put(scorer.variables)
  images = jax.device_put(np.zeros((1, *scorer.image_size, 3), np.float32))
  t0 = time.perf_counter()
  compiled = forward.lower(variables, images).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0] if cost else {}
  times = []
  for _ in range(1 + repeats):  # The first run pays for allocation; it is not counted.
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, images))
    times.append(time.perf_counter() - t0)
  return {
      "gflops": float(cost.get("flops", float("nan"))) / 1e9,
      "jax_compile_s": compile_s,
      "jax_latency_s": statistics.median(times[1:]),
      "jax_peak_rss_gb": process.peak_rss_bytes() / 1e9,
  }


def measure_in_child(checkpoint: str, image_size: Sequence[int], repeats: int = 3
                     ) -> dict[str, Any]:
  """`measure_forward` in a fresh Python process, so its peak memory is the model's alone.

  Raises:
    process.MeasurementError: the child failed (e.g. out of memory).
  """
  return process.call_in_child("mobileiqa_jax.profiling.model_card:measure_forward",
                               [checkpoint, list(image_size), repeats],
                               what="the timing process")


EXPORT_NAMES = {"tflite": "TFLite (LiteRT XNNPACK)", "onnx": "ONNX (ONNX Runtime CPU)"}


def check_exports(exports: Sequence[str]) -> tuple[str, ...]:
  bad = [e for e in exports if e not in EXPORT_NAMES]
  if bad:
    raise ValueError(f"--exports takes {', '.join(EXPORT_NAMES)} (comma-separated); got "
                     f"{', '.join(map(repr, bad))}.")
  return tuple(exports)


def measure_export(checkpoint: str, image_size: Sequence[int], fmt: str) -> dict[str, Any]:
  """Exports `checkpoint` to `fmt` in a temporary folder; what running it once cost.

  The export's own probe runs the written file in a fresh process (weights included in its
  peak RSS); the file is deleted afterwards.
  """
  import tempfile  # pylint: disable=g-import-not-at-top

  from mobileiqa_jax.export import exporter  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    meta = exporter.export_checkpoint(checkpoint, os.path.join(tmp, f"model.{fmt}"),
                                      list(image_size), fmt=fmt)
  runtime = meta["runtime"] or {}
  if not runtime:
    raise process.MeasurementError(f"the {fmt} export could not be run (requires_flex)")
  return {
      "latency_s": runtime["measured_invoke_ms"] / 1e3,
      "peak_rss_gb": runtime["expected_peak_rss_bytes"] / 1e9,
      "file_mb": meta["file_bytes"] / 1e6,
      "runtime": runtime.get("delegate") or runtime.get("execution_provider"),
      "num_threads": runtime["num_threads"],
  }


def measure_export_in_child(checkpoint: str, image_size: Sequence[int], fmt: str
                            ) -> dict[str, Any]:
  """`measure_export` in a fresh Python process (see the module docstring)."""
  return process.call_in_child("mobileiqa_jax.profiling.model_card:measure_export",
                               [checkpoint, list(image_size), fmt], what=f"the {fmt} export")


def machine() -> str:
  """This host in a few words: CPU, cores, memory."""
  try:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    mem_gb = float("nan")
  cpu = platform.processor() or platform.machine()
  return f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB, {platform.system()}"


def profile(checkpoint: str, image_size: Any = None, *, measure: bool = True,
            repeats: int = 3, exports: Sequence[str] = ()) -> dict[str, Any]:
  """The model card of `checkpoint` (anything `mobileiqa_jax.load` takes) at `image_size`.

  Args:
    checkpoint: a checkpoint folder, a training workdir or a `.pkl`/`.pth` state dict.
    image_size: (height, width) or 'H,W'; default the checkpoint's (1231x1907 for a state dict).
    measure: also compile and time the forward pass in a child process (gflops, latency,
      peak memory); False gives the counts only (seconds, even at full size).
    repeats: timed runs after the first.
    exports: formats ('tflite', 'onnx') to export and time as well (`measure_export`).

  Returns:
    A JSON-serialisable dict; see the module docstring for its fields.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from mobileiqa_jax.scoring import scorer as scorer_lib  # pylint: disable=g-import-not-at-top

  exports = check_exports(exports)
  scorer = scorer_lib.load(checkpoint, image_size, batch_size=1, attention="reference")
  config = scorer.model_config
  count = count_model_macs(config, scorer.image_size)
  card: dict[str, Any] = {
      "model": config.get("variant"),
      "backbone": config.get("backbone"),
      "checkpoint": scorer.source,
      "image_size": list(scorer.image_size),
      **param_counts(scorer.variables, config["backbone_name"]),
      "gmacs": count.total / 1e9,
      "macs_by_kind": count.to_dict(),
  }
  if config.get("variant") == "student":
    card["aim2024_budget_gmacs"] = AIM2024_UHD_IQA_BUDGET_GMACS
    card["within_aim2024_budget"] = card["gmacs"] <= AIM2024_UHD_IQA_BUDGET_GMACS
  del scorer  # The child process reloads it; no need to hold the weights twice.
  if measure:
    # Latency on a shared machine carries its load: recorded beside it.
    card["load_average"] = round(os.getloadavg()[0], 2)
    card.update(measure_in_child(checkpoint, card["image_size"], repeats))
  if exports:
    card.setdefault("load_average", round(os.getloadavg()[0], 2))
    card["exports"] = {fmt: measure_export_in_child(checkpoint, card["image_size"], fmt)
                       for fmt in exports}
  card.update({
      "machine": machine(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
      "jax": jax.__version__,
  })
  return card


def table(card: Mapping[str, Any]) -> list[str]:
  """The card as aligned text lines."""
  h, w = card["image_size"]
  kinds = card["macs_by_kind"]
  rows = [
      ("model", f"{card['model']} ({card['backbone']}), {card['checkpoint']}"),
      ("input", f"1 x {h} x {w} x 3 (batch, height, width, RGB)"),
      ("parameters", f"{card['params'] / 1e6:.2f} M = backbone "
                     f"{card['params_backbone'] / 1e6:.2f} M + head "
                     f"{card['params_head'] / 1e6:.2f} M"),
      ("MACs", f"{card['gmacs']:.2f} G = conv {kinds['conv'] / 1e9:.2f} + matmul "
               f"{kinds['dot'] / 1e9:.2f} + norm {kinds['norm'] / 1e9:.3f} + resize "
               f"{kinds['resize'] / 1e9:.3f} + pool {kinds['pool'] / 1e9:.3f}"),
  ]
  if "within_aim2024_budget" in card:
    verdict = "within" if card["within_aim2024_budget"] else "OVER"
    rows.append(("AIM 2024 budget", f"{verdict} {card['aim2024_budget_gmacs']:.0f} GMACs"))
  if "gflops" in card:
    rows += [
        ("XLA FLOPs", f"{card['gflops']:.2f} G (XLA cost analysis, this host's form)"),
        ("JAX latency", f"{card['jax_latency_s']:.3f} s per image (float32, batch 1; "
                        f"compile {card['jax_compile_s']:.1f} s)"),
        ("JAX peak RSS", f"{card['jax_peak_rss_gb']:.2f} GB (whole process)"),
        ("load average", f"{card['load_average']} (1 min, when the timing started)"),
    ]
  for fmt, e in card.get("exports", {}).items():
    rows.append((f"{fmt} export", f"{e['latency_s']:.3f} s per image, peak RSS "
                                  f"{e['peak_rss_gb']:.2f} GB (whole process), "
                                  f"{e['file_mb']:.1f} MB file; {EXPORT_NAMES[fmt]}, "
                                  f"{e['num_threads']} threads, float32"))
  if "exports" in card and "gflops" not in card:
    rows.append(("load average", f"{card['load_average']} (1 min, when the timing started)"))
  rows.append(("measured", f"{card['date']}, {card['machine']}, jax {card['jax']}"))
  width = max(len(k) for k, _ in rows)
  return [f"{k:<{width}}  {v}" for k, v in rows]
