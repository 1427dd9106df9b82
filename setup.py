"""megatron-moh: Mixture-of-Head attention (arXiv 2410.11842) on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-moh",
    version="0.1.0",
    description="Megatron-style distributed pretraining for Mixture-of-Head attention language models",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_moh", "megatron_moh.*"]),
    package_data={"megatron_moh": ["hf/*.py"]},
    python_requires=">=3.12",
    entry_points={
        "console_scripts": [
            "megatron-moh-convert = megatron_moh.commands.convert_checkpoint:main",
            "megatron-moh-preprocess = megatron_moh.commands.preprocess_data:main",
            "megatron-moh-train-tokenizer = megatron_moh.commands.train_tokenizer:main",
            "megatron-moh-analyze-heads = megatron_moh.commands.analyze_heads:main",
            "megatron-moh-compare-runs = megatron_moh.commands.compare_runs:main",
        ],
    },
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "transformers>=5.17.0",
        "protobuf",
        "psutil",
        "numpy",
        "tqdm",
        "pillow",
    ],
    extras_require={
        # Transformer Engine builds against CUDA on a GPU machine; see README, "Optional extras".
        "te": ["transformer-engine[pytorch]>=2.0"],
        "test": ["pytest>=8", "pytest-timeout", "lm-eval>=0.4", "accelerate", "ruff", "matplotlib>=3.8"],
        "eval": ["lm-eval>=0.4"],
        # tools/analyze_heads.py and tools/compare_runs.py draw their figures with matplotlib.
        "analysis": ["matplotlib>=3.8"],
    },
)
