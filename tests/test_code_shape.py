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
