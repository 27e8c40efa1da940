"""Random weights of a model's real shapes, as Flax variables or as the authors' `.pkl`.

For what does not depend on the weights' values: speed and memory benchmarks, and tests of
loading, converting and scoring. `random_variables` draws every leaf of a model's variables
(shapes from `jax.eval_shape`, no compile); `save_authors_pkl` writes them the way the authors'
code saves a model: `torch.save` of the PyTorch state dict (`convert.flax_to_torch`), whose
keys carry the backbone's prefix (`global_vit.` / `local_cnn.`) as theirs do. The `.pkl` needs
torch (the `torch` extra).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mobileiqa_jax.weights import convert


def random_variables(model: Any, image_size: tuple[int, int] = (64, 64),
                     seed: int = 0) -> dict:
  """Variables of `model`'s shapes, every leaf drawn at random (eval_shape + numpy, no compile).

  Kernels at 1/sqrt(fan-in); BatchNorm variances in [0.5, 1.5) and means around 0; norm scales
  around 1; self-attention gammas around 0.5 (non-zero, so attention shows); biases small.

  Args:
    model: a Flax module taking (B, H, W, 3) images.
    image_size: (H, W) of the input the shapes are traced with.
    seed: the numpy generator's seed.
  """
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *image_size, 3), jnp.float32)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    coll = str(getattr(path[0], "key", path[0]))
    shape = leaf.shape
    if coll == "batch_stats":
      if name == "var":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
      return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    if name == "scale":
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name == "gamma":
      return (0.5 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def save_authors_pkl(model: Any, path: str | os.PathLike, seed: int = 0) -> str | os.PathLike:
  """`model` with `random_variables`, saved the authors' way: torch.save of its state dict.

  The last layer is scaled down so the student's scores stay off the sigmoid's ends.

  Args:
    model: a MobileIQA teacher or student (`mobileiqa.build_model`).
    path: the file to write.
    seed: passed to `random_variables`.

  Returns:
    `path`.
  """
  import torch  # pylint: disable=g-import-not-at-top  # the `torch` extra
  variables = random_variables(model, seed=seed)
  variables["params"]["fc_score"]["3"]["kernel"] *= 0.05
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in convert.flax_to_torch(variables).items()}, path)
  return path
