"""benchmarks/layerwise_step.py: both save modes run the same steps and every group gets published."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("layerwise_step", ROOT / "benchmarks" / "layerwise_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_both_modes_publish_every_group_and_report_the_step_loops_share(ray_local):
    bench = load()
    got = {m: bench.run(m, steps=2, saves=2, tokens=32, store_name=f"t-layerwise-{m}") for m in ("after_forward", "layerwise")}
    for r in got.values():  # every step's groups were published (else `run` would not return)
        assert r["forward_s"] > 0 and r["end_to_published_s"] >= 0 and r["blocked_s"] >= 0
