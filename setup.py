"""emloc: fine-tune a model far larger than your GPU through an emulator and LoRA correction."""
from pathlib import Path

from setuptools import find_namespace_packages, setup

setup(
    name="emloc",
    version="0.1.0",
    description=(
        "Emulator-based memory-efficient fine-tuning with LoRA correction (EMLoC), "
        "as fused Triton kernels under a streaming PyTorch pipeline."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Namespace discovery also picks up the data folders (emloc.configs, emloc.assets) as packages.
    packages=find_namespace_packages(include=["emloc", "emloc.*", "emloc_kernels", "emloc_kernels.*"]),
    package_data={"emloc.configs": ["*.json"], "emloc.assets": ["*/*"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.51",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft>=0.15", "matplotlib", "ruff"],
        "demo": ["matplotlib"],
    },
    entry_points={"console_scripts": ["emloc = emloc.cli:main"]},
)
