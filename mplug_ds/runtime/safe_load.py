"""Loading checkpoint files without running code from them.

A ``.pt`` file is a pickle, and unpickling can call any Python function it names: a planted checkpoint
could run ``os.system`` on resume. Everything here loads with torch's ``weights_only`` unpickler, which only
builds tensors, plain containers and an allow-list of classes:

* our own files (per-rank state, momentum teacher) hold only tensors and plain types;
* DeepSpeed's model and optimizer files also name a few DeepSpeed classes (``SAFE_DEEPSPEED_NAMES``).
  DeepSpeed unpickles them itself with ``weights_only=False``; ``deepspeed_weights_only()`` forces its loads
  (and ``zero_to_fp32``'s) through the restricted unpickler with that allow-list.

Before anything is loaded, ``check_checkpoint`` reads the pickle of every ``.pt`` file without executing it
and refuses a file that names anything else, naming the file and what it wanted. ``trusted=True`` (the
``--trust-checkpoint`` flag / ``checkpoint.trust_pickles``) skips both restrictions, for checkpoints the user
vouches for.
"""
from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

# Classes DeepSpeed 0.19 stores in its optimizer files; none does more than hold numbers when rebuilt. Named here
# and imported only when a file names one: reading a plain file (a released .pth) never imports DeepSpeed, whose
# import logs to stdout.
SAFE_DEEPSPEED_NAMES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                        "deepspeed.runtime.zero.config.ZeroStageEnum",
                        "deepspeed.utils.tensor_fragment.fragment_address")
TRUST_HINT = ("if you trust this checkpoint (it can run code when loaded), pass --trust-checkpoint "
              "(checkpoint.trust_pickles=true; tools/export_checkpoint.py --trust-checkpoint)")


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint file needs more than the restricted unpickler allows."""


def deepspeed_globals() -> list[type]:
    """The allow-listed DeepSpeed classes themselves (``SAFE_DEEPSPEED_NAMES``; imports DeepSpeed)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _named_globals(path: Path) -> list[str]:
    """Every Python object ``path``'s pickle names beyond tensors and plain types (read, not executed)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        return [f"<unreadable: {err}>"]


def unsafe_globals(path: Path) -> list[str]:
    """The Python objects ``path``'s pickle names beyond tensors, plain types and the allow-list (not executed)."""
    return [name for name in _named_globals(path) if name not in SAFE_DEEPSPEED_NAMES]


def check_file(path: Path, named: list[str] | None = None) -> None:
    """Raise ``UntrustedCheckpointError`` naming ``path`` when its pickle names anything not allowed (``named``:
    the names it holds, when already read)."""
    found = [n for n in named if n not in SAFE_DEEPSPEED_NAMES] if named is not None else unsafe_globals(path)
    if found:
        raise UntrustedCheckpointError(f"{path}: refusing to load, it would import/call {', '.join(found[:5])}, "
                                       f"which checkpoints written by mplug_ds never contain; {TRUST_HINT}")


def check_checkpoint(tag_dir: Path) -> None:
    """``check_file`` for every ``.pt`` file under a checkpoint directory."""
    for path in sorted(tag_dir.rglob("*.pt")):
        check_file(path)


def load(path: Path, trusted: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` to CPU with the restricted unpickler (full unpickling only when ``trusted``); ``mmap`` maps the
    tensors' storage from the file instead of reading it (pages are read when touched)."""
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    named = _named_globals(path)
    check_file(path, named)
    try:
        with torch.serialization.safe_globals(deepspeed_globals() if named else []):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpointError(f"{path}: refusing to load ({_reason(err)}); {TRUST_HINT}") from None


def _reason(err: Exception) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    lines = [line.strip() for line in str(err).splitlines()]
    return next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else repr(err))


@contextmanager
def deepspeed_weights_only(trusted: bool = False) -> Iterator[None]:
    """Inside, every ``torch.load`` (DeepSpeed's included, whatever it asks for) uses the restricted unpickler
    with DeepSpeed's allow-list. Does nothing when ``trusted``."""
    if trusted:
        yield
        return
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_globals()):
            try:
                yield
            except pickle.UnpicklingError as err:
                raise UntrustedCheckpointError(f"refusing to load a DeepSpeed checkpoint file ({_reason(err)}); "
                                               f"{TRUST_HINT}") from None
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
