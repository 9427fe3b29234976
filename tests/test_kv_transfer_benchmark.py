"""benchmarks/kv_transfer.py runs end to end (smallest size) and says what it did not measure."""

import subprocess
import sys
from pathlib import Path

import torch


def test_benchmark_prints_ratios_side_by_side():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "kv_transfer.py"), "--max-mib", "1", "--repeats", "1", "--put-process"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["MiB", "raw", "GB/s"])
    row = lines[header + 1].split()
    assert float(row[0]) == 1.0 and len(row) == 13  # size, raw, store, ratio, path, ratio, raw-shm, store/shm, five stage times
    assert all(float(x) > 0 for x in row[1:8])
    store, raw_shm, store_over_shm = float(row[2]), float(row[6]), float(row[7])
    assert abs(store_over_shm - store / raw_shm) <= 0.02 + 0.02 * store_over_shm  # the printed ratio is of the printed rates
    assert "goal store/raw ≥ 0.7 from 64 MiB: no size that large was run" in proc.stdout
    ratios = next(i for i, line in enumerate(lines) if line.split()[:2] == ["MiB", "put_s"])
    row = lines[ratios + 1].split()  # the same size sent through the putter: put, store and path ratios
    assert float(row[0]) == 1.0 and len(row) == 4 and all(float(x) > 0 for x in row[1:])
    if not torch.cuda.is_available():
        assert "no CUDA GPU visible to torch: device→host and host→device stages not measured" in proc.stdout
    else:
        assert "GPU stages on" in proc.stdout
