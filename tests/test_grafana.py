"""docs/grafana/pdbench.json and docs/operations.md cover every live series pdbench records."""

from __future__ import annotations

import json
import re
from pathlib import Path

from actors.metrics import SERIES, TAG_KEYS

ROOT = Path(__file__).resolve().parents[1]


def kv_series() -> set[str]:
    """The KV transport's series, read from where they are defined (actors/kv/accounting.py)."""
    src = (ROOT / "actors" / "kv" / "accounting.py").read_text()
    return set(re.findall(r'"(pdbench_kv_\w+)"', src))


def exprs() -> list[str]:
    dash = json.loads((ROOT / "docs" / "grafana" / "pdbench.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_series_has_a_panel_and_every_panel_a_series():
    known = set(SERIES) | kv_series()
    assert len(kv_series()) >= 4
    used = set()
    for e in exprs():
        # Ray exports custom metrics as ray_<name>, with _bucket/_sum/_count or _total suffixes.
        names = {re.sub(r"_(bucket|sum|count|total)$", "", m) for m in re.findall(r"ray_(pdbench_\w+)", e)}
        assert names and names <= known, e
        used |= names
        assert 'run=~"$run"' in e and 'cell=~"$cell"' in e, e
    assert used == known


def test_operations_doc_lists_every_series_and_tag():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for name in set(SERIES) | kv_series():
        assert f"`{name}`" in doc, name
    for tag in TAG_KEYS:
        assert f"`{tag}`" in doc
