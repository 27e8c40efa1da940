"""Test-session set-up shared by every test file."""

# Loading triton's extension (torch imports it, e.g. through timm) after TensorFlow's crashes
# the process with a segmentation fault (torch 2.14 / triton 3.8 / TF 2.21); the other order
# is fine. Tests import both (the PyTorch reference, tfds preparation, TFLite export), so load
# the PyTorch side first when it is installed.
try:
  import torch  # noqa: F401  pylint: disable=unused-import
  import triton  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass
