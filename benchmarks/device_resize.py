r"""How close the device resize (`data/device_resize`) is to the PIL path, on LIVE photos.

  python benchmarks/device_resize.py [--photos=8] [--seconds]

For each case (input size -> model size) and each photo: the grey-level difference between
`device_resize.resize_bicubic(..., round_uint8=True)` and PIL's `Image.resize(BICUBIC)` (max,
and the fraction of values that differ), and the score difference of a small random student
(the authors' MobileNetV3 backbone, small head; its last layer standardised over the photos so
scores spread over the sigmoid) between `preprocessing='host'` and 'device', and between
`score()` and `quality_fn` (no uint8 rounding). Cases: downscale 500x500 -> 384x384; upscale
500x500 -> 1231x1907 (the authors' size); 4K -> 1231x1907, the 4K input built from a LIVE
photo by PIL's bicubic upsampling to 3840x2160 (LIVE photos are 500x500). Prints a table.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mobileiqa_jax.scoring import scorer
from mobileiqa_jax.data import device_resize
from mobileiqa_jax.models import mobileiqa
from mobileiqa_jax.models import runtime
from mobileiqa_jax.weights import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
LIVEC = os.path.join(HERE, "..", "..", "shared", "data", "livec_jpg", "Images")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--photos", type=int, default=8)
  parser.add_argument("--livec", default=LIVEC)
  args = parser.parse_args()
  files = sorted(glob.glob(os.path.join(args.livec, "*.JPG")))[: args.photos]
  photos = [Image.open(f).convert("RGB") for f in files]
  cases = [("down 500x500 -> 384x384", None, (384, 384)),
           ("up 500x500 -> 1231x1907", None, (1231, 1907)),
           ("4K 3840x2160 -> 1231x1907", (2160, 3840), (1231, 1907))]
  config = mobileiqa.model_config("student", pooled_size=8, width=32)
  model = mobileiqa.build_model(config, runtime.Runtime(depthwise_impl="conv"))
  variables = synthetic.random_variables(model)
  host = scorer.Scorer(model, variables, (64, 64), config.to_dict(), batch_size=1)
  # Spread the scores over the sigmoid (as tests/test_scorer.py): standardise the logits.
  s = host.score(photos)
  logits = np.log(s) - np.log1p(-s)
  fc = variables["params"]["fc_score"]["3"]
  fc["kernel"] = (fc["kernel"] / (logits.std() + 1e-6)).astype(np.float32)
  fc["bias"] = ((fc["bias"] - logits.mean()) / (logits.std() + 1e-6)).astype(np.float32)
  print(f"{len(photos)} LIVE photos, jax {jax.__version__} on {jax.default_backend()}")
  print("| case | max grey-level diff | values differing | max |score diff| host vs device "
        "| max |score diff| score vs quality_fn | score range |")
  print("|---|---|---|---|---|---|")
  for name, pre, size in cases:
    inputs = [p.resize(pre[::-1], Image.Resampling.BICUBIC) if pre else p for p in photos]
    resize = jax.jit(lambda x, size=size: device_resize.resize_bicubic(x, size, True))
    worst, differ = 0, []
    for im in inputs:
      ref = np.asarray(im.resize(size[::-1], Image.Resampling.BICUBIC)).astype(np.int32)
      out = np.asarray(resize(np.asarray(im)[None]))[0].astype(np.int32)
      d = np.abs(out - ref)
      worst, differ = max(worst, int(d.max())), differ + [float((d > 0).mean())]
    h = scorer.Scorer(model, variables, size, config.to_dict(), batch_size=1)
    dv = scorer.Scorer(model, variables, size, config.to_dict(), batch_size=1,
                          preprocessing="device")
    arrays = [np.asarray(im) for im in inputs]
    sh, sd = h.score(arrays), dv.score(arrays)
    quality = jax.jit(h.quality_fn())
    sq = np.array([float(quality(jnp.asarray(a[None], jnp.float32) / 255)[0]) for a in arrays])
    print(f"| {name} | {worst} | {max(differ):.2e} (max per photo) | {np.abs(sh - sd).max():.2e} "
          f"| {np.abs(sh - sq).max():.2e} | {sh.min():.3f}..{sh.max():.3f} |", flush=True)


if __name__ == "__main__":
  main()
