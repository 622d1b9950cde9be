"""mplug_ds: mPLUG vision-language pre-training (with TiMix) and fine-tuning on DeepSpeed."""

__version__ = "0.1.0"
