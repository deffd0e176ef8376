"""mtrl_jax: multi-turn reinforcement learning of language models on tool use, in JAX.

Version ranges are the ones installed and tested (Python 3.11, CPU): see README "Tested with".
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "chex>=0.1.92,<0.2",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1.0,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "importlib_resources>=7.1.0",
    "array_record>=0.8.6,<0.9",
    "numpy>=2.4,<3",
    "tqdm>=4.70,<5",
    "tensorboardX>=2.6.5,<3",
    "matplotlib>=3.11,<4",
]

# Hugging Face checkpoints and tokenizers (mtrl_jax.models.hf / chat, envs.json_tool); imported
# lazily, so the core install does not need them.
HF = [
    "safetensors>=0.8.0,<0.9",
    "tokenizers>=0.23.3,<0.24",
    "jinja2>=3.1.6,<4",  # chat templates
]

EXTRAS = {
    "hf": HF,
    "test": [
        "pytest>=9.2,<10",
        "pytest-xdist>=3.8,<4",
        "hypothesis>=6.170,<7",
        "rank-bm25>=0.2.2,<0.3",  # reference BM25 for the retrieval environment's ranker
        *HF,
        # Parity tests against the reference implementation (tiny random models, CPU). Pinned
        # exactly: a newer torch would be a multi-GB CUDA build.
        "torch==2.13.0",
        "transformers>=5.23.0,<6",
        # colab/quickstart.ipynb executed by tests/test_notebook.py.
        "nbclient>=0.11,<0.12",
        "nbformat>=5.11,<6",
        "ipykernel>=7.4,<8",
    ],
}

setup(
    name="mtrl_jax",
    version="0.1.0",
    description="Multi-turn RL of language models on tool use: one jitted rollout-and-update step.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The programs (experiments/) and the shipped configs (configs/) are installed too, so
    # `python -m experiments.train --config configs/quickstart.py` and the console scripts below
    # run from any folder (experiments.cli resolves the shipped configs' paths).
    packages=find_packages(include=["mtrl_jax", "mtrl_jax.*", "experiments", "configs"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "mtrl-train = experiments.cli:train_script",
        "mtrl-sft = experiments.cli:sft_script",
        "mtrl-evaluate = experiments.cli:evaluate_script",
        "mtrl-reflexion = experiments.cli:reflexion_script",
        "mtrl-benchmark = experiments.cli:benchmark_script",
    ]},
)
