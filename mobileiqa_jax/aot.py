"""Compile a training step for a TPU topology on any host: memory plan, FLOPs, bytes, roofline.

In the spirit of MaxText's `train_compile.py`: with libtpu installed
(`pip install -e ".[tpu-aot]"`), `jax.experimental.topologies` describes the devices of a TPU
slice that is not there (`v5e:2x2`, `v5e:4x4`, `v5p:2x2x1`, `v6e:2x2`, ...), and the project's
own jitted train step, lowered with abstract inputs sharded over a mesh of those devices,
compiles for them. Nothing runs and no weights or checkpoints are read; what comes back is what
decides whether a pod run can work and how fast it can possibly be:

- per-chip memory (`Compiled.memory_analysis()`): arguments, outputs, donated (aliased) bytes,
  temporaries; XLA refuses to compile a program whose buffers exceed the chip's HBM, and that
  refusal is the "does not fit" answer;
- FLOPs and bytes accessed per step per chip (`Compiled.cost_analysis()`), and per image;
- a roofline: a step takes at least max(flops / peak FLOP/s, bytes / HBM bandwidth).

The step compiled is exactly the trainer's (`train.build_steps`): the teacher step, or for a
distillation config the student step with the frozen teacher, whose architecture comes from
the teacher checkpoint's stored model config when `config.teacher_checkpoint` names an
existing checkpoint, else from the teacher preset with the student's head size. The eval step
is compiled too.

Choices that depend on the backend (the depthwise convolution form) follow the TARGET
platform, not the host: the model resolves them from `jax.default_backend()`, which during an
AOT compile is the host's (CPU). Today CPU and TPU happen to share the shift-add form and GPU
takes the convolution, but the compile must not rely on that.
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


# Google Cloud's published per-chip figures (bf16 peak, HBM capacity and bandwidth), read
# 2026-12 from the pages named in `source`. Google publishes no fp32 peak for its TPUs: the MXU
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

# Topologies this module was checked with (libtpu 0.0.42); any `<chip>:<shape>` libtpu
# accepts works. Listed in the unknown-topology error.
KNOWN_TOPOLOGIES = ("v4:2x2x1", "v4:2x2x2", "v5e:2x2", "v5e:2x4", "v5e:4x4",
                    "v5e:8x16", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x2", "v5p:4x4x4",
                    "v6e:2x2", "v6e:4x4", "v6e:16x16")

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


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a TPU topology (no TPU needed; needs libtpu)."""
  chip_of(topology)
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


# ============================================================================ target platform


def for_target(config: ml_collections.ConfigDict, platform: str = "tpu"
               ) -> ml_collections.ConfigDict:
  """A copy of `config` whose backend-dependent choices are the target platform's.

  `model.depthwise_impl=''` means "the backend's default", which the model resolves from
  `jax.default_backend()` at trace time: the host's (CPU) during an AOT compile.
  """
  from mobileiqa_jax.models import layers  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.model.get("depthwise_impl"):
    config.model.depthwise_impl = layers.default_depthwise_impl(platform)
  return config


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
  error: str = ""
  levers: list[str] = dataclasses.field(default_factory=list)

  def roofline(self, chip: ChipSpec, devices_per_chip: int, bf16: bool) -> dict[str, float]:
    """Lower bound on step time from the per-device FLOPs and bytes; images/s upper bound."""
    peak = (chip.peak_bf16_flops if bf16 else chip.peak_fp32_flops) / devices_per_chip
    bw = chip.hbm_bytes_per_s / devices_per_chip
    compute_s = self.flops_per_step / peak
    memory_s = self.bytes_accessed_per_step / bw
    step_s = max(compute_s, memory_s)
    return {"compute_s": compute_s, "memory_s": memory_s, "roofline_step_s": step_s,
            "roofline_images_per_s": self.global_batch / step_s if step_s > 0 else float("nan"),
            "bound": "memory" if memory_s >= compute_s else "compute"}


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

  @property
  def fits(self) -> bool:
    return self.train.fits and (self.eval is None or self.eval.fits)

  @property
  def devices_per_chip(self) -> int:
    return max(1, self.devices // max(1, self.chips))

  @property
  def hbm_per_device(self) -> float:
    return self.chip.hbm_bytes / self.devices_per_chip

  def to_json(self) -> dict[str, Any]:
    t = self.train
    d: dict[str, Any] = {
        "fits": self.fits, "topology": self.topology, "chip": self.chip.name,
        "chips": self.chips, "devices": self.devices, "kind": self.kind,
        "compute_dtype": self.compute_dtype, "remat": self.remat,
        "global_batch": t.global_batch, "per_chip_batch": t.per_chip_batch,
        "per_chip_bytes": _num(t.per_chip_bytes), "hbm_bytes": self.hbm_per_device,
        "hbm_available_bytes": _num(self.hbm_available_bytes),
        "argument_bytes": _num(t.argument_bytes), "output_bytes": _num(t.output_bytes),
        "alias_bytes": _num(t.alias_bytes), "temp_bytes": _num(t.temp_bytes),
        "flops_per_step": _num(t.flops_per_step),
        "bytes_accessed_per_step": _num(t.bytes_accessed_per_step),
        "flops_per_image": _num(t.flops_per_step / t.per_chip_batch),
        "bytes_accessed_per_image": _num(t.bytes_accessed_per_step / t.per_chip_batch),
    }
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
    out.append(f"chip {c.name}: {c.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
               f"{c.peak_fp32_flops / 1e12:.1f} fp32 (derived), {c.hbm_bytes / GiB:.0f} GiB HBM "
               f"at {c.hbm_bytes_per_s / 1e9:.0f} GB/s [{c.source}]")
    return out

  def _step_lines(self, s: StepReport) -> list[str]:
    hbm = self.hbm_per_device
    head = f"[{s.name}] "
    if s.error and not s.fits and not np.isfinite(s.temp_bytes) and "out of memory" not in s.error:
      return [head + f"COMPILE ERROR (not out-of-memory): {s.error}"]
    if not s.fits:
      lines = [head + f"DOES NOT FIT: {s.error}",
               head + f"arguments {_gb(s.argument_bytes)}, temporaries {_gb(s.temp_bytes)}, "
               f"HBM {_gb(hbm)} per chip"]
      lines += [head + "lever: " + l for l in s.levers]
      return lines
    lines = [head + f"memory per chip: arguments {_gb(s.argument_bytes)}, outputs "
             f"{_gb(s.output_bytes)}, aliased {_gb(s.alias_bytes)}, temporaries "
             f"{_gb(s.temp_bytes)}, total {_gb(s.per_chip_bytes)} of {_gb(hbm)} HBM "
             f"(headroom {_gb(hbm - s.per_chip_bytes)})",
             head + f"per step per chip: {s.flops_per_step / 1e12:.3f} TFLOP, "
             f"{s.bytes_accessed_per_step / 1e9:.1f} GB accessed; per image: "
             f"{s.flops_per_step / s.per_chip_batch / 1e12:.3f} TFLOP, "
             f"{s.bytes_accessed_per_step / s.per_chip_batch / 1e9:.1f} GB"]
    r = s.roofline(self.chip, self.devices_per_chip, self.compute_dtype == "bfloat16")
    lines.append(head + f"roofline: step >= {r['roofline_step_s'] * 1e3:.1f} ms "
                 f"(compute {r['compute_s'] * 1e3:.1f} ms, HBM {r['memory_s'] * 1e3:.1f} ms: "
                 f"{r['bound']}-bound), <= {r['roofline_images_per_s']:.1f} images/s on "
                 f"{self.chips} chips ({r['roofline_images_per_s'] / self.chips:.2f} per chip)")
    return lines


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


def _compile_step(name: str, jitted: Any, args: Sequence[Any], global_batch: int,
                  chips: int) -> tuple[StepReport, float]:
  """Lowers and compiles `jitted(*args)`; (report, XLA's usable HBM or NaN)."""
  report = StepReport(name=name, fits=False, global_batch=global_batch,
                      per_chip_batch=global_batch / chips,
                      argument_bytes=_per_device_bytes(args))
  try:
    compiled = jitted.lower(*args).compile()
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
  report.flops_per_step, report.bytes_accessed_per_step = _cost(compiled)
  return report, float("nan")


def _oom_summary(msg: str) -> str:
  for line in msg.splitlines():
    if "exceed" in line or "Ran out of memory" in line:
      return line.strip()[:300]
  return _first_line(Exception(msg))[:300]


def _levers(config: ml_collections.ConfigDict, report: StepReport, hbm: float,
            state_args: PyTree, devices: Sequence[jax.Device], chips: int) -> list[str]:
  """What each memory lever would save, where that can be computed without compiling."""
  from mobileiqa_jax import sharding  # pylint: disable=g-import-not-at-top
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
  from mobileiqa_jax import sharding  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax import train  # pylint: disable=g-import-not-at-top
  chip = chip_of(topology)
  devices = topology_devices(topology)
  chips = num_chips(devices)
  config = for_target(config, "tpu")
  distill = bool(config.teacher_checkpoint)
  mesh = sharding.make_mesh(config.mesh, devices)
  checked = [("config.batch_size", config.batch_size)]
  if with_eval:  # without the eval step its batch size does not matter
    checked.append(("config.data.eval_batch_size", config.data.eval_batch_size))
  for what, b in checked:
    if b % mesh.size:
      raise AotUsageError(f"{what}={b} must be divisible by the {mesh.size} devices of "
                          f"{topology}")

  teacher = _teacher_model(config, teacher_backbone) if distill else None
  steps = train.build_steps(config, mesh, steps_per_epoch, teacher)
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
      "train", steps.train_step, (state, batch, teacher_vars), config.batch_size, chips)
  report = AotReport(topology=topology, chip=chip, devices=len(devices), chips=chips,
                     compute_dtype=config.compute_dtype, remat=bool(config.remat),
                     kind="distillation" if distill else "teacher", train=train_report,
                     hbm_available_bytes=available)
  if with_eval:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    report.eval, _ = _compile_step("eval", steps.eval_step,
                                   (variables, images(config.data.eval_batch_size)),
                                   config.data.eval_batch_size, chips)
  hbm = available if np.isfinite(available) else report.hbm_per_device
  for step in (report.train, report.eval):
    if step is not None and not step.fits and step.error.startswith("out of memory"):
      step.levers = _levers(config, step, hbm, state, devices, chips)
  return report


def _teacher_model(config: ml_collections.ConfigDict, teacher_backbone: str) -> Any:
  """The frozen teacher module for distillation, reading no weights.

  The architecture is the stored model config of `config.teacher_checkpoint` when that is an
  existing checkpoint, else the teacher preset with the student's head (width, pooled size,
  opinion MALs; distillation
  compares x and DOF element by element, so the two must agree; the student's regressor pool
  too when the preset's does not fit that size).
  """
  from mobileiqa_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import layers  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models import mobileiqa  # pylint: disable=g-import-not-at-top
  path = config.teacher_checkpoint
  if path and os.path.exists(path):
    meta = ckpt_lib.read_json_item(ckpt_lib.resolve_checkpoint(path), "meta") or {}
    if "model_config" not in meta:
      raise AotUsageError(f"config.teacher_checkpoint={path!r}: no stored model config")
    t_cfg = dict(meta["model_config"])
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
  # As the trainer: the teacher computes in the run's dtype; the depthwise form is the target's.
  t_cfg["dtype"] = config.compute_dtype
  t_cfg["depthwise_impl"] = t_cfg.get("depthwise_impl") or layers.default_depthwise_impl("tpu")
  return mobileiqa.build_model(t_cfg)


def main_report(report: AotReport) -> tuple[list[str], str, int]:
  """(human lines, JSON line, exit code) of a report, as launch/aot_compile.py prints them."""
  lines = report.lines()
  code = EXIT_FITS if report.fits else EXIT_DOES_NOT_FIT
  for step in (report.train, report.eval):
    if step is not None and step.error and not step.error.startswith("out of memory"):
      code = EXIT_COMPILE_ERROR
  return lines, json.dumps(report.to_json()), code
