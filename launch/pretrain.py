"""Pre-train mPLUG on DeepSpeed.

    deepspeed [--hostfile hostfile] [--num_gpus N] launch/pretrain.py [--config demo|base|large|FILE] [key=value ...]
    torchrun --nproc_per_node N launch/pretrain.py ...
    python launch/pretrain.py                       # the CPU demo: tiny model on the built-in demo data

See docs/multi_node.md for multi-node runs and mplug_ds/configs/pretrain/*.yaml for every option.
"""
from mplug_ds.objectives.cli import main
from mplug_ds.runtime.failure import hard_exit

if __name__ == "__main__":
    # End at once, also after success: interpreter exit would wait on loader workers that block SIGTERM.
    hard_exit(main())
