"""The package dependency map of docs/architecture.md holds: imports flow one way between the layers.

`format` <- `loaders` <- `store` / `engines` <- `backend` <- `scheduler` (the scheduler talks to Triton and
the stores over the network and never imports the backend). Every import of a ``warmstart`` module is read
from the source with `ast`, including imports inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "warmstart"

# what each layer may import besides itself and the shared top-level modules (errors, names, units, ...)
LAYERS: dict[str, set[str]] = {
    "format": set(),
    "loaders": {"format"},
    "store": {"format", "loaders"},
    "engines": {"format", "loaders"},
    "backend": {"format", "loaders", "store", "engines"},
    "scheduler": {"format", "loaders", "store"},
}


def imports_of(path: Path) -> set[str]:
    """The ``warmstart.*`` modules a source file imports (absolute imports; the project uses no relative ones)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("warmstart.")}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            if node.module and node.module.startswith("warmstart."):
                found.add(node.module)
            elif node.module == "warmstart":
                found |= {f"warmstart.{a.name}" for a in node.names}
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for mod in imports_of(path):
            other = layer_of(mod)
            if other is not None and other != layer and other not in LAYERS[layer]:
                wrong.append(f"{path.relative_to(PKG.parent)} imports {mod}")
    assert not wrong, "\n".join(wrong)


def test_the_dependency_check_sees_a_lazy_import_inside_a_function(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n    from warmstart.store.service import x\n    import warmstart.scheduler.router\n"
    )
    assert imports_of(src) == {"warmstart.store.service", "warmstart.scheduler.router"}
