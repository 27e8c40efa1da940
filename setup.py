"""Install: pip install -e ".[test]"  (add ",torch" for the PyTorch side of the converter)."""
from setuptools import find_packages, setup

setup(
    name="mobileiqa_jax",
    version="0.1.0",
    description="JAX/Flax MobileIQA: high-resolution no-reference image quality assessment "
    "with mobile backbones and knowledge distillation.",
    packages=find_packages(include=["mobileiqa_jax", "mobileiqa_jax.*"]),
    # GPU target descriptions for deviceless GPU compiles (mobileiqa_jax/aot.py).
    package_data={"mobileiqa_jax": ["gpu_targets/*.txtpb", "gpu_targets/README.md"]},
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
        # SPAQ and BID release their scores as .xlsx.
        "openpyxl>=3.1",
        # tfds reads prepared data sets as array_record (no TensorFlow at read time) and
        # imports importlib_resources when building.
        "array_record>=0.8",
        "importlib_resources>=6",
        # The input pipeline: deterministic batches in reader threads or worker processes.
        "grain>=0.2.18",
        # The built-in demo data set distorts the photos scikit-image ships.
        "scikit-image>=0.22",
        # TensorBoard event files without TensorFlow, and the predicted-vs-MOS scatter plot.
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # The PyTorch side: reading .pkl/.pth checkpoints and the parity tests' reference.
        "torch": ["torch>=2.1", "timm>=1.0.9", "huggingface_hub>=0.24"],
        # Preparing tfds data sets (writing needs TensorFlow; the CPU build is enough) and the
        # TFLite export with its LiteRT interpreter.
        "tf": ["tensorflow-cpu>=2.21", "ai-edge-litert>=2.0"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        # Ahead-of-time compiles for TPU topologies on any host (launch/aot_compile.py):
        # libtpu next to the CPU jax. jax[tpu] pins the libtpu build its jax version needs,
        # so this pins the jax this project is tested with (0.10.2 -> libtpu 0.0.42.*).
        "tpu-aot": ["jax[tpu]==0.10.2"],
        # Ahead-of-time compiles for NVIDIA GPUs on any host (launch/aot_compile.py
        # --topology=h100:8): jax's CUDA plugin and its PJRT package, about 400 MB; no NVIDIA
        # wheels and no GPU are needed to compile. Pinned to the same jax.
        "gpu-aot": ["jax-cuda13-plugin==0.10.2", "jax-cuda13-pjrt==0.10.2"],
    },
)
