"""The stack's layers, as docs/architecture.md draws them: a module never imports a higher layer.

Read from the source with ``ast`` (nothing is imported), so a new upward import fails here with the
file and the line, before it turns into an import cycle or a layer that cannot be tested alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tcppunch

# Lowest first. A package may import its own modules and anything listed before it.
STACK = ["wire", "ratelimit", "nat", "portmap", "punch", "relay", "session", "coordinator", "peer", "vpn", "cli"]
# Beside the stack: the lab uses the vocabulary of the low layers; labrun drives the peer API in a lab.
BESIDE = {"lab": {"wire", "ratelimit", "nat", "portmap"}, "labrun": set(STACK) | {"lab"}}
# The command line also drives the lab (`tcppunch lab ...`).
ALSO = {"cli": {"lab"}}
ROOT = Path(tcppunch.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name.split(".")[1]) for name in names
                  if name.startswith("tcppunch.") and name.count(".") >= 1]
    return found


def _allowed(layer: str) -> set[str]:
    if layer in BESIDE:
        return BESIDE[layer] | {layer}
    return set(STACK[: STACK.index(layer) + 1]) | ALSO.get(layer, set())


def test_every_module_belongs_to_a_known_layer() -> None:
    layers = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert layers - {"__init__", "__main__"} <= set(STACK) | set(BESIDE)


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        layer = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if layer in ("__init__", "__main__"):
            continue
        upward += [f"{path.relative_to(ROOT.parent)}:{line} imports tcppunch.{target}"
                   for line, target in _imports(path) if target not in _allowed(layer)]
    assert upward == []


def test_no_module_imports_another_modules_private_names() -> None:
    """A name with a leading underscore is its module's own business: what two modules share gets a public
    name in a module of its own (e.g. ``cli/running.py``), so changing a private helper breaks nobody."""
    reaching = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tcppunch")):
                reaching += [f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {alias.name} from "
                             f"{'.' * node.level}{node.module or ''}"
                             for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert reaching == []
