"""Print total and per-module parameter counts of a named model config.

    python tools/model_info.py --model mplug.en.base [--json]
"""
from __future__ import annotations

import argparse
import json

from mplug_ds.config import available_configs
from mplug_ds.models.config import load_model_config
from mplug_ds.models.param_count import parameter_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"config name ({', '.join(available_configs('models'))}) "
                                                       "or a path to a model YAML")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. vision.image_size=384")
    args = parser.parse_args()
    report = parameter_report(load_model_config(args.model, args.overrides))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']}: {report['total'] / 1e6:.1f}M parameters (ours: the model this code trains)")
    print(f"  published-size convention: {report['published_convention_total'] / 1e6:.1f}M "
          "(comparable with the mPLUG README's sizes)")
    for name, count in report["modules"].items():
        print(f"  {name:<14} {count / 1e6:9.2f}M")
    print(f"  momentum teacher (not in total): {report['momentum_teacher'] / 1e6:.1f}M")
    print(f"ours counts: {report['convention']}")
    print(f"published counts: {report['published_convention']}")


if __name__ == "__main__":
    main()
