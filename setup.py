"""megatron-longpo: long-context preference optimisation (LongPO, SoLoPO, DPO family) on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="megatron-longpo",
    version="0.1.0",
    description="Long-context preference optimisation (LongPO, SoLoPO, DPO/IPO/SimPO/ORPO/SFT) on Megatron-Core",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_longpo", "megatron_longpo.*"]),
    # the data the defaults read (the demo's pairs, the evaluation's documents and questions): megatron_longpo/resources
    package_data={"megatron_longpo.resources": ["*.jsonl", "documents/*.md"]},
    install_requires=[
        "megatron-core>=0.19,<0.20",
        "torch>=2.6",
        "transformers>=4.56",
        "accelerate",  # transformers needs it to read GGUF files
        "gguf>=0.10",
        "safetensors",
        "sentencepiece",
        "datasets",
        "nltk",
        "numpy",
        "pyarrow",  # Parquet input (tools/preprocess_pairs.py)
        "psutil",  # dist_checkpointing.save hangs without it
        "pyyaml",
        "tqdm",
        "rich",
        "tensorboard",
    ],
    extras_require={
        # Transformer Engine builds against the CUDA toolkit: install on GPU machines only.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # `make test` (not `make demo`): pytest, ruff (`ruff check .`, ruff.toml), and the real OpenAI-compatible server that the
        # llama.cpp generation tests start (llama-cpp-python is built from source: about 5-10 minutes
        # on 2 cores the first time). Nothing in the package imports either.
        "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "llama-cpp-python[server]==0.3.36"],
    },
)
