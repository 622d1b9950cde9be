"""The package's import boundaries (docs/design.md): lower layers never import higher ones."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mplug_ds"

# layer -> packages it must never import (at module level or inside functions)
FORBIDDEN = {
    "engine": ("mplug_ds.objectives", "mplug_ds.tasks"),
    "data": ("mplug_ds.models", "mplug_ds.objectives", "mplug_ds.engine", "mplug_ds.tasks"),
    "models": ("mplug_ds.engine", "mplug_ds.data", "mplug_ds.objectives", "mplug_ds.tasks"),
    "eval": ("mplug_ds.models", "mplug_ds.objectives", "mplug_ds.engine", "mplug_ds.tasks"),
    "runtime": ("mplug_ds.models", "mplug_ds.objectives", "mplug_ds.engine", "mplug_ds.tasks", "mplug_ds.data"),
}


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_no_higher_layer(layer):
    offences = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
                for path in sorted((PACKAGE / layer).rglob("*.py")) for name in imported_modules(path)
                if name.startswith(FORBIDDEN[layer])]
    assert not offences, "\n".join(offences)
