"""megatron_sr: Megatron-style GPT pretraining in pure BF16 with stochastic rounding."""
from setuptools import find_packages, setup

setup(
    name="megatron_sr",
    version="0.1.0",
    description="Megatron-style GPT pretraining in pure BF16 with stochastic rounding",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sr", "megatron_sr.*"]),
    # The native CPU kernels are compiled from source on first use.
    package_data={"megatron_sr.precision": ["native_kernel.c"],
                  "megatron_sr.config": ["megatron_flags.csv"]},  # the Megatron-LM flag table
    install_requires=[
        # CPU installs: `pip install torch==2.13.0` first (tools/install.sh does);
        # an unpinned torch pulls a multi-GB CUDA build.
        # Floors: the oldest pair that runs, checked by tools/check_floors.sh (CI runs it);
        # torch 2.10's CUDA build pins triton 3.6, which has the enable_reflect_ftz launch
        # option every kernel launch passes (megatron_sr.precision.kernels.TRITON_FLOOR).
        "torch>=2.10",
        'triton>=3.6,<3.10; platform_system == "Linux"',  # 3.9 the newest checked
        "numpy",
        "sentencepiece",
        "tensorboard",
        "regex",
        "tokenizers",  # HuggingFaceTokenizer, GPT2BPETokenizer's tokenizers backend
        "tiktoken",  # TikTokenizer, GPT2BPETokenizer's default backend (the fastest)
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "transformers>=5", "safetensors", "matplotlib",
                 "megatron-core>=0.16",  # its GPTModel reads our Megatron-LM exports
                 "psutil",  # megatron-core's dist_checkpointing writer imports it
                 "wandb"],
        "wandb": ["wandb"],  # --wandb-project
        "plot": ["matplotlib"],  # tools/compare_runs.py --plot
    },
)
