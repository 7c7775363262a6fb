"""The package tree is the architecture: each layer imports only the layers inside it.

    core -> models -> data -> config -> tracking -> distributed -> cli

``core`` is the AE-KD maths (torch only), ``models`` and ``data`` add networks and datasets,
``config`` is the typed configuration (data only: importing it loads no torch), ``tracking`` is
the only layer that imports MLflow (never Ray), ``distributed`` is everything on Ray, ``cli`` the
command. The private top-level modules ``ray_aekd._*`` are shared by every layer and import only
the standard library. Every import in every module is checked, the ones inside functions too:
a lazy import that points outwards is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ray_aekd"
LAYERS = ("core", "models", "data", "config", "tracking", "distributed", "cli")
#: Third-party packages a layer may not import (in addition to the layer order).
FORBIDDEN = {
    "core": {"ray", "mlflow", "torchvision", "yaml"},
    "models": {"ray", "mlflow"},
    "data": {"mlflow"},
    "config": {"ray", "mlflow", "torch", "torchvision"},
    "tracking": {"ray"},
    "distributed": {"mlflow"},
    "cli": set(),
}


def _layer(module: str) -> str:
    """``ray_aekd.core.step`` -> ``core``; ``ray_aekd._console`` -> ``_console`` (shared)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (line, dotted name), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "ray_aekd":  # from ray_aekd import _console -> the submodule
                found += [(node.lineno, f"ray_aekd.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_sits_in_a_layer():
    for path in _modules():
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            assert parts[0].startswith("_"), f"{path}: a public top-level module belongs in a layer subpackage"
        else:
            assert parts[0] in LAYERS, f"{path}: {parts[0]!r} is not one of the layers {LAYERS}"


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_inwards(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, name in _imports(path):
            top = name.split(".")[0]
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
            if top in FORBIDDEN[layer]:
                wrong.append(f"{where} ({top} is not allowed in {layer})")
            elif top == "ray_aekd":
                target = _layer(name)
                if target and not target.startswith("_") and target not in allowed:
                    wrong.append(f"{where} (outward: {layer} may import {sorted(allowed)})")
    assert not wrong, "\n".join(wrong)


def test_shared_modules_import_only_the_standard_library():
    for path in PACKAGE.glob("_*.py"):
        for line, name in _imports(path):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or name.startswith("ray_aekd._") or name == "ray_aekd", (
                f"{path.name}:{line} imports {name}"
            )


def test_package_init_imports_nothing_heavy():
    """``import ray_aekd`` (and the CLI's parser) loads no torch, Ray or MLflow: the public API is lazy."""
    code = (
        "import sys, ray_aekd, ray_aekd.cli, ray_aekd.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'mlflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_core_and_models_run_without_ray_or_mlflow():
    code = (
        "import sys, ray_aekd.core.weighting, ray_aekd.core.losses, ray_aekd.core.step, ray_aekd.core.metrics, "
        "ray_aekd.models, ray_aekd.models.sources; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_public_api_resolves():
    import ray_aekd

    for name in ray_aekd.__all__:
        assert getattr(ray_aekd, name) is not None, name
