"""Looking inside MobileIQA: where each MAL's opinion lies, and how diverse the opinions are.

The paper (Figs. 4 and 5) shows, for a photo, one map per multi-view attention learning module
(MAL) and argues that the MALs form *diverse* opinions. This module draws both, for any model
`mobileiqa_jax.load` accepts:

- **Opinion map of MAL j** (one per MAL). MAL j turns the V LDA views of the photo into one
  opinion feature D_j of shape (S, S, C) (S = the head's pooled side, 22 for the paper's
  models; `dof[j]` of `MobileIQA.forward_features`). The drawn quantity is its channel norm
  ||D_j[y, x, :]||_2 at each of the S x S grid cells: how strongly that MAL's opinion
  responds at that part of the photo. Each map is min-max scaled to [0, 1] on its own (the
  colour shows where within one map, not a level comparable across MALs), upsampled
  bilinearly from S x S to the photo as the model saw it (resized to the input size), and
  overlaid on it.
- **Opinion similarity**: the cosine similarity of every pair of opinion features,
  cos(D_i, D_j) = <vec D_i, vec D_j> / (||vec D_i|| ||vec D_j||) over all S*S*C values
  (the paper's measure of opinion diversity: lower means more diverse). An (M, M) matrix per
  photo, symmetric with ones on the diagonal, and its mean over all photos given.

Files written to the output folder:

    <k>_<name>.png          the photo, then one overlaid opinion map per MAL, then the photo's
                            similarity heat map (k = the photo's position, so equal names in
                            different folders do not collide)
    similarity_mean.png     the similarity matrix averaged over the photos
    similarity.json         every photo's matrix, the mean, and the predicted scores

Plots use matplotlib's Agg (file-only) canvas: no display needed.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from mobileiqa_jax import storage
from mobileiqa_jax.data import preprocess

# Longest side of the photo drawn in a figure (the maps are upsampled to it).
DISPLAY_SIDE = 384


def opinion_similarity(dof: np.ndarray) -> np.ndarray:
  """Cosine similarity of the MALs' opinion features: dof (M, S, S, C) -> (M, M)."""
  flat = np.asarray(dof, np.float64).reshape(dof.shape[0], -1)
  unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
  return np.clip(unit @ unit.T, -1.0, 1.0)


def opinion_maps(dof: np.ndarray) -> np.ndarray:
  """dof (M, S, S, C) -> (M, S, S): each opinion feature's channel L2 norm, min-max to [0, 1]."""
  norms = np.linalg.norm(np.asarray(dof, np.float64), axis=-1)
  lo = norms.min(axis=(1, 2), keepdims=True)
  span = norms.max(axis=(1, 2), keepdims=True) - lo
  return ((norms - lo) / np.where(span > 0, span, 1.0)).astype(np.float32)


def make_forward(scorer: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """A jitted (1, H, W, 3) normalised image -> (score (1,), dof (M, 1, S, S, C))."""
  import jax  # pylint: disable=g-import-not-at-top

  model = scorer.model

  def score_and_opinions(v, x):
    _, dof, score = model.apply(v, x, train=False, return_features=True)
    return score, dof

  fn = jax.jit(score_and_opinions)
  variables = jax.device_put(scorer.variables)
  return lambda x: tuple(np.asarray(a) for a in fn(variables, x))


def _display(img: Image.Image) -> Image.Image:
  scale = DISPLAY_SIDE / max(img.size)
  if scale >= 1:
    return img
  return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                    Image.Resampling.BILINEAR)


def _upsample(m: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
  return np.asarray(Image.fromarray(m, mode="F").resize(size_wh, Image.Resampling.BILINEAR))


def _heat_map(ax: Any, sim: np.ndarray, title: str) -> None:
  m = sim.shape[0]
  im = ax.imshow(sim, vmin=-1, vmax=1, cmap="coolwarm")
  ax.set_xticks(range(m), [f"MAL {j + 1}" for j in range(m)], fontsize=7)
  ax.set_yticks(range(m), [f"MAL {j + 1}" for j in range(m)], fontsize=7)
  for i in range(m):
    for j in range(m):
      ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7)
  ax.set_title(title, fontsize=8)
  ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _figure(ncols: int, width: float = 2.6):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  # A bare Figure renders with the Agg canvas on savefig: no pyplot, no display, no global state.
  fig = Figure(figsize=(width * ncols, width * 1.05), layout="constrained")
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_photo(path: str, photo: Image.Image, maps: np.ndarray, sim: np.ndarray,
               score: float) -> None:
  """One PNG: the photo, each MAL's overlaid opinion map, the similarity heat map."""
  shown = _display(photo)
  fig, axes = _figure(len(maps) + 2)
  axes[0].imshow(shown)
  axes[0].set_title(f"input {photo.height}x{photo.width}, score {score:.3f}", fontsize=8)
  for j, m in enumerate(maps):
    axes[j + 1].imshow(shown)
    axes[j + 1].imshow(_upsample(m, shown.size), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[j + 1].set_title(f"MAL {j + 1}: opinion-feature norm", fontsize=8)
  for ax in axes[:-1]:
    ax.axis("off")
  _heat_map(axes[-1], sim, "opinion cosine similarity")
  save_figure(fig, path)


def save_figure(fig: Any, path: str) -> None:
  """A matplotlib figure as a PNG at `path` (a local file or a bucket object), whole or not at
  all."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  storage.write_atomic(path, buffer.getvalue())


def explain_files(scorer: Any, paths: Sequence[str], output_dir: str,
                  progress: Callable[[int], None] | None = None,
                  on_error: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Writes the opinion maps and similarity PNGs (see the module docstring) for `paths`.

  Args:
    scorer: what `mobileiqa_jax.load` returns.
    paths: image files.
    output_dir: created if needed.
    progress: called with 1 after each photo.
    on_error: called with a message for a photo that cannot be read (it is skipped); None:
      raise.

  Returns:
    {'images': [{'path', 'png', 'score', 'similarity'}...], 'mean_similarity', 'files'}.
  """
  from mobileiqa_jax.scoring import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  storage.makedirs(output_dir)
  forward = make_forward(scorer)
  images, sims, files = [], [], []
  for k, path in enumerate(paths):
    try:
      photo = scorer_lib.read_image(path)
    except scorer_lib.UnreadableImageError as e:
      if on_error is None:
        raise
      on_error(str(e))
      continue
    x = preprocess.resize_normalize(photo, scorer.image_size)
    score, dof = forward(x[None])
    dof = dof[:, 0]
    sim = opinion_similarity(dof)
    shown = photo.resize(scorer.image_size[::-1], Image.Resampling.BICUBIC)
    name = os.path.splitext(storage.basename(path))[0]
    png = storage.join(output_dir, f"{k:04d}_{name}.png")
    plot_photo(png, shown, opinion_maps(dof), sim, float(score[0]))
    images.append({"path": path, "png": png, "score": float(score[0]),
                   "similarity": sim.tolist()})
    sims.append(sim)
    files.append(png)
    if progress:
      progress(1)
  result: dict[str, Any] = {"images": images, "mean_similarity": None, "files": files}
  if sims:
    mean = np.mean(sims, axis=0)
    result["mean_similarity"] = mean.tolist()
    fig, axes = _figure(1, width=3.4)
    _heat_map(axes[0], mean, f"opinion cosine similarity, mean of {len(sims)} photos")
    png = storage.join(output_dir, "similarity_mean.png")
    save_figure(fig, png)
    files.append(png)
  storage.write_atomic(storage.join(output_dir, "similarity.json"),
                       json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
  files.append(storage.join(output_dir, "similarity.json"))
  return result


def explain_command(checkpoint: str, paths: Sequence[str], output_dir: str, err: Any,
                    image_size: Any = None, overwrite: bool = False,
                    progress: bool = True) -> int:
  """`launch/explain.py`: checks the settings, loads the model, writes the figures.

  Returns the exit status: 0, or 1 when a photo could not be read (each named on `err`).

  Raises:
    ValueError, OSError: a bad setting, a missing path, a folder without images, a non-empty
      output folder without `overwrite`, or a checkpoint that cannot be loaded.
  """
  from mobileiqa_jax.scoring import scorer as scorer_lib  # pylint: disable=g-import-not-at-top
  if not paths:
    raise ValueError("no PATH given: name image files or folders to explain.")
  preprocess.parse_image_size(image_size)
  files = scorer_lib.expand_paths(paths)
  storage.check_bucket(output_dir)
  if storage.isfile(output_dir):
    raise NotADirectoryError(f"--output={output_dir} is a file, not a folder.")
  if storage.isdir(output_dir) and storage.listdir(output_dir) and not overwrite:
    raise FileExistsError(f"--output={output_dir} is not empty: pass --overwrite to write "
                          "into it, or choose another folder.")
  scorer = scorer_lib.load(checkpoint, image_size, batch_size=1,
                          attention=scorer_lib.attention_for(len(files)))
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(files), unit="img", file=err, dynamic_ncols=True)
  failed = []

  def report(message: str) -> None:
    failed.append(message)
    err.write(message + "\n")

  result = explain_files(scorer, files, output_dir, bar.update if bar else None, report)
  if bar:
    bar.close()
  print(f"wrote {len(result['files'])} files to {output_dir}")
  return 1 if failed else 0
