"""Compile a training step for a TPU or GPU topology on any host: memory, FLOPs, bytes, roofline.

In the spirit of MaxText's `train_compile.py`: with libtpu installed (`pip install -e
".[tpu-aot]"`), `jax.experimental.topologies` describes the devices of a TPU slice that is not
there (`v5e:2x2`, `v5e:4x4`, `v5p:2x2x1`, `v6e:2x2`, ...); with jax's CUDA plugin (`pip install
-e ".[gpu-aot]"`, no NVIDIA wheels and no GPU needed) it describes NVIDIA GPUs from a target
description (`h100:1`, `h100:8`, `h200:8`, `a100:8`, `h100:2x8` = 2 hosts of 8;
mobileiqa_jax/gpu_targets/). The project's own jitted train step, lowered with abstract inputs
sharded over a mesh of those devices, compiles for them. Nothing runs and no weights or
checkpoints are read; what comes back is what decides whether a run can work and how fast it
can possibly be:

- per-chip memory (`Compiled.memory_analysis()`): arguments, outputs, donated (aliased) bytes,
  temporaries. XLA:TPU refuses to compile a program whose buffers exceed the chip's HBM, and
  that refusal is the "does not fit" answer. XLA:GPU compiles anyway: a GPU step fits when its
  total is within the memory JAX's allocator may use (`XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.75 of
  the device by default).
- FLOPs and bytes accessed per step per chip, and per image. TPU: the compiled module's
  `cost_analysis()`. GPU: `cost_analysis()` answers nothing without a device, so FLOPs are XLA's
  HLO cost analysis of the step before partitioning and fusion, divided by the devices (labelled
  `cost_source` in the JSON); bytes after fusion are unknown (null), and the bytes before fusion
  are given as an upper bound only.
- a roofline: a step takes at least max(flops / peak FLOP/s, bytes / HBM bandwidth) (GPU: the
  compute term only).

Without a device, XLA:GPU cannot autotune and picks default kernels and scratch sizes: real
memory may differ somewhat from the plan.

The step compiled is exactly the trainer's (`trainer_lib.build_steps`), built with the TARGET's
runtime (`runtime.for_training(config, <target platform>)`: on TPU the 'shift' depthwise form,
on GPU XLA's grouped convolution), never this host's. A distillation config compiles the
student step with the frozen teacher, whose architecture comes from the teacher checkpoint's
stored model config when `config.teacher_checkpoint` names an existing checkpoint, else from
the teacher preset with the student's head size. The eval step is compiled too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PyTree = Any

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Per-chip figures of one TPU generation (dense, no sparsity)."""

  name: str
  device_kind: str  # jax Device.device_kind of its devices
  peak_bf16_flops: float  # FLOP/s
  peak_fp32_flops: float  # FLOP/s (derived, see CHIPS)
  hbm_bytes: float
  hbm_bytes_per_s: float
  source: str
  platform: str = "tpu"
  target_file: str = ""  # GPUs: the target description in GPU_TARGETS


#: XLA's GPU target descriptions shipped with the package (mobileiqa_jax/gpu_targets/).
GPU_TARGETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "gpu_targets")


# Google Cloud's published per-chip figures (bf16 peak, HBM capacity and bandwidth), from the
# pages named in `source`. Google publishes no fp32 peak for its TPUs: the MXU
# multiplies bf16, and an fp32 matmul at Precision.HIGHEST (the float32-exact result) takes six
# bf16 passes, so fp32 peak = bf16 peak / 6 here. HBM "GB" in those tables are GiB (XLA's
# out-of-memory message reports v5e's usable HBM as 15.75G of 16).
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", "TPU v4", 275e12, 275e12 / 6, 32 * GiB, 1200e9,
                   "https://cloud.google.com/tpu/docs/v4 (275 TFLOPs bf16, 32 GiB, 1200 GBps)"),
    "v5e": ChipSpec("v5e", "TPU v5 lite", 197e12, 197e12 / 6, 16 * GiB, 819e9,
                    "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16, 16 GB, 819 GBps)"),
    "v5p": ChipSpec("v5p", "TPU v5", 459e12, 459e12 / 6, 95 * GiB, 2765e9,
                    "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16, 95 GB, 2765 GBps)"),
    "v6e": ChipSpec("v6e", "TPU v6 lite", 918e12, 918e12 / 6, 32 * GiB, 1638e9,
                    "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16, 32 GB, 1638 GBps)"),
}

# NVIDIA's published dense (no sparsity) SXM figures, from the datasheets named in `source`: bf16 tensor-core peak and FP32 (non-tensor) peak. HBM is the target description's
# `device_memory_size` (what XLA sees), bandwidth its `memory_bandwidth`.
CHIPS.update({
    "a100": ChipSpec("a100", "NVIDIA A100-SXM4-80GB", 312e12, 19.5e12, 85100068864, 2039e9,
                     "https://www.nvidia.com/en-us/data-center/a100/ (datasheet, SXM4 80GB: 312 "
                     "TFLOPS bf16 dense, 19.5 TFLOPS FP32, 80 GB HBM2e, 2039 GB/s)", "gpu",
                     "a100_sxm_80.txtpb"),
    "h100": ChipSpec("h100", "NVIDIA H100 80GB HBM3", 989e12, 67e12, 84942979072, 3352e9,
                     "https://www.nvidia.com/en-us/data-center/h100/ (datasheet, SXM: 989 TFLOPS "
                     "bf16 dense, 67 TFLOPS FP32, 80 GB HBM3, 3.35 TB/s)", "gpu",
                     "h100_sxm.txtpb"),
    "h200": ChipSpec("h200", "NVIDIA H200 141GB HBM3e", 989e12, 67e12, 151397597184, 4800e9,
                     "https://www.nvidia.com/en-us/data-center/h200/ (datasheet, SXM: 989 TFLOPS "
                     "bf16 dense, 67 TFLOPS FP32, 141 GB HBM3e, 4.8 TB/s)", "gpu", "h200.txtpb"),
})

# Topologies this module was checked with (libtpu 0.0.42, jax-cuda13-plugin 0.10.2); any
# `<chip>:<shape>` libtpu accepts works, and for GPUs `<gpu>:<n>` (one host of n GPUs) or
# `<gpu>:<hosts>x<n>`. Listed in the unknown-topology error.
KNOWN_TOPOLOGIES = ("v4:2x2x1", "v4:2x2x2", "v5e:2x2", "v5e:2x4", "v5e:4x4",
                    "v5e:8x16", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x2", "v5p:4x4x4",
                    "v6e:2x2", "v6e:4x4", "v6e:16x16",
                    "h100:1", "h100:8", "h100:2x8", "h200:1", "h200:8", "a100:8")

# Without a device XLA:GPU cannot autotune, and its Triton GEMM emitter then found no tile
# sizes for some of the step's matmuls ("Couldn't find output tile sizes that satisfy hlo:
# %dot = bf16[1280,3840] ...", the teacher step at 1231x1907, jax 0.10.2). Planned with cuBLAS
# GEMMs instead, which is what XLA falls back to on a GPU too; the buffers are the same but
# for cuBLAS's workspace.
#
# The plan's executable is never run, so LLVM's optimisation of the kernels' code is work for
# nothing: it comes after buffer assignment and changes no figure of the plan (measured, tiny
# teacher on h100:1: the same argument, output, alias and temporary bytes and FLOPs; compile
# 32.8 -> 29.7 s on a 2-core CPU). The same holds for ptxas's optimisation of the ~500
# kernels, most of the backend's time (ptxas -O0: 13.1 -> 10.3 s of it, compile 17.9 -> 15.5 s,
# the same figures).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False,
                        "xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True,
                        "xla_gpu_disable_gpuasm_optimizations": True}

# The share of a GPU's memory JAX's allocator takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_DEFAULT_MEM_FRACTION = 0.75

# Process exit codes of launch/aot_compile.py.
EXIT_FITS, EXIT_COMPILE_ERROR, EXIT_USAGE, EXIT_DOES_NOT_FIT = 0, 1, 2, 3


class AotUsageError(ValueError):
  """A setting the user can fix (topology name, batch size, missing libtpu): one line."""


# ============================================================================ topology


def chip_of(topology: str) -> ChipSpec:
  """The `CHIPS` entry of a topology name such as 'v5e:2x2'."""
  name = topology.split(":", 1)[0].strip().lower()
  if name not in CHIPS or ":" not in topology:
    raise AotUsageError(_unknown_topology(topology))
  return CHIPS[name]


def _unknown_topology(topology: str) -> str:
  return (f"unknown topology {topology!r}: write <chip>:<shape> with chip one of "
          f"{', '.join(CHIPS)}; known: {', '.join(KNOWN_TOPOLOGIES)}")


def gpu_mem_fraction() -> float:
  """The share of GPU memory a JAX process may use (XLA_PYTHON_CLIENT_MEM_FRACTION)."""
  value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
  try:
    return float(value) if value else GPU_DEFAULT_MEM_FRACTION
  except ValueError:
    raise AotUsageError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r} is not a number "
                        "between 0 and 1") from None


def _gpu_topology(topology: str) -> str:
  """'h100:8' -> the plugin's '1x1x8' (slices x hosts x GPUs per host); 'h100:2x8' -> '1x2x8'."""
  shape = topology.split(":", 1)[1].strip().lower()
  parts = shape.split("x")
  if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise AotUsageError(f"GPU topology {topology!r}: write <gpu>:<GPUs> or "
                        f"<gpu>:<hosts>x<GPUs per host>, e.g. h100:8 or h100:2x8")
  hosts, per_host = (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
  return f"1x{hosts}x{per_host}"


def _gpu_devices(topology: str, chip: ChipSpec) -> list[jax.Device]:
  try:
    import jax_plugins.xla_cuda13  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise AotUsageError("jax's CUDA plugin (jax-cuda13-plugin, jax-cuda13-pjrt) is not "
                        "installed, so GPU topologies cannot be described: "
                        "pip install -e \".[gpu-aot]\" (no GPU or NVIDIA wheels needed)") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  path = os.path.join(GPU_TARGETS, chip.target_file)
  with open(path, encoding="utf-8") as f:
    target = f.read()
  try:
    desc = topologies.get_topology_desc(platform="cuda", target_config=target,
                                        topology=_gpu_topology(topology))
  except AotUsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise AotUsageError(f"jax's CUDA plugin could not describe {topology!r}: "
                        f"{_first_line(e)}") from e
  return list(desc.devices)


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU or GPU topology (no TPU or GPU needed; needs libtpu or the plugin)."""
  chip = chip_of(topology)
  if chip.platform == "gpu":
    return _gpu_devices(topology, chip)
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise AotUsageError("libtpu is not installed, so TPU topologies cannot be described: "
                        "pip install -e \".[tpu-aot]\"") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu takes a one-process lock (/tmp/libtpu_lockfile) that guards real chips; describing a
  # topology drives none, so several compiles (or tests) may run side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # pylint: disable=broad-except
    msg = _first_line(e)
    if "Invalid" in msg or "topology" in msg.lower():
      raise AotUsageError(f"{_unknown_topology(topology)} (libtpu: {msg})") from e
    raise AotUsageError(f"libtpu could not describe topology {topology!r}: {msg}") from e
  return list(desc.devices)


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def num_chips(devices: Sequence[jax.Device]) -> int:
  """Chips of a slice (a device may be one TensorCore of a chip)."""
  coords = {(getattr(d, "slice_index", 0), tuple(getattr(d, "coords", (d.id,))))
            for d in devices}
  return len(coords)


# ============================================================================ reports


@dataclasses.dataclass
class StepReport:
  """What the compiler says about one step on one chip."""

  name: str
  fits: bool
  global_batch: int
  per_chip_batch: float
  argument_bytes: float
  output_bytes: float = float("nan")
  alias_bytes: float = float("nan")
  temp_bytes: float = float("nan")
  per_chip_bytes: float = float("nan")
  flops_per_step: float = float("nan")
  bytes_accessed_per_step: float = float("nan")
  bytes_unfused_per_step: float = float("nan")  # GPU: before fusion, an upper bound
  error: str = ""
  levers: list[str] = dataclasses.field(default_factory=list)

  def roofline(self, chip: ChipSpec, devices_per_chip: int, bf16: bool) -> dict[str, float]:
    """Lower bound on step time from the per-device FLOPs and bytes; images/s upper bound."""
    peak = (chip.peak_bf16_flops if bf16 else chip.peak_fp32_flops) / devices_per_chip
    bw = chip.hbm_bytes_per_s / devices_per_chip
    compute_s = self.flops_per_step / peak
    memory_s = self.bytes_accessed_per_step / bw
    if np.isfinite(memory_s):
      step_s = max(compute_s, memory_s)
      bound = "memory" if memory_s >= compute_s else "compute"
    else:  # GPU without a device: the traffic after fusion is unknown
      step_s, bound = compute_s, "compute (HBM traffic unknown)"
    return {"compute_s": compute_s, "memory_s": memory_s, "roofline_step_s": step_s,
            "roofline_images_per_s": self.global_batch / step_s if step_s > 0 else float("nan"),
            "bound": bound}


@dataclasses.dataclass
class AotReport:
  """The train step (and eval step) of one config compiled for one topology."""

  topology: str
  chip: ChipSpec
  devices: int
  chips: int
  compute_dtype: str
  remat: bool
  kind: str  # 'teacher' or 'distillation'
  train: StepReport
  eval: StepReport | None = None
  hbm_available_bytes: float = float("nan")  # XLA's usable HBM when it reported it
  runtime: dict[str, Any] = dataclasses.field(default_factory=dict)  # the target's

  @property
  def fits(self) -> bool:
    return self.train.fits and (self.eval is None or self.eval.fits)

  @property
  def devices_per_chip(self) -> int:
    return max(1, self.devices // max(1, self.chips))

  @property
  def hbm_per_device(self) -> float:
    return self.chip.hbm_bytes / self.devices_per_chip

  @property
  def usable_bytes(self) -> float:
    """What one device's program may hold: XLA's usable HBM (TPU), the allocator's share (GPU)."""
    if self.chip.platform == "gpu":
      return self.hbm_per_device * gpu_mem_fraction()
    return self.hbm_available_bytes if np.isfinite(self.hbm_available_bytes) else (
        self.hbm_per_device)

  @property
  def cost_source(self) -> str:
    if self.chip.platform == "gpu":
      return ("flops: XLA HLO cost analysis of the step before partitioning and fusion, per "
              "device; bytes after fusion: unknown without a GPU")
    return "XLA cost_analysis of the compiled module"

  def to_json(self) -> dict[str, Any]:
    t = self.train
    d: dict[str, Any] = {
        "fits": self.fits, "topology": self.topology, "chip": self.chip.name,
        "chips": self.chips, "devices": self.devices, "kind": self.kind,
        "compute_dtype": self.compute_dtype, "remat": self.remat, "runtime": self.runtime,
        "global_batch": t.global_batch, "per_chip_batch": t.per_chip_batch,
        "per_chip_bytes": _num(t.per_chip_bytes), "hbm_bytes": self.hbm_per_device,
        "hbm_available_bytes": _num(self.hbm_available_bytes),
        "usable_bytes": _num(self.usable_bytes), "cost_source": self.cost_source,
        "argument_bytes": _num(t.argument_bytes), "output_bytes": _num(t.output_bytes),
        "alias_bytes": _num(t.alias_bytes), "temp_bytes": _num(t.temp_bytes),
        "flops_per_step": _num(t.flops_per_step),
        "bytes_accessed_per_step": _num(t.bytes_accessed_per_step),
        "flops_per_image": _num(t.flops_per_step / t.per_chip_batch),
        "bytes_accessed_per_image": _num(t.bytes_accessed_per_step / t.per_chip_batch),
    }
    if np.isfinite(t.bytes_unfused_per_step):
      d["bytes_unfused_per_image_upper_bound"] = _num(t.bytes_unfused_per_step /
                                                      t.per_chip_batch)
    if t.fits:
      r = t.roofline(self.chip, self.devices_per_chip, self.compute_dtype == "bfloat16")
      d.update({k: _num(v) if k != "bound" else v for k, v in r.items()})
    else:
      d.update(roofline_step_s=None, roofline_images_per_s=None)
    if t.error:
      d["error"] = t.error
    if t.levers:
      d["levers"] = t.levers
    if self.eval is not None:
      e = self.eval
      d["eval"] = {"fits": e.fits, "global_batch": e.global_batch,
                   "per_chip_bytes": _num(e.per_chip_bytes),
                   "flops_per_step": _num(e.flops_per_step),
                   "bytes_accessed_per_step": _num(e.bytes_accessed_per_step)}
      if e.error:
        d["eval"]["error"] = e.error
    return d

  def lines(self) -> list[str]:
    """The human-readable report."""
    c = self.chip
    out = [f"{self.kind} step, {self.compute_dtype}{' + remat' if self.remat else ''}, "
           f"topology {self.topology}: {self.chips} {c.name} chips ({self.devices} devices), "
           f"global batch {self.train.global_batch} = {self.train.per_chip_batch:g} per chip"]
    for step in (self.train, self.eval):
      if step is None:
        continue
      out += self._step_lines(step)
    fp32 = "fp32 (derived)" if c.platform == "tpu" else "fp32"
    out.append(f"chip {c.name}: {c.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
               f"{c.peak_fp32_flops / 1e12:.1f} {fp32}, {c.hbm_bytes / GiB:.1f} GiB HBM "
               f"at {c.hbm_bytes_per_s / 1e9:.0f} GB/s [{c.source}]")
    if c.platform == "gpu":
      out.append(f"GPU plan without a GPU: fits = total within {gpu_mem_fraction():.2f} of the "
                 "device (XLA_PYTHON_CLIENT_MEM_FRACTION); no autotuning, so real memory may "
                 f"differ somewhat. Costs: {self.cost_source}.")
    return out

  def _step_lines(self, s: StepReport) -> list[str]:
    hbm = self.usable_bytes
    head = f"[{s.name}] "
    if s.error and not s.fits and not np.isfinite(s.temp_bytes) and "out of memory" not in s.error:
      return [head + f"COMPILE ERROR (not out-of-memory): {s.error}"]
    if not s.fits:
      lines = [head + f"DOES NOT FIT: {s.error}",
               head + f"arguments {_gb(s.argument_bytes)}, temporaries {_gb(s.temp_bytes)}, "
               f"usable {_gb(hbm)} per chip"]
      lines += [head + "lever: " + l for l in s.levers]
      return lines
    lines = [head + f"memory per chip: arguments {_gb(s.argument_bytes)}, outputs "
             f"{_gb(s.output_bytes)}, aliased {_gb(s.alias_bytes)}, temporaries "
             f"{_gb(s.temp_bytes)}, total {_gb(s.per_chip_bytes)} of {_gb(hbm)} usable "
             f"(headroom {_gb(hbm - s.per_chip_bytes)})",
             head + f"per step per chip: {s.flops_per_step / 1e12:.3f} TFLOP, "
             f"{_dec(s.bytes_accessed_per_step)} accessed; per image: "
             f"{s.flops_per_step / s.per_chip_batch / 1e12:.3f} TFLOP, "
             f"{_dec(s.bytes_accessed_per_step / s.per_chip_batch)}"]
    if np.isfinite(s.bytes_unfused_per_step):
      lines.append(head + f"bytes before fusion (upper bound): "
                   f"{s.bytes_unfused_per_step / s.per_chip_batch / 1e9:.1f} GB per image")
    r = s.roofline(self.chip, self.devices_per_chip, self.compute_dtype == "bfloat16")
    lines.append(head + f"roofline: step >= {r['roofline_step_s'] * 1e3:.1f} ms "
                 f"(compute {r['compute_s'] * 1e3:.1f} ms, HBM {_ms(r['memory_s'])}: "
                 f"{r['bound']}-bound), <= {r['roofline_images_per_s']:.1f} images/s on "
                 f"{self.chips} chips ({r['roofline_images_per_s'] / self.chips:.2f} per chip)")
    return lines


def _dec(x: float) -> str:
  return f"{x / 1e9:.1f} GB" if np.isfinite(x) else "? GB"


def _ms(x: float) -> str:
  return f"{x * 1e3:.1f} ms" if np.isfinite(x) else "? ms"


def _gb(x: float) -> str:
  return f"{x / GiB:.2f} GiB" if np.isfinite(x) else "?"


def _num(x: float) -> float | None:
  return float(x) if x is not None and np.isfinite(x) else None


# ============================================================================ compile


_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "exceed available HBM", "Ran out of memory",
                "out of memory")
_SIZE_RE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _bytes(value: str, unit: str) -> float:
  return float(value) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]


def _parse_oom(msg: str) -> tuple[float, float]:
  """(temporaries, available HBM) in bytes from XLA's TPU out-of-memory message, or NaNs."""
  m = re.search(r"temporaries \(" + _SIZE_RE + r"\) exceeds? available HBM \(" + _SIZE_RE + r"\)",
                msg)
  if m:
    return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
  return float("nan"), float("nan")


def _is_oom(e: BaseException) -> bool:
  return any(k in str(e) for k in _OOM_MARKERS)


def _per_device_bytes(tree: PyTree) -> float:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return float(total)


def _abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _cost(compiled: Any) -> tuple[float, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  return float(ca.get("flops", float("nan"))), float(ca.get("bytes accessed", float("nan")))


def _unpartitioned_cost(lowered: Any, devices: int) -> tuple[float, float]:
  """(FLOPs, bytes) per device from XLA's HLO cost analysis of the step before partitioning.

  For GPU targets, whose compiled module answers no `cost_analysis()` without a device. The
  analysis runs on this host's CPU client over the global program; FLOPs do not depend on
  fusion, bytes do (before fusion every op reads and writes memory): an upper bound.
  """
  try:
    from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
    module = lowered.compiler_ir("hlo").as_hlo_module()
    cpu = jax.devices("cpu")[0].client
    ca = xla_client._xla.hlo_module_cost_analysis(cpu, module)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except  # private API: degrade to unknown
    return float("nan"), float("nan")
  return (float(ca.get("flops", float("nan"))) / devices,
          float(ca.get("bytes accessed", float("nan"))) / devices)


def _compile_step(name: str, jitted: Any, args: Sequence[Any], global_batch: int,
                  chips: int, gpu_usable: float | None = None) -> tuple[StepReport, float]:
  """Lowers and compiles `jitted(*args)`; (report, XLA's usable HBM or NaN).

  `gpu_usable`: for a GPU target, the bytes one device's program may hold (XLA:GPU compiles
  whatever the size, so fitting is decided here).
  """
  report = StepReport(name=name, fits=False, global_batch=global_batch,
                      per_chip_batch=global_batch / chips,
                      argument_bytes=_per_device_bytes(args))
  try:
    lowered = jitted.lower(*args)
    compiled = lowered.compile(
        compiler_options=GPU_COMPILER_OPTIONS if gpu_usable is not None else None)
  except Exception as e:  # pylint: disable=broad-except  # XLA raises JaxRuntimeError/others
    if not _is_oom(e):
      report.error = _first_line(e)
      return report, float("nan")
    report.temp_bytes, available = _parse_oom(str(e))
    # What it would need: arguments plus XLA's temporaries (outputs are donated in place).
    report.per_chip_bytes = report.argument_bytes + report.temp_bytes
    report.error = "out of memory: " + _oom_summary(str(e))
    return report, available
  m = compiled.memory_analysis()
  report.fits = True
  report.argument_bytes = float(m.argument_size_in_bytes)
  report.output_bytes = float(m.output_size_in_bytes)
  report.alias_bytes = float(m.alias_size_in_bytes)
  report.temp_bytes = float(m.temp_size_in_bytes)
  report.per_chip_bytes = (report.argument_bytes + report.output_bytes - report.alias_bytes
                           + report.temp_bytes)
  if gpu_usable is None:
    report.flops_per_step, report.bytes_accessed_per_step = _cost(compiled)
    return report, float("nan")
  n = len(jax.tree.leaves(args)[0].sharding.device_set)
  report.flops_per_step, report.bytes_unfused_per_step = _unpartitioned_cost(lowered, n)
  if report.per_chip_bytes > gpu_usable:
    report.fits = False
    report.error = (f"out of memory: the step needs {_gb(report.per_chip_bytes)} per GPU, "
                    f"more than the {_gb(gpu_usable)} JAX may use")
  return report, float("nan")


def _oom_summary(msg: str) -> str:
  for line in msg.splitlines():
    if "exceed" in line or "Ran out of memory" in line:
      return line.strip()[:300]
  return _first_line(Exception(msg))[:300]


def _levers(config: ml_collections.ConfigDict, report: StepReport, hbm: float,
            state_args: PyTree, devices: Sequence[jax.Device], chips: int) -> list[str]:
  """What each memory lever would save, where that can be computed without compiling."""
  from mobileiqa_jax.training import sharding  # pylint: disable=g-import-not-at-top
  out = []
  b = report.per_chip_batch
  temp = report.temp_bytes
  args = report.argument_bytes
  if config.compute_dtype != "bfloat16":
    est = f" (estimate ~{_gb(temp / 2)} of the {_gb(temp)} temporaries)" if np.isfinite(
        temp) else ""
    out.append("--config.compute_dtype=bfloat16: activations in half the bytes" + est +
               "; parameters and Adam moments stay float32")
  if not config.remat:
    out.append("--config.remat=True: recompute backbone blocks in the backward pass instead of "
               "keeping their activations (saving not computable without compiling: rerun "
               "with it)")
  n = len(devices)
  if config.mesh and dict(config.mesh).get("fsdp", 1) in (1, None) and n > 1:
    try:
      mesh = sharding.make_mesh((("data", 1), ("fsdp", n)), devices)
      split = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sharding.param_shardings(x, mesh, config.fsdp_min_size)),
          {"params": state_args.params, "opt_state": state_args.opt_state})
      now = _per_device_bytes({"params": state_args.params, "opt_state": state_args.opt_state})
      saved = now - _per_device_bytes(split)
      out.append(f"--config.mesh=\"(('data', 1), ('fsdp', {n}))\": parameters and Adam moments "
                 f"split over the {n} devices, saves {_gb(saved)} of arguments per chip; "
                 "XLA's temporaries can grow by more (the teacher at 2 images per chip on "
                 "v5e:2x2, measured: -0.81 GiB arguments, +2.75 GiB temporaries): it pays "
                 "where parameters, not activations, fill the chip")
    except ValueError:
      pass
  if np.isfinite(temp) and b > 1:
    # Activations scale with the per-chip batch; the rest (weights, moments) does not.
    per_image = temp / b
    fit_b = int((hbm - args) // per_image) if per_image > 0 else 0
    if 1 <= fit_b < b:
      out.append(f"a smaller per-chip batch: {fit_b} per chip (global batch {fit_b * chips}) "
                 f"needs ~{_gb(args + fit_b * per_image)} (temporaries ~{_gb(per_image)} per "
                 "image); keep the global batch with more chips")
    elif fit_b < 1:
      out.append(f"a smaller per-chip batch does not suffice: one image needs "
                 f"~{_gb(per_image)} of temporaries")
  return out


def compile_for_topology(config: ml_collections.ConfigDict, topology: str, *,
                         with_eval: bool = True, steps_per_epoch: int = 1000,
                         teacher_backbone: str = "") -> AotReport:
  """Compiles the config's train step (and eval step) for `topology`; never runs them.

  Args:
    config: an experiment config (configs/teacher.py or configs/student.py, any overrides).
    topology: a TPU topology name, e.g. 'v5e:2x2'.
    with_eval: also compile the eval step (at `config.data.eval_batch_size`).
    steps_per_epoch: only sets the learning-rate schedule's constants.
    teacher_backbone: distillation only: the teacher's backbone when it comes from the preset
      (default the preset's, mobilevitv2_200).

  Returns:
    The report. Raises `AotUsageError` for a setting the user must change.
  """
  from mobileiqa_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import runtime as runtime_lib  # pylint: disable=g-import-not-at-top
  chip = chip_of(topology)
  devices = topology_devices(topology)
  chips = num_chips(devices)
  # The target's runtime, not this host's: the program the target would run.
  rt = runtime_lib.for_training(config, runtime_lib.platform_of(devices[0]))
  gpu_usable = chip.hbm_bytes * gpu_mem_fraction() if chip.platform == "gpu" else None
  distill = bool(config.teacher_checkpoint)
  mesh = sharding.make_mesh(config.mesh, devices)
  checked = [("config.batch_size", config.batch_size)]
  if with_eval:  # without the eval step its batch size does not matter
    checked.append(("config.data.eval_batch_size", config.data.eval_batch_size))
  for what, b in checked:
    if b % mesh.size:
      raise AotUsageError(f"{what}={b} must be divisible by the {mesh.size} devices of "
                          f"{topology}")

  teacher = _teacher_model(config, teacher_backbone, rt.frozen()) if distill else None
  steps = trainer_lib.build_steps(config, mesh, steps_per_epoch, teacher, rt)
  state = steps.abstract_state
  h, w = config.data.image_size
  bs = sharding.batch_sharding(mesh)

  def images(b: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=bs)

  batch = {"image": images(config.batch_size),
           "mos": jax.ShapeDtypeStruct((config.batch_size,), jnp.float32, sharding=bs)}
  teacher_vars = None
  if teacher is not None:
    t_shapes = jax.eval_shape(lambda: teacher.init(
        jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3), jnp.float32)))
    t_shapes = {"params": t_shapes["params"], "batch_stats": t_shapes.get("batch_stats", {})}
    teacher_vars = _abstract(t_shapes, steps.teacher_shardings)
  train_report, available = _compile_step(
      "train", steps.train_step, (state, batch, teacher_vars), config.batch_size, chips,
      gpu_usable)
  report = AotReport(topology=topology, chip=chip, devices=len(devices), chips=chips,
                     compute_dtype=config.compute_dtype, remat=bool(config.remat),
                     kind="distillation" if distill else "teacher", train=train_report,
                     hbm_available_bytes=available, runtime=rt.to_dict())
  if with_eval:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    report.eval, _ = _compile_step("eval", steps.eval_step,
                                   (variables, images(config.data.eval_batch_size)),
                                   config.data.eval_batch_size, chips, gpu_usable)
  hbm = report.usable_bytes
  for step in (report.train, report.eval):
    if step is not None and not step.fits and step.error.startswith("out of memory"):
      step.levers = _levers(config, step, hbm, state, devices, chips)
      if chip.platform == "gpu" and gpu_mem_fraction() < 0.95:
        step.levers.append("XLA_PYTHON_CLIENT_MEM_FRACTION=.95: let JAX's allocator take "
                           f"{_gb(0.95 * report.hbm_per_device)} of the GPU instead of "
                           f"{_gb(hbm)}")
  return report


def _teacher_model(config: ml_collections.ConfigDict, teacher_backbone: str,
                   runtime: Any) -> Any:
  """The frozen teacher module for distillation, reading no weights.

  The architecture is the stored model config of `config.teacher_checkpoint` when that is an
  existing checkpoint, else the teacher preset with the student's head (width, pooled size,
  opinion MALs; distillation
  compares x and DOF element by element, so the two must agree; the student's regressor pool
  too when the preset's does not fit that size).
  """
  from mobileiqa_jax.weights import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  path = config.teacher_checkpoint
  from mobileiqa_jax import storage  # pylint: disable=g-import-not-at-top
  if path and storage.exists(path):  # a local folder or a bucket URL
    meta = ckpt_lib.read_json_item(ckpt_lib.resolve_checkpoint(path), "meta") or {}
    if "model_config" not in meta:
      raise AotUsageError(f"config.teacher_checkpoint={path!r}: no stored model config")
    t_cfg, _ = ckpt_lib.split_model_config(meta["model_config"])
    if teacher_backbone:
      t_cfg["backbone"] = teacher_backbone
  else:
    overrides = dict(width=config.model.width, pooled_size=config.model.pooled_size,
                     num_mals=config.model.num_mals)
    preset_pool = mobileiqa.model_config("teacher").regressor_pool
    if config.model.pooled_size // preset_pool < 3:  # a small test head: the student's pool
      overrides["regressor_pool"] = config.model.regressor_pool
    if teacher_backbone:
      overrides["backbone"] = teacher_backbone
    t_cfg = mobileiqa.model_config("teacher", **overrides).to_dict()
  # As the trainer: the run's runtime on the target, forward only (`Runtime.frozen`).
  return mobileiqa.build_model(t_cfg, runtime)


def main_report(report: AotReport) -> tuple[list[str], str, int]:
  """(human lines, JSON line, exit code) of a report, as launch/aot_compile.py prints them."""
  lines = report.lines()
  code = EXIT_FITS if report.fits else EXIT_DOES_NOT_FIT
  for step in (report.train, report.eval):
    if step is not None and step.error and not step.error.startswith("out of memory"):
      code = EXIT_COMPILE_ERROR
  return lines, json.dumps(report.to_json()), code
