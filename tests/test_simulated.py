"""--simulate: only on request, and stamped everywhere."""

import json

import pandas as pd
import yaml
from typer.testing import CliRunner

from cluster.cli import app


def test_simulate_stamps_every_artifact(ray_local, tmp_path):
    res = CliRunner().invoke(app, ["run", "e0", "--simulate", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code == 0, res.output
    run_dir = next(tmp_path.iterdir())
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["evidence"] == "simulated" and m["engine"] == "simulated"
    assert json.loads((run_dir / "summary.json").read_text())["evidence"] == "simulated"
    assert (pd.read_parquet(run_dir / "requests.parquet")["engine"] == "simulated").all()
    assert "SIMULATED RUN" in (run_dir / "report.md").read_text()
    assert "SIMULATED RUN" in (run_dir / "report.html").read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["engine"]["kind"] == "simulated"


def test_simulated_engine_refused_without_flag(tmp_path):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("engine: {kind: simulated}\n")
    res = CliRunner().invoke(app, ["run", "e0", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "engine.kind" in res.output and "--simulate" in res.output
    assert not (tmp_path / "o").exists()


def test_engine_and_simulate_exclude_each_other(tmp_path):
    res = CliRunner().invoke(app, ["run", "e0", "--simulate", "--engine", "reference", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "exclude" in res.output


def test_simulated_engine_has_no_kv_to_move():
    """Disaggregation moves KV: the simulated model has none, and says so instead of an AttributeError."""
    import asyncio

    import pytest

    from actors.engines import EngineConfig, build_engine

    engine = build_engine(EngineConfig(kind="simulated"))

    async def check() -> None:
        await engine.start()
        try:
            with pytest.raises(TypeError, match="no KV to move"):
                engine.import_kv(4, 8)
        finally:
            await engine.shutdown()

    asyncio.run(check())
