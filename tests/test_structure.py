"""The package's layering: imports only point down, and evaluation/hub never load training."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_common import ROOT, env

PACKAGE = ROOT / "ghn"

# Lower numbers sit lower; a module may import its own layer and anything below.
LAYERS = {
    "ghn._compat": 0,
    "ghn.cache": 0,
    "ghn.errors": 0,
    "ghn.hostmem": 0,
    "ghn.params": 0,
    "ghn.sharding": 0,
    "ghn.treepath": 0,
    "ghn.zoo": 1,
    "ghn.baselines": 1,
    "ghn.graph": 1,
    "ghn.data": 1,
    "ghn.checkpoint": 1,
    "ghn.hypernet": 2,
    "ghn.hub": 3,
    "ghn.tasks": 3,
    "ghn.calibrate": 3,
    "ghn.train": 4,
    "ghn.evaluate": 4,
    "ghn.cli": 5,
    "ghn.__main__": 5,
    "ghn": 5,  # the package facade (ghn/__init__.py)
}


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    # The facade "ghn" names only ghn/__init__.py: every other module needs its own row.
    for n in range(len(parts), 1, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name, LAYERS[name]
    if module == "ghn":
        return "ghn", LAYERS["ghn"]
    raise KeyError(f"{module} has no layer in LAYERS; add it")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def ghn_imports(path: Path) -> list[tuple[int, str]]:
    """Every `ghn` module `path` imports, at any depth (function-local imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ghn"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "ghn":
                # `from ghn import zoo` imports ghn.zoo; `from ghn.zoo import get` ghn.zoo.
                names = [f"{node.module}.{a.name}" for a in node.names]
                out += [(node.lineno, n if n in LAYERS else node.module) for n in names]
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "pretrained" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_point_down(path):
    me, mine = layer_of(module_name(path))
    for line, target in ghn_imports(path):
        other, theirs = layer_of(target)
        assert theirs <= mine, (
            f"{path.relative_to(ROOT)}:{line} imports {target} (layer {other}={theirs}) from "
            f"layer {me}={mine}: move the code so imports point down"
        )


def test_the_layer_table_covers_every_module():
    for path in MODULES:
        layer_of(module_name(path))
    with pytest.raises(KeyError, match="ghn.new_module has no layer"):
        layer_of("ghn.new_module")


def test_evaluation_and_hub_do_not_load_training():
    code = (
        "import sys, ghn.evaluate, ghn.hub, ghn.tasks\n"
        "bad = sorted(m for m in sys.modules if m == 'ghn.train' or m.startswith('ghn.train.'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env(1), cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ghn.train import run\n")
    assert ghn_imports(bad) == [(2, "ghn.train")]
    assert layer_of("ghn.train.step")[1] > layer_of("ghn.hub")[1]
