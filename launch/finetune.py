"""Fine-tune mPLUG on a task (grounding, retrieval) on the same DeepSpeed engine as pre-training.

    deepspeed [--hostfile hostfile] [--num_gpus N] launch/finetune.py --task grounding|retrieval \
        [--config NAME|FILE] [--pretrained PATH] [--evaluate] [--resume auto] [key=value ...]
    torchrun --nproc_per_node N launch/finetune.py --task ...
    python launch/finetune.py --task grounding      # the CPU demo: from the demo pre-training checkpoint

See mplug_ds/configs/tasks/*.yaml for the published settings and every option.
"""
from mplug_ds.tasks.cli import main
from mplug_ds.runtime.failure import hard_exit

if __name__ == "__main__":
    # End at once, also after success: interpreter exit would wait on loader workers that block SIGTERM.
    hard_exit(main())
