r"""HBM traffic of one teacher layer's training step on a TPU chip, from the compiler alone.

The whole teacher step at the paper's resolution takes 10-30 minutes to compile for a TPU on
a 2-core host; one layer at its real shape takes seconds. So this is the tool for finding
and fixing where the step's bytes go: it compiles (no TPU needed, libtpu is enough) the
forward and the training step (forward + input and parameter gradients, BatchNorm in train
mode) of each MobileViTv2-200 layer at the shape it has at 1231x1907, and prints XLA's
`bytes accessed` next to the size of the layer's input map, per image.

  python benchmarks/layer_traffic.py                       # every layer, v5e
  python benchmarks/layer_traffic.py --layers=stage2_mvit --chip=v6e:2x2

A layer on its own pays for its entry layouts (the compiler cannot choose the layout of a
program's arguments), so each figure is somewhat above that layer's share of the whole step;
compare a layer before and after a change, and confirm with `launch/aot_compile.py`.
Not part of the test suite.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from mobileiqa_jax.training import aot_compile  # noqa: E402
from mobileiqa_jax.models import mobileiqa  # noqa: E402
from mobileiqa_jax.models import mobilevitv2 as mv  # noqa: E402
from mobileiqa_jax.models import runtime  # noqa: E402

flags.DEFINE_string("chip", "v5e:2x2", "a TPU topology; one of its chips is compiled for")
flags.DEFINE_integer("per_chip_batch", 2, "images per chip (the paper's 8 on 4 chips is 2)")
flags.DEFINE_list("layers", [], "layers to compile (default: all); see LAYERS")
flags.DEFINE_list("modes", ["forward", "train"], "forward (eval mode) and/or train")
flags.DEFINE_enum("depthwise_impl", None, list(runtime.DEPTHWISE_IMPLS),
                  "layers.DepthwiseConv2d impl (default: what a TPU program gets)")

BF16 = jnp.bfloat16
# (name, module factory, input (H, W, C) at 1231x1907, BatchNorm inside). MobileViTv2-200's
# stage widths are 128, 256, 512, 768, 1024 and its stem 64 (mobilevitv2.stage_channels(2)).
# The factories take the depthwise impl.
LAYERS: list[tuple[str, Callable[[str], Any], tuple[int, int, int], bool]] = [
    ("stem", lambda dw: mv.ConvNormAct(64, 3, 2, dtype=BF16), (1231, 1907, 3), True),
    ("stage0_block", lambda dw: mv.BottleneckBlock(128, 1, dw, BF16), (616, 954, 64), True),
    ("stage1_block0", lambda dw: mv.BottleneckBlock(256, 2, dw, BF16), (616, 954, 128), True),
    ("stage1_block1", lambda dw: mv.BottleneckBlock(256, 1, dw, BF16), (308, 477, 256), True),
    ("stage2_block0", lambda dw: mv.BottleneckBlock(512, 2, dw, BF16), (308, 477, 256), True),
    ("stage2_mvit", lambda dw: mv.MobileVitV2Block(512, 2, dw, BF16), (154, 239, 512), True),
    ("stage3_block0", lambda dw: mv.BottleneckBlock(768, 2, dw, BF16), (154, 240, 512), True),
    ("stage3_mvit", lambda dw: mv.MobileVitV2Block(768, 4, dw, BF16), (77, 120, 768), True),
    ("stage4_block0", lambda dw: mv.BottleneckBlock(1024, 2, dw, BF16), (78, 120, 768), True),
    ("stage4_mvit", lambda dw: mv.MobileVitV2Block(1024, 3, dw, BF16), (39, 60, 1024), True),
    ("lda1", lambda dw: mobileiqa.LDA(256, 22, BF16), (616, 954, 128), False),
    ("lda2", lambda dw: mobileiqa.LDA(256, 22, BF16), (308, 477, 256), False),
]


def _compile(module: Any, shape: tuple[int, ...], bn: bool, mode: str, sharding: Any) -> Any:
  first_layer = shape[-1] == 3
  in_dtype = jnp.float32 if first_layer else BF16  # the stem reads the float32 image
  kwargs = {"train": False} if bn else {}
  x0 = jax.ShapeDtypeStruct(shape, in_dtype)
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape, in_dtype),
                                                  **kwargs))
  y0 = jax.eval_shape(lambda v, x: module.apply(v, x, **kwargs), variables, x0)
  abstract = lambda t: jax.tree.map(  # noqa: E731
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), t)

  def forward(v, x):
    return module.apply(v, x, **kwargs)

  def train(v, x, g):
    def f(params, xx):
      vv = dict(v, params=params)
      if bn:
        return module.apply(vv, xx, train=True, mutable=["batch_stats"])
      return module.apply(vv, xx), {}
    _, vjp, updates = jax.vjp(f, v["params"], x, has_aux=True)
    grads = vjp(g)
    # Nothing needs the image's gradient, so the stem's is left for XLA to drop.
    return (grads[0] if first_layer else grads), updates

  args = [abstract(variables), abstract(x0)]
  if mode == "train":
    return jax.jit(train).lower(*args, abstract(y0)).compile()
  return jax.jit(forward).lower(*args).compile()


def main(argv: list[str]) -> None:
  del argv
  flags_ = flags.FLAGS
  known = [name for name, *_ in LAYERS]
  unknown = sorted(set(flags_.layers) - set(known))
  if unknown:
    sys.exit(f"--layers: unknown {unknown}; known: {', '.join(known)}")
  device = aot_compile.topology_devices(flags_.chip)[0]
  sharding = NamedSharding(Mesh([device], ("d",)), PartitionSpec())
  b = flags_.per_chip_batch
  dw = flags_.depthwise_impl or runtime.depthwise_impl_for("tpu")
  print(f"{aot_compile.chip_of(flags_.chip).name}, one chip, {b} images, bfloat16, depthwise "
        f"'{dw}'; GB per image")
  print(f"{'layer':16s} {'mode':8s} {'bytes':>8s} {'input map':>10s} {'ratio':>6s} "
        f"{'temp GiB':>9s} {'compile':>8s}")
  for name, make, hwc, bn in LAYERS:
    if flags_.layers and name not in flags_.layers:
      continue
    for mode in flags_.modes:
      t = time.time()
      compiled = _compile(make(dw), (b,) + hwc, bn, mode, sharding)
      _, accessed = aot_compile._cost(compiled)  # pylint: disable=protected-access
      temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
      in_map = functools.reduce(lambda a, c: a * c, hwc) * 2  # bfloat16 bytes per image
      print(f"{name:16s} {mode:8s} {accessed / b / 1e9:8.3f} {in_map / 1e9:10.3f} "
            f"{accessed / b / in_map:6.1f} {temp:9.2f} {time.time() - t:7.0f}s", flush=True)


if __name__ == "__main__":
  app.run(main)
