#!/usr/bin/env bash
# The carry kit for a bare GPU machine: wheels of everything the engine needs beyond what such a machine has
# (torch, torchvision, timm, transformers, matplotlib and their dependencies), in one folder, and the one command
# that installs them there (no network) and runs the GPU acceptance run, tools/gpu_check.py --quick.
#
#   tools/gpu_bundle.sh                       # -> .gpu_kit/, then prints the command
#   tools/gpu_bundle.sh --out DIR --python "3.12 3.11" --device-torch 2.11.0
#
# Run it from the project's environment (the one the tests pass in): every wheel is pinned to the version installed
# there. Wheels are fetched for each --python version (default: 3.12, the GPU machine's, and this interpreter's);
# DeepSpeed has no wheel on PyPI and is built here as a pure-Python wheel (its CUDA ops compile on first use).
# Left out on purpose: pycocoevalcap (caption metrics, ~100 MB of Java jars; the GPU check evaluates no captions).
# --device-torch: the GPU machine's torch; a matching torchvision wheel goes to optional/ and is installed only
# where `import torchvision` fails.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/.gpu_kit"
HERE_PY="$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
PYTHONS="3.12 $HERE_PY"
DEVICE_TORCH="2.11.0"
CARRY_LIMIT=$((64 * 1024 * 1024))  # what the device tool carries: the working tree plus the kit

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$(realpath -m "$2")"; shift 2 ;;
        --python) PYTHONS="$2"; shift 2 ;;
        --device-torch) DEVICE_TORCH="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_bundle.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
PYTHONS="$(tr ' ' '\n' <<<"$PYTHONS" | awk 'NF && !seen[$0]++' | tr '\n' ' ')"

python -c 'import mplug_ds, deepspeed, webdataset' >/dev/null 2>&1 || {
    echo "gpu_bundle.sh: run this from the project's environment (mplug_ds, deepspeed and webdataset importable)" >&2
    exit 1
}

rm -rf "$OUT"
mkdir -p "$OUT/optional"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# What the engine needs that the GPU machine lacks: the requirements of mplug_ds, followed through everything that
# machine does not provide, pinned to the versions installed here. Provided there: torch with everything it
# requires, and torchvision, timm, transformers and matplotlib with their direct requirements (what they need
# further down depends on their versions, e.g. pydantic through transformers' typer, so it is not counted on).
python - "$WORK/needed.txt" <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

LEFT_OUT = {"pycocoevalcap"}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(name):
    reqs = (Requirement(line) for line in md.requires(name) or [])
    return [canonical(r.name) for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def closure(names, stop=frozenset()):
    seen, todo = set(), [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen or name in LEFT_OUT:
            continue
        seen.add(name)
        if name not in stop:
            todo += requirements(name)
    return seen


provided = closure(["torch"])
for name in ("torchvision", "timm", "transformers", "matplotlib"):
    provided |= {name, *requirements(name)}
needed = sorted(closure(["mplug_ds"], stop=provided) - provided - {"mplug-ds"})
with open(sys.argv[1], "w") as out:
    out.writelines(f"{name}=={md.version(name)}\n" for name in needed)
EOF
echo "kit: $(tr '\n' ' ' <"$WORK/needed.txt")"

# Wheels for this interpreter (downloaded, or built when PyPI has only a source archive: DeepSpeed) ...
python -m pip wheel -q --no-deps -r "$WORK/needed.txt" -w "$OUT"
# ... and the compiled ones again for every other target Python.
for py in $PYTHONS; do
    [ "$py" = "$HERE_PY" ] && continue
    for wheel in "$OUT"/*.whl; do
        case "$(basename "$wheel")" in *-none-any.whl|*-abi3-*.whl) continue ;; esac
        name="$(basename "$wheel" | cut -d- -f1)"
        version="$(basename "$wheel" | cut -d- -f2)"
        python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 -d "$OUT" "$name==$version"
    done
done
for wheel in "$OUT"/*.whl; do  # a wheel built here must be pure Python, or it would not run there
    case "$(basename "$wheel")" in
        *-linux_*.whl) echo "gpu_bundle.sh: $(basename "$wheel") was compiled on this machine; it would not load" \
                            "on the GPU machine" >&2; exit 1 ;;
    esac
done

# This package, from the working tree.
python -m pip wheel -q --no-deps "$ROOT" -w "$WORK/self"
cp "$WORK"/self/mplug_ds-*.whl "$OUT/"
{ cat "$WORK/needed.txt"; echo "mplug_ds==$(python -c 'import importlib.metadata as m; print(m.version("mplug_ds"))')"; } \
    >"$OUT/requirements.txt"

# torchvision for the GPU machine's torch (0.(minor + 15).patch), installed there only when it has none.
IFS=. read -r t_major t_minor t_patch <<<"$DEVICE_TORCH"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$OUT/optional" "torchvision==0.$((t_minor + 15)).${t_patch:-0}"

COMMIT="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
DIRTY="$( [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && echo true || echo false)"
python - "$OUT" "$COMMIT" "$DIRTY" "$PYTHONS" "$DEVICE_TORCH" <<'EOF'
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

out, commit, dirty, pythons, device_torch = sys.argv[1:]
wheels = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*.whl"))
info = {"commit": commit, "uncommitted_changes": dirty == "true",
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pythons": pythons.split(),
        "device_torch": device_torch, "wheels": wheels}
Path(out, "BUILD_INFO.json").write_text(json.dumps(info, indent=1) + "\n")
EOF

KIT_BYTES="$(du -sb "$OUT" | cut -f1)"
TREE_BYTES="$(git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 du -cb 2>/dev/null) | tail -1 | cut -f1)"
if [ $((KIT_BYTES + TREE_BYTES)) -gt "$CARRY_LIMIT" ]; then
    echo "gpu_bundle.sh: kit ($KIT_BYTES bytes) + working tree ($TREE_BYTES bytes) exceed the device tool's" \
         "64 MiB carry limit" >&2
    exit 1
fi

KIT="$(realpath --relative-to="$ROOT" "$OUT")"
INSTALL="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site"
COMMAND="$INSTALL --find-links $KIT -r $KIT/requirements.txt && { python3 -c 'import torchvision' 2>/dev/null || $INSTALL $KIT/optional/torchvision-*.whl; } && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 tools/gpu_check.py --quick --kit $KIT --out \$OUT/gpu_report.json --log \$OUT/gpu_check.log"
echo "$COMMAND" >"$OUT/COMMAND.txt"

echo "built $KIT: $(find "$OUT" -name '*.whl' | wc -l) wheels, $((KIT_BYTES / 1024 / 1024)) MiB (commit ${COMMIT:0:7}$( [ "$DIRTY" = true ] && echo ', with uncommitted changes'))"
echo "on the GPU machine (device tool: carry [\"$KIT\"], timeout_s 600), from the repository root:"
echo
echo "$COMMAND"
