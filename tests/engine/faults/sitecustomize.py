"""Fault injection for the failure tests, imported at start-up by every Python process whose PYTHONPATH
begins with this directory (the launcher passes it on to the ranks and they to their DataLoader workers).

``MPLUG_DS_FAULT`` chooses the fault; it acts only in the rank named by its second field:
  ``enospc:RANK``        every ``torch.save`` into a ``checkpoints`` directory raises OSError(ENOSPC) (disk full)
  ``transform:RANK:N``   the N-th training image transform of each DataLoader worker raises RuntimeError
  ``skip_allreduce:RANK:S``  in optimizer step S the rank skips the stop-agreement all-reduce once (a rank-dependent
                         branch): the other ranks wait in it
  ``extra_call:RANK:S``  in optimizer step S the rank calls one LayerNorm of the model once more (no collective
                         under ZeRO-2), printing its name
  ``sigkill:RANK:S``     the rank SIGKILLs itself at the start of optimizer step S (no exception anywhere)
"""
import errno
import os
import signal
import sys

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
    elif _FAULT[0] in ("skip_allreduce", "extra_call", "sigkill"):
        import torch
        from mplug_ds.engine import trainer

        _fault, _step, _done = _FAULT[0], int(_FAULT[2]), []

        def _in_fault_step(self):
            return self.state.step + 1 == _step and not _done

        if _fault == "skip_allreduce":
            _any_rank = trainer.Trainer._any_rank

            def _skipping_any_rank(self, flag):
                if _in_fault_step(self):
                    _done.append(True)
                    return flag  # the all-reduce the other ranks enter
                return _any_rank(self, flag)

            trainer.Trainer._any_rank = _skipping_any_rank
        elif _fault == "extra_call":
            _agree = trainer.Trainer._agree

            def _agree_after_an_extra_call(self, out, stop_local):
                if _in_fault_step(self):
                    _done.append(True)
                    name, norm = next((n, m) for n, m in self.engine.module.named_modules()
                                      if isinstance(m, torch.nn.LayerNorm))
                    print(f"fault: rank {os.environ['RANK']} calls {name} once more in step {_step}", file=sys.stderr,
                          flush=True)
                    with torch.no_grad():
                        norm(torch.zeros(1, norm.normalized_shape[-1]))
                return _agree(self, out, stop_local)

            trainer.Trainer._agree = _agree_after_an_extra_call
        else:
            _optimizer_step = trainer.Trainer.optimizer_step

            def _killed_optimizer_step(self, data, stop):
                if _in_fault_step(self):
                    os.kill(os.getpid(), signal.SIGKILL)
                return _optimizer_step(self, data, stop)

            trainer.Trainer.optimizer_step = _killed_optimizer_step
