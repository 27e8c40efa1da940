"""How a model runs, as opposed to what it is.

A `MobileIQAConfig` is the architecture: what a checkpoint stores and what `build_model`
rebuilds. A `Runtime` is everything else that shapes the traced program without changing the
function it computes (up to rounding): the platform it is compiled for, the compute dtype, the
form of the depthwise convolutions (and, with it, of the 1x1 convolutions beside them),
rematerialisation, for scoring the folded form of the head's attention logits, and the
forms of the LDAs and of GELU. It is decided once per entry point and passed to `build_model`:

- training: `for_training(config, platform)`, the platform of the run's mesh devices;
- scoring and evaluation: `Runtime.for_platform(platform, compute_dtype=...)` from flags;
- TFLite export: `FOR_EXPORT` (float32, XLA's grouped convolution: one DEPTHWISE_CONV_2D op);
- ahead-of-time compiles: `Runtime.for_platform(<target platform>, ...)`, so a CPU host
  builds exactly the program the TPU or GPU would run.

Nothing in `mobileiqa_jax/models/` reads the host (no `jax.default_backend()`, no
`jax.devices()`): the platform is always a caller's string. A model built without a runtime
gets `DEFAULT`, which is the same on every host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

PLATFORMS = ("cpu", "gpu", "tpu")
DEPTHWISE_IMPLS = ("conv", "shift", "shift_slices")
REMATS = (False, "stage", "block")
COMPUTE_DTYPES = ("float32", "bfloat16")
ATTENTION_FORMS = ("reference", "folded")
LDA_FORMS = ("banded", "whole")
GELU_FORMS = ("erf", "jax_nn")
STEMS = ("conv", "space_to_depth")


def depthwise_impl_for(platform: str) -> str:
  """The depthwise form that measured best on `platform`: 'conv' on GPU, 'shift' elsewhere.

  CPU: XLA:CPU's grouped convolution is ~7x slower than PyTorch; k*k shifted multiply-adds
  are as exact and faster. TPU: the grouped convolution and its gradients wrap the map in
  layout copies (W folded into blocks, taps side by side); one depthwise 3x3 + BatchNorm +
  SiLU training step at 616x954x128, 2 images, v5e compile: 14.6 GB accessed as 'conv', 3.0 GB
  as 'shift' (benchmarks/layer_traffic.py). GPU keeps cuDNN's kernels (not measured on a GPU).
  """
  _check("platform", platform, PLATFORMS)
  return "conv" if platform == "gpu" else "shift"


def strided_depthwise_impl_for(platform: str, depthwise_impl: str) -> str:
  """The stride-2 blocks' form on `platform` beside `depthwise_impl`; '' = the same form.

  CPU with 'shift': 'shift_slices', whose input gradient transposes the strided slices
  (k*k padded taps, one fusion) instead of the convolution: XLA:CPU runs that transposed
  grouped convolution naively (32 x 16 x 16 x 128 at stride 2: 69 ms against 0.7 ms), and
  it was a third of the demo teacher's training step (176 -> 134 ms per step of 32 on 2
  cores, benchmarks/demo_phases.py). TPU keeps the convolution's form: there the slices'
  form moves more (v5e, benchmarks/layer_traffic.py, stage 1 block 0's training step: 9.25
  GB per image as 'shift', 15.46 as 'shift_slices').
  """
  _check("platform", platform, PLATFORMS)
  return "shift_slices" if platform == "cpu" and depthwise_impl == "shift" else ""


def tie_weight_grads_for(platform: str) -> bool:
  """Whether a training step on `platform` ties each layer's weight gradient to its input
  gradient (`Runtime.tie_weight_grads`): on GPU.

  GPU: without it XLA:GPU schedules the weight gradients of a data-parallel step late (each
  feeds an asynchronous all-reduce), and the teacher step at 8 images per GPU planned 24.88
  GiB on h100:8 against 13.76 on h100:1; docs/performance.md has the figures. TPU: XLA:TPU keeps
  the 8-chip plan's memory per chip at or below the 4-chip plan's without it, and the barriers
  cost traffic there (one layer's training step on a v5e, benchmarks/layer_traffic.py: up to
  +11% bytes, stage 1 block 1 4.09 -> 4.54 GB per image). CPU: off (not needed for memory).
  """
  _check("platform", platform, PLATFORMS)
  return platform == "gpu"


def stem_for(platform: str, tie_weight_grads: bool = False) -> str:
  """The backbones' 3x3 stride-2 stem convolution on `platform` (`layers.stem_conv`).

  TPU: 'space_to_depth', a 2x2 convolution on the image's 2x2 pixel blocks as 12 channels
  (the same function). The 3x3 form on 3 channels fills 3 of a tile's 128 lanes, and XLA
  re-lays the image out around it. The stem's training step at 1231x1907 on a v5e, 2 images
  per chip (benchmarks/layer_traffic.py): MobileViTv2-200's (64 channels) 4.04 -> 3.09 GB
  per image, temporaries 2.04 -> 0.91 GiB; a 16-channel one (MobileNetV3's width)
  2.86 -> 1.92 GB, 1.45 -> 0.60 GiB. Elsewhere 'conv' (cuDNN and XLA:CPU
  take 3-channel convolutions as they are; not measured there), and with tied gradients,
  which only the 3x3 form has. A frozen teacher (`Runtime.frozen`) and a distillation's
  student (`for_training`) keep the 3x3 form too.
  """
  _check("platform", platform, PLATFORMS)
  return "space_to_depth" if platform == "tpu" and not tie_weight_grads else "conv"


def platform_of(device: Any) -> str:
  """'cpu', 'gpu' or 'tpu' of a `jax.Device` the caller holds (a real one or a topology's)."""
  platform = str(device.platform).lower()
  return "gpu" if platform in ("cuda", "rocm") else platform


def _check(what: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"runtime {what} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How a model runs. Never stored in a checkpoint's model config.

  Attributes:
    platform: 'cpu', 'gpu' or 'tpu': the platform the program is compiled for (not
      necessarily this host's, for ahead-of-time compiles).
    compute_dtype: 'float32' or 'bfloat16'; parameters and BatchNorm statistics stay float32.
    depthwise_impl: 'conv' (XLA's grouped convolution), 'shift' (k*k shifted slices) or
      'shift_slices' ('shift' with another stride-2 input gradient); the same parameters
      and, in float32, the same numbers to rounding.
    remat: False, 'stage' or 'block': what the backbone recomputes in the backward pass.
    strided_depthwise_impl: the form of the stride-2 blocks; '' = `depthwise_impl`. CPU
      takes 'shift_slices' there (`strided_depthwise_impl_for`), a frozen teacher on TPU
      'conv' (`frozen`).
    attention: the MALs' attention logits: 'reference' (Q K^T from `c_q`, `c_k`, the
      checkpoints' variables) or 'folded' (X (Wq Wk^T) X^T: a third fewer of the head's
      multiply-adds, for scoring only; its variables come from `mal.fold_attention`, see
      there). Training and checkpoints always use 'reference'.
    lda: how the LDAs' first 1x1 conv -> GELU -> pool runs on large maps: 'banded' (row bands,
      the hidden activation never exists whole) or 'whole' (the reference's form: the same
      numbers, far more memory; for counting the architecture's MACs, where overlapping
      pooling windows make the bands compute shared rows twice).
    gelu: 'erf' (x/2 (1 + erf(x/sqrt2)), PyTorch's kernels' form and the fast one in XLA) or
      'jax_nn' (`jax.nn.gelu(approximate=False)`, the same function, which the ONNX
      converter maps to one Gelu op).
    tie_weight_grads: in the backbones' backward pass every conv and projection hands its
      input gradient on only once its weight gradient is computed (`layers.tie_grads`, an
      optimization barrier), so the activations a weight gradient reads are freed layer by
      layer whatever the scheduler does; the same numbers. See `tie_weight_grads_for`.
    stem: the backbones' stem convolution, 'conv' (3x3, stride 2) or 'space_to_depth' (the
      same function as a 2x2 convolution on 12 channels); see `stem_for`.
  """

  platform: str = "cpu"
  compute_dtype: str = "float32"
  depthwise_impl: str = "shift"
  remat: bool | str = False
  strided_depthwise_impl: str = ""
  attention: str = "reference"
  lda: str = "banded"
  gelu: str = "erf"
  tie_weight_grads: bool = False
  stem: str = "conv"

  def __post_init__(self):
    _check("platform", self.platform, PLATFORMS)
    _check("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
    _check("depthwise_impl", self.depthwise_impl, DEPTHWISE_IMPLS)
    _check("remat", self.remat, REMATS)
    _check("strided_depthwise_impl", self.strided_depthwise_impl, ("",) + DEPTHWISE_IMPLS)
    _check("attention", self.attention, ATTENTION_FORMS)
    _check("lda", self.lda, LDA_FORMS)
    _check("gelu", self.gelu, GELU_FORMS)
    _check("tie_weight_grads", self.tie_weight_grads, (False, True))
    _check("stem", self.stem, STEMS)
    if self.stem == "space_to_depth" and self.tie_weight_grads:
      raise ValueError("Runtime: stem='space_to_depth' has no tied-gradient form; use "
                       "stem='conv' with tie_weight_grads=True")

  @classmethod
  def for_platform(cls, platform: str, *, compute_dtype: str = "float32",
                   depthwise_impl: str | None = None, remat: bool | str = False,
                   attention: str = "reference",
                   tie_weight_grads: bool | None = None) -> "Runtime":
    """The runtime for `platform`; an empty `depthwise_impl` takes the platform's form.

    `remat=True` means per stage (what the backbones' `remat=True` means).
    `tie_weight_grads=None` takes the platform's choice (`tie_weight_grads_for`).
    """
    if remat is True:
      remat = "stage"
    if tie_weight_grads is None:
      tie_weight_grads = tie_weight_grads_for(platform)
    depthwise_impl = depthwise_impl or depthwise_impl_for(platform)
    return cls(platform=platform, compute_dtype=str(compute_dtype),
               depthwise_impl=depthwise_impl, remat=remat,
               strided_depthwise_impl=strided_depthwise_impl_for(platform, depthwise_impl),
               attention=attention, tie_weight_grads=bool(tie_weight_grads),
               stem=stem_for(platform, bool(tie_weight_grads)))

  def frozen(self) -> "Runtime":
    """The runtime of a model that is only run forward (a distillation teacher).

    No remat, no tied gradients (nothing is differentiated) and the 3x3 stem. On TPU, the
    stride-2 blocks take XLA's grouped convolution: the 'shift' form's strided slices make XLA
    copy the input map into another layout first, which the training step's gradient pays for
    anyway but a forward-only teacher does not need; at 16 images per chip on a v5e that copy
    is what does not fit (the distillation step: 17.44 GiB of temporaries; docs/performance.md
    has the figures).
    """
    strided = "conv" if self.platform == "tpu" else self.strided_depthwise_impl
    # The space-to-depth stem pays off in the backward pass; forward only, the 3x3 form
    # moves a little less (1.18 against 1.24 GB per image, MobileViTv2-200 on a v5e).
    return dataclasses.replace(self, remat=False, strided_depthwise_impl=strided,
                               tie_weight_grads=False, stem="conv")

  def backbone_kwargs(self) -> dict[str, Any]:
    """The backbone constructor's runtime fields."""
    return {"depthwise_impl": self.depthwise_impl, "remat": self.remat,
            "strided_depthwise_impl": self.strided_depthwise_impl,
            "tie_weight_grads": self.tie_weight_grads, "stem": self.stem}

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


#: What a model built without an explicit runtime gets: the same on every host.
DEFAULT = Runtime()

#: TFLite/LiteRT export: float32 and XLA's grouped convolution, which jax2tf turns into one
#: DEPTHWISE_CONV_2D op per layer (mobileiqa_jax/export/tflite.py).
FOR_EXPORT = Runtime(platform="cpu", compute_dtype="float32", depthwise_impl="conv")


def for_training(config: Mapping[str, Any] | Any, platform: str) -> Runtime:
  """A training config's runtime on `platform` (the platform of the run's mesh devices).

  Reads `compute_dtype`, `remat`, `remat_granularity` and `depthwise_impl` ('' or absent: the
  platform's form). A distillation (`teacher_checkpoint` set) keeps the 3x3 stem: there the
  image also feeds the frozen teacher's 3x3 stem, and the student's space-to-depth one made
  the v5e:4x4 step (64 images) move 31.9 GB per image in 6.79 GiB per chip against 29.6 GB in
  6.18 GiB.
  """
  get = config.get
  remat = get("remat", False)
  if remat:
    remat = get("remat_granularity", "") or "stage"
  rt = Runtime.for_platform(platform, compute_dtype=get("compute_dtype", "float32"),
                            depthwise_impl=get("depthwise_impl", "") or None, remat=remat)
  if get("teacher_checkpoint", ""):
    rt = dataclasses.replace(rt, stem="conv")
  return rt


#: Keys that older checkpoints stored inside their model config but which are runtime, not
#: architecture. Reading a checkpoint drops them (`architecture_of`).
LEGACY_RUNTIME_KEYS = ("dtype", "depthwise_impl")


def architecture_of(model_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(architecture, runtime fields found) of a stored model config, old or new.

  Checkpoints of the older format carry `dtype`, `depthwise_impl` and
  `backbone_kwargs.remat` inside the model config; they are how that run computed, not which
  model it is.
  """
  arch = dict(model_config)
  found: dict[str, Any] = {}
  if "dtype" in arch:
    found["compute_dtype"] = str(arch.pop("dtype"))
  if "depthwise_impl" in arch:
    impl = arch.pop("depthwise_impl")
    if impl:
      found["depthwise_impl"] = impl
  kwargs = arch.get("backbone_kwargs")
  if isinstance(kwargs, Mapping) and ("remat" in kwargs or "depthwise_impl" in kwargs):
    kwargs = dict(kwargs)
    if "remat" in kwargs:
      remat = kwargs.pop("remat")
      found["remat"] = remat if isinstance(remat, str) else bool(remat)
    kwargs.pop("depthwise_impl", None)
    arch["backbone_kwargs"] = kwargs
  return arch, found
