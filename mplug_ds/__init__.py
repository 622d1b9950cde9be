"""mplug_ds: mPLUG vision-language pre-training (with TiMix) and fine-tuning on DeepSpeed.

``mplug_ds.list_models()`` names the built-in model sizes; ``mplug_ds.create_model(name, **overrides)`` builds one.
``mplug_ds.load(path)`` loads a trained checkpoint (an export, a converted release or a run directory) as a predictor
that captions, answers, grounds, ranks and classifies images of one's own (``mplug_ds.tasks.predictor``).
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "load"]


def __getattr__(name: str) -> Any:
    # The factory and the predictor import torch and timm; `import mplug_ds` alone (the data tools) stays light.
    if name in ("create_model", "list_models"):
        from mplug_ds.models import registry

        return getattr(registry, name)
    if name == "load":
        from mplug_ds.tasks.predictor import load

        return load
    raise AttributeError(f"module 'mplug_ds' has no attribute '{name}'")
