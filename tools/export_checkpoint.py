"""Export a DeepSpeed checkpoint (ZeRO 1, 2 or 3) to model.safetensors + model_config.yaml (+ task.safetensors).

    python tools/export_checkpoint.py outputs/demo            # newest complete checkpoint of a run
    python tools/export_checkpoint.py outputs/demo/checkpoints/step_00000400 --out exported/ --momentum
    python tools/export_checkpoint.py outputs/nlvr2_demo      # a fine-tuning: its head goes to task.safetensors

Fine-tuning loads the result with ``--pretrained out`` (``launch/finetune.py --evaluate`` also reads the task head),
``mplug_ds.engine.export.load_exported(out)`` or by reading ``model.safetensors`` into
``build_model(load_model_config(out / "model_config.yaml"))``.
"""
import argparse
import sys

from safetensors import safe_open

from mplug_ds.engine.checkpoint import TASK_FILE
from mplug_ds.engine.export import export_checkpoint, load_exported


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step_* checkpoint directory, its checkpoints/ directory or the run directory")
    parser.add_argument("--out", help="output directory (default: <checkpoint>/export or <run>/export)")
    parser.add_argument("--model-config", help="model name or YAML (default: the run's saved model_config.yaml)")
    parser.add_argument("--momentum", action="store_true", help="also write the EMA teacher as momentum.safetensors")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load files that need full unpickling (which can run code); only for checkpoints you trust")
    args = parser.parse_args(argv)
    out = args.out or f"{args.checkpoint.rstrip('/')}/export"
    try:
        path = export_checkpoint(args.checkpoint, out, args.model_config, args.momentum, args.trust_checkpoint)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    model = load_exported(path)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}/model.safetensors ({count / 1e6:.1f}M parameters, loads with no missing or unexpected keys)")
    if (path / TASK_FILE).is_file():
        with safe_open(str(path / TASK_FILE), "pt") as f:
            print(f"wrote {path / TASK_FILE} (task '{f.metadata()['task']}': {len(list(f.keys()))} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
