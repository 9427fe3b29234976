"""pdbench's HTTP measurements against a server that stamps every chunk it writes.

The ground-truth server (benchmarks/groundtruth_server.py: TTFT = 40 ms + 0.05 ms × prompt tokens,
then 15 ms per token) reports, per request, when it wrote each chunk after the request was in.
pdbench's client-side TTFT, TPOT, ITL and E2E must match those stamps: TTFT p50 within 1 ms,
the others within 1%, closed loop and Poisson, 200 tokens in, 64 out.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from actors.loadgen import LoadGenerator
from actors.target import TargetSpec
from analysis.records import measured, to_frame
from workloads.arrivals import ClosedLoop, Poisson
from workloads.lengths import Fixed
from workloads.requests import WorkloadSpec, synthetic_requests

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "groundtruth_server.py")], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().split()[1])
    yield TargetSpec(base_url=f"http://127.0.0.1:{port}", model="gt", vocab_size=1000)
    proc.terminate()
    proc.wait()


@pytest.mark.parametrize(
    "arrival,n,users", [(ClosedLoop(concurrency=4), 12, 4), (Poisson(rate=20.0), 40, 1)], ids=["closed-4-users", "poisson-20rps"]
)
def test_client_metrics_match_the_servers_own_stamps(ray_local, server, arrival, n, users):
    spec = WorkloadSpec(num_requests=n, warmup_requests=2, input_len=Fixed(value=200), output_len=Fixed(value=64), arrival=arrival)
    recs = ray.get(LoadGenerator.remote().run.remote(server, synthetic_requests(spec, 1000, seed=5), users))
    df = measured(to_frame(recs, cell_id="c"))
    assert df["ok"].all() and (df["output_tokens"] == 64).all()
    chunks = df["gt_chunk_s"].map(np.asarray)
    truth = {
        "ttft_s": df["gt_ttft_s"],
        "tpot_s": chunks.map(lambda c: (c[-1] - c[0]) / (len(c) - 1)),
        "e2e_s": df["gt_e2e_s"],
    }
    ours = {m: float(df[m].median()) for m in truth}
    theirs = {m: float(v.median()) for m, v in truth.items()}
    itl_ours = float(np.median(np.concatenate(df["itl_s"].map(np.asarray).to_list())))
    itl_theirs = float(np.median(np.concatenate(chunks.map(np.diff).to_list())))
    print({m: (round(ours[m] * 1e3, 3), round(theirs[m] * 1e3, 3)) for m in ours}, "itl", itl_ours * 1e3, itl_theirs * 1e3)
    print("client send p50 ms", float(df["client_send_s"].median()) * 1e3)
    assert ours["ttft_s"] == pytest.approx(theirs["ttft_s"], abs=0.001)
    assert ours["tpot_s"] == pytest.approx(theirs["tpot_s"], rel=0.01)
    assert ours["e2e_s"] == pytest.approx(theirs["e2e_s"], rel=0.01)
    assert itl_ours == pytest.approx(itl_theirs, rel=0.01)
    # The server followed its law (its stamps are the truth either way): first chunk at 40 + 10 ms.
    assert theirs["ttft_s"] == pytest.approx(0.050, abs=0.005)
