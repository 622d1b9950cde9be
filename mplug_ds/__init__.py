"""mplug_ds: mPLUG vision-language pre-training (with TiMix) and fine-tuning on DeepSpeed.

``mplug_ds.list_models()`` names the built-in model sizes; ``mplug_ds.create_model(name, **overrides)`` builds one.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models"]


def __getattr__(name: str) -> Any:
    # The factory imports torch and timm; `import mplug_ds` alone (the data tools) stays light.
    if name in ("create_model", "list_models"):
        from mplug_ds.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'mplug_ds' has no attribute '{name}'")
