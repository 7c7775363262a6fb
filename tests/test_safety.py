"""Loading never runs code (issue 7, part 5), checked on the package's syntax tree, not by grep:

- every ``torch.load`` call passes ``weights_only=True`` (a literal, so it cannot be switched off);
- YAML is read with ``yaml.safe_load`` only (no ``yaml.load``, ``unsafe_load``, ``full_load``,
  ``load_all`` or ``Loader`` classes);
- nothing else unpickles or evaluates: no ``pickle``/``marshal``/``dill``/``cloudpickle``/``joblib``
  loads, no ``numpy.load(allow_pickle=True)``, no ``eval``/``exec``.

The scanner is tested on snippets too, so a scanner that stops seeing calls fails here rather
than passing quietly. A teacher checkpoint whose weights hold pickled code is refused without
running it in tests/test_bad_input.py (``checkpoint-pickled-code`` and the console-script test)
and tests/test_checkpoint.py; a config file with a Python tag is refused here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ray_aekd"

TORCH_LOADS = {"torch.load", "torch.serialization.load"}
_UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
_YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
_YAML_LOADERS = {"Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``torch.serialization.load`` for ``th.serialization.load`` after ``import torch as th``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it stands for, from every import in the module (function-level too)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<snippet>") -> list[tuple[str, str]]:
    """Every call or name in ``source`` that could load code: ``(kind, "file:line: what")`` with
    kind ``torch``, ``yaml`` or ``other``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases) or ""
            module, _, attr = name.rpartition(".")
            if name in TORCH_LOADS and not _keyword_is(node, "weights_only", True):
                found.append(("torch", f"{where}: {name}(...) without weights_only=True"))
            elif module.split(".")[0] in _UNPICKLERS and attr in ("load", "loads", "Unpickler", "open"):
                found.append(("other", f"{where}: {name}(...) unpickles"))
            elif name == "numpy.load" and any(k.arg == "allow_pickle" for k in node.keywords):
                if not _keyword_is(node, "allow_pickle", False):
                    found.append(("other", f"{where}: {name}(...) with allow_pickle not False"))
            elif name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(("other", f"{where}: {name}(...) runs code"))
        if isinstance(node, ast.Attribute | ast.Name):
            module, _, attr = (_dotted(node, aliases) or "").rpartition(".")
            if module == "yaml" and (attr in _YAML_UNSAFE or attr in _YAML_LOADERS):
                found.append(("yaml", f"{where}: yaml.{attr} (use yaml.safe_load)"))
    return sorted(set(found))


def calls(source: str, names: set[str]) -> int:
    """How many calls in ``source`` go to one of ``names`` (dotted, imports resolved)."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    return sum(isinstance(n, ast.Call) and _dotted(n.func, aliases) in names for n in ast.walk(tree))


def _package_sources() -> list[tuple[Path, str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan sees the package
    return [(path, path.read_text()) for path in files]


def _findings(kind: str | None = None) -> list[str]:
    return [what for p, s in _package_sources() for k, what in unsafe_loads(s, str(p)) if kind in (None, k)]


def test_every_torch_load_in_the_package_is_weights_only():
    assert _findings("torch") == []
    # not vacuous: checkpoint.py and train.py read torch files
    assert sum(calls(s, TORCH_LOADS) for _, s in _package_sources()) >= 2


def test_yaml_is_read_with_safe_load_only():
    assert _findings("yaml") == []
    readers = {p.name for p, s in _package_sources() if calls(s, {"yaml.safe_load"})}
    assert {"loading.py", "sweep.py"} <= readers  # not vacuous


def test_nothing_else_in_the_package_unpickles_or_evaluates():
    assert _findings() == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('w.pt')",
        "import torch\ntorch.load('w.pt', weights_only=False)",
        "import torch\nflag = True\ntorch.load('w.pt', weights_only=flag)",
        "import torch as th\nth.load('w.pt', map_location='cpu')",
        "from torch import load\nload('w.pt')",
        "from torch import load as read\nread('w.pt')",
        "import torch.serialization\ntorch.serialization.load('w.pt')",
        "def f(path):\n    import torch\n    return torch.load(path, **{'weights_only': True})",
        "import yaml\nyaml.load(open('c.yaml'))",
        "import yaml\nyaml.load(open('c.yaml'), Loader=yaml.SafeLoader)",
        "import yaml\nyaml.unsafe_load('a: 1')",
        "import yaml\nyaml.full_load('a: 1')",
        "import yaml\nyaml.load_all('a: 1')",
        "import yaml\nloader = yaml.Loader",
        "from yaml import load\nload('a: 1')",
        "from yaml import unsafe_load as read\nread('a: 1')",
        "import pickle\npickle.loads(b'')",
        "import pickle as p\np.load(open('x', 'rb'))",
        "from pickle import Unpickler\nUnpickler(open('x', 'rb')).load()",
        "import joblib\njoblib.load('x')",
        "import cloudpickle\ncloudpickle.loads(b'')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "eval('1 + 1')",
        "exec('x = 1')",
    ],
)
def test_the_scanner_finds_unsafe_loads(snippet):
    assert unsafe_loads(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('w.pt', map_location='cpu', weights_only=True)",
        "import torch as th\nth.load('w.pt', weights_only=True)",
        "import yaml\nyaml.safe_load('a: 1')\nyaml.YAMLError",
        "import yaml\nyaml.safe_dump({'a': 1})",
        "import numpy as np\nnp.load('x.npy')",
        "import pickle\nerror = pickle.UnpicklingError\ndata = pickle.dumps(1)",
        "model.eval()",
        "import json\njson.load(open('m.json'))",
    ],
)
def test_the_scanner_lets_safe_code_through(snippet):
    assert unsafe_loads(snippet) == []


def test_a_config_file_with_a_python_tag_is_refused_without_running(tmp_path, monkeypatch, capsys):
    """``!!python/object/apply`` would run a command under ``yaml.load``; ``safe_load`` refuses it."""
    from ray_aekd import cli

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "yaml-code-ran"
    tagged = f"!!python/object/apply:os.system ['touch {marker}']\n"
    (tmp_path / "distill.yaml").write_text(tagged)
    (tmp_path / "base.yaml").write_text(f"name: x\nteachers: {tagged}")
    (tmp_path / "sweep.yaml").write_text("base: base.yaml\nspace: {distill.temperature: {grid: [4.0]}}\n")
    assert cli.main(["distill", "--config", str(tmp_path / "distill.yaml")]) == 2
    assert "is not plain YAML data" in capsys.readouterr().err
    assert cli.main(["distill", "--config", str(tmp_path / "sweep.yaml"), "--set", f"name={tagged.strip()}"]) == 2
    assert "the value is not plain YAML" in capsys.readouterr().err  # --set values are YAML too
    assert cli.main(["sweep", "--config", str(tmp_path / "sweep.yaml")]) == 2
    assert "is not plain YAML data" in capsys.readouterr().err  # the sweep's base config
    assert not marker.exists()
