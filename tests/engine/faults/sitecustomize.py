"""Fault injection for the failure tests, imported at start-up by every Python process whose PYTHONPATH
begins with this directory (the launcher passes it on to the ranks and they to their DataLoader workers).

``MPLUG_DS_FAULT`` chooses the fault; it acts only in the rank named by its second field:
  ``enospc:RANK``        every ``torch.save`` into a ``checkpoints`` directory raises OSError(ENOSPC) (disk full)
  ``transform:RANK:N``   the N-th training image transform of each DataLoader worker raises RuntimeError
"""
import errno
import os

_FAULT = os.environ.get("MPLUG_DS_FAULT", "").split(":")
if len(_FAULT) >= 2 and os.environ.get("RANK") == _FAULT[1]:
    if _FAULT[0] == "enospc":
        import torch

        _save = torch.save

        def _full_disk_save(obj, f, *args, **kwargs):
            if "checkpoints" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return _save(obj, f, *args, **kwargs)

        torch.save = _full_disk_save
    elif _FAULT[0] == "transform":
        from mplug_ds.data import transforms

        _call, _calls, _fail_at = transforms.TrainTransform.__call__, [0], int(_FAULT[2])

        def _failing_call(self, img, rng):
            _calls[0] += 1
            if _calls[0] >= _fail_at:
                raise RuntimeError(f"injected transform failure at image {_calls[0]}")
            return _call(self, img, rng)

        transforms.TrainTransform.__call__ = _failing_call
