"""The package's layers import only downward: kernels -> loss -> model -> data -> demo -> train -> online /
explain / eval / serve -> cli (constants, utils and testing serve every layer)."""
from __future__ import annotations

import ast
from pathlib import Path

import sdpo_fast

PACKAGE = Path(sdpo_fast.__file__).parent
KERNELS = PACKAGE.parent / "kernels"
RANK = {"constants": 0, "utils": 0, "testing": 0, "kernels": 1, "loss": 2, "model": 3, "data": 4, "demo": 5,
        "train": 6, "online": 7, "explain": 7, "eval": 7, "integrations": 7, "serve": 7, "cli": 8}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield ".".join(("sdpo_fast",) + path.relative_to(PACKAGE).with_suffix("").parts), path
    for path in sorted(KERNELS.rglob("*.py")):
        yield ".".join(("sdpo_fast", "kernels") + path.relative_to(KERNELS).with_suffix("").parts), path


def _imports(module: str, path: Path):
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield from (target + "." + a.name if not node.module else target for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "sdpo_fast" and len(parts) > 1 else None


def test_every_module_has_a_layer():
    unknown = {_layer(m) for m, _ in _modules()} - set(RANK) - {"__init__"}
    assert not unknown


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path in _modules():
        layer = _layer(module)
        if layer == "__init__":
            continue
        for target in _imports(module, path):
            other = _layer(target)
            if other in RANK and RANK[other] > RANK[layer]:
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(upward)


def test_checker_sees_an_upward_import(tmp_path):
    """The walk resolves relative imports, so an upward one is found (the test can fail)."""
    path = tmp_path / "x.py"
    path.write_text("from ..train.step import train_step\n")
    assert list(_imports("sdpo_fast.loss.x", path)) == ["sdpo_fast.train.step"]
