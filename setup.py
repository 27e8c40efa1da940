"""Install: pip install -e ".[test]"  (add ",torch" for the PyTorch side of the converter)."""
from setuptools import find_packages, setup

setup(
    name="mobileiqa_jax",
    version="0.1.0",
    description="JAX/Flax MobileIQA: high-resolution no-reference image quality assessment "
    "with mobile backbones and knowledge distillation.",
    packages=find_packages(include=["mobileiqa_jax", "mobileiqa_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "tensorflow-datasets>=4.9.7",
        "numpy>=1.26",
        "scipy>=1.11",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "pillow>=10.0",
        # Reads timm .safetensors checkpoints without torch.
        "safetensors>=0.4",
        # Progress bars on stderr for scoring, preparing and training.
        "tqdm>=4.66",
    ],
    extras_require={
        # The PyTorch side: reading .pkl/.pth checkpoints and the parity tests' reference.
        "torch": ["torch>=2.1", "timm>=1.0.9"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
    },
)
