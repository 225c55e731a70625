"""megatron-longpo: long-context preference optimisation (LongPO, SoLoPO, DPO family) on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="megatron-longpo",
    version="0.1.0",
    description="Long-context preference optimisation (LongPO, SoLoPO, DPO/IPO/SimPO/ORPO/SFT) on Megatron-Core",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_longpo", "megatron_longpo.*"]),
    # package data: the data the defaults read (the demo's pairs, the evaluation's documents and
    # questions: megatron_longpo/resources); the evaluation's offline haystack, held-out documents and
    # RULER's word lists (eval/corpus.py)
    package_data={"megatron_longpo.resources": ["*.jsonl", "documents/*.md"],
                  "megatron_longpo.eval": ["data/*.txt", "data/*.jsonl", "data/wonderwords/*"]},
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
        "matplotlib",  # tools/eval_long.py's picture (score against length with CI bars)
    ],
    extras_require={
        # Transformer Engine builds against the CUDA toolkit: install on GPU machines only.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # Weights & Biases logging (train.wandb_project); works offline (WANDB_MODE=offline).
        "wandb": ["wandb"],
        # `make test` (not `make demo`): pytest, ruff (`ruff check .`, ruff.toml), a real
        # OpenAI-compatible server for the HTTP generation tests (`transformers serve`, from wheels),
        # wandb for the offline-run test, scipy (the bootstrap checked against scipy.stats.bootstrap)
        # and wonderwords (the copied word lists checked against it). Nothing in the package imports them.
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist", "ruff>=0.6", "transformers[serving]>=5", "wandb",
                "scipy", "wonderwords"],
        # Optional second server for the HTTP generation tests and for generating data with a GGUF
        # model: llama.cpp compiles from source (5-10 minutes on 2 cores); its tests run where it is installed.
        "llama-server": ["llama-cpp-python[server]==0.3.36"],
    },
)
