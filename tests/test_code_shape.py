"""The shape the project keeps its code in: no function over 60 lines in the four packages, and the
driver a small module that delegates (planning, resume, rounds, manifest and packet each live in a
module of their own)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "actors", "workloads", "analysis")
MAX_FUNCTION_LINES = 60
MAX_DRIVER_LINES = 250


def _long_functions() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {n} lines")
    return out


def test_no_function_is_over_60_lines():
    assert _long_functions() == []


def test_the_driver_stays_under_250_lines():
    n = len((ROOT / "cluster" / "driver.py").read_text().splitlines())
    assert n < MAX_DRIVER_LINES, f"cluster/driver.py has {n} lines"


def test_every_module_imports_first():
    """No import cycle waits for the right import order: each module of the four packages imports in
    an interpreter where no other project module was imported yet (third-party ones stay cached)."""
    import subprocess
    import sys

    code = """
import importlib, pathlib, sys
root, failed = pathlib.Path(sys.argv[1]), []
names = [".".join(p.relative_to(root).with_suffix("").parts) for pkg in sys.argv[2:] for p in sorted((root / pkg).rglob("*.py"))]
for name in [n.removesuffix(".__init__") for n in names]:
    for k in [k for k in sys.modules if k.split(".")[0] in sys.argv[2:]]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:  # an optional engine library absent here (vllm, nixl) is not a cycle
        if (e.name or "").split(".")[0] in sys.argv[2:]:
            failed.append(f"{name}: {e}")
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
"""
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), *PACKAGES], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr[-2000:]
