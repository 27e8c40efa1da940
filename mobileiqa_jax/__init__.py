"""MobileIQA in JAX/Flax: high-resolution no-reference image quality with mobile backbones."""

__version__ = "0.1.0"
