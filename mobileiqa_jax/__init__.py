"""MobileIQA in JAX/Flax: high-resolution no-reference image quality with mobile backbones.

Score photos in three lines:

    import mobileiqa_jax
    scorer = mobileiqa_jax.load("runs/student_demo")   # a checkpoint, a workdir or a .pkl
    scores = scorer.score(["a.jpg", "b.jpg"])           # float32, one per image, higher = better

`load` and `Scorer` live in `mobileiqa_jax.scoring.scorer`; they are imported on first use so
that `import mobileiqa_jax` stays cheap (no jax, no flax). The rest of the package is laid out
by role: models/, data/, weights/, training/, scoring/, export/, profiling/, commands/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "Scorer"]

if TYPE_CHECKING:
  from mobileiqa_jax.scoring.scorer import Scorer, load  # noqa: F401


def __getattr__(name: str) -> Any:
  # PEP 562: the scoring API is imported on first access, not with the package.
  if name in __all__:
    from mobileiqa_jax.scoring import scorer  # pylint: disable=g-import-not-at-top
    return getattr(scorer, name)
  raise AttributeError(f"module 'mobileiqa_jax' has no attribute {name!r}")
