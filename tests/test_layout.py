"""The package's architecture, checked: the scoring core never imports the active-learning layer,
`import ensel` stays light, and the layer's extra is named when it is missing."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ensel"

# What the core must not bring: the active-learning layer and its extra's packages, and triton
# (about a second to import, needed only once a CUDA tensor is scored).
HEAVY = ("ensel.al", "torchvision", "matplotlib", "sklearn", "tqdm", "triton")


def _fresh(code: str) -> dict:
    """Runs `code` in a fresh interpreter, as a user's process would start (without the suite's
    TRITON_INTERPRET, under which CPU tensors may go to Triton); it leaves its answer as JSON on
    the last stdout line."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ENSEL_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


_NEW_MODULES = """
import json, sys
import torch  # torch itself imports tqdm (torch.hub): only what ensel adds is ensel's
before = set(sys.modules)
{body}
heavy = {heavy!r}
new = sorted(m for m in set(sys.modules) - before if any(m == h or m.startswith(h + ".") for h in heavy))
print(json.dumps({{"new": new}}))
"""


def test_import_ensel_imports_no_active_learning_layer_and_no_triton():
    got = _fresh(_NEW_MODULES.format(body="import ensel", heavy=HEAVY))
    assert got["new"] == [], got


def test_scoring_cpu_tensors_never_imports_triton():
    body = "import ensel\nensel.score(torch.randn(3, 5, 4), labels=torch.tensor([0, 1, 2, 3, 0]))"
    assert _fresh(_NEW_MODULES.format(body=body, heavy=HEAVY))["new"] == []


def test_ensel_score_files_command_imports_no_active_learning_layer(tmp_path):
    paths = []
    for e in range(3):
        paths.append(str(tmp_path / f"m{e}.npy"))
        np.save(paths[-1], np.random.default_rng(e).standard_normal((40, 6)).astype(np.float16))
    body = f"from ensel.cli import main\nassert main(['score', *{paths!r}, '--top', '3']) == 0"
    got = _fresh(_NEW_MODULES.format(body=body, heavy=HEAVY))
    assert got["new"] == [], got


def _imports(path: Path) -> list[str]:
    """The absolute names of every module `path` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names]  # `from . import al`
    return names


def test_the_core_never_imports_the_active_learning_layer():
    """Every module of the core (ensel/ outside ensel/al/, and the Triton kernels) is checked,
    lazy imports inside functions included. The command line (ensel/cli.py, __main__.py) is the
    application over both layers and is the one place allowed to import ensel.al."""
    application = {PACKAGE / "cli.py", PACKAGE / "__main__.py"}
    layers = {"al", "integrations"}
    core = [p for p in PACKAGE.rglob("*.py") if not layers & set(p.relative_to(PACKAGE).parts[:-1]) and p not in application]
    core += list((ROOT / "kernels").glob("*.py"))
    assert len(core) > 10, core  # the walk found the package

    def layer(m: str) -> bool:
        return any(m == f"ensel.{name}" or m.startswith(f"ensel.{name}.") for name in layers)

    offenders = {
        str(p.relative_to(ROOT)): bad
        for p in core
        if (bad := [m for m in _imports(p) if layer(m) or m.split(".")[0] in HEAVY[1:-1]])
    }
    assert offenders == {}


def test_the_integrations_use_the_core_only():
    """ensel.integrations plugs the core into other libraries: never the active-learning layer."""
    modules = list((PACKAGE / "integrations").glob("*.py"))
    assert modules
    offenders = {str(p.relative_to(ROOT)): bad for p in modules
                 if (bad := [m for m in _imports(p) if m == "ensel.al" or m.startswith("ensel.al.")])}
    assert offenders == {}


def test_import_check_sees_a_lazy_relative_import(tmp_path):
    """The checker itself: a relative import two levels up inside a function is resolved."""
    module = ROOT / "ensel" / "backends" / "_probe_for_test.py"
    try:
        module.write_text("def f():\n    from ..al import loop\n")
        assert "ensel.al.loop" in _imports(module) or "ensel.al" in _imports(module)
    finally:
        module.unlink()


def test_a_missing_extra_names_the_extra_to_install():
    code = """
import importlib.util, json
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "torchvision" else real(name, *a)
try:
    import ensel.al.loop
except ImportError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""
    got = _fresh(code)
    assert got["error"] == "MissingExtraError"
    assert "pip install 'ensel[al]'" in got["message"] and "torchvision" in got["message"]
