"""Every track's quick profile, as a user runs it: `pdbench run eN` on a fresh embedded Ray."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("track", ["e1", "e2", "e4", "e5", "e6"])
def test_quick_profile_runs_and_writes_its_packet(track, tmp_path):
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", track, "--no-progress", "-o", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    for name in ("manifest.json", "config.yaml", "requests.parquet", "summary.json", "report.md", "report.html"):
        assert (run_dir / name).is_file(), name
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and m["evidence"] == "real", m["cells"]
    assert json.loads((run_dir / "summary.json").read_text())["verdicts"], "the track's analysis ran"
    print(f"{track}: {time.monotonic() - t0:.0f} s")
