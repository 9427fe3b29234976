"""Track E3 with SPREAD on a two-node Ray cluster (ray.cluster_utils.Cluster), in its own process.

tests/test_disagg_multinode.py runs this file as a subprocess: the test session already holds an
embedded Ray (one ray.init per process), and a Cluster needs a fresh one. Each node carries a
custom resource naming it, so the caller can tell which node held the prefill side and which the
decode side. Prints one JSON line: the run folder and the nodes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
from ray.cluster_utils import Cluster

from cluster.config import resolve
from cluster.driver import Driver, RunOptions

STORE = 200 * 1024 * 1024


def main(out_dir: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"pd_node_a": 1}, "object_store_memory": STORE, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, resources={"pd_node_b": 1}, object_store_memory=STORE)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, namespace="pdbench", log_to_driver=False)
        cfg = resolve(
            "e3",
            {
                "workload": {
                    "num_requests": 6,
                    "warmup_requests": 1,
                    "input_len": {"kind": "uniform", "low": 200, "high": 800},
                    "output_len": {"kind": "fixed", "value": 6},
                    "arrival": {"kind": "closed", "concurrency": 2},
                },
                "placement": {"strategy": "SPREAD"},
            },
        )
        run_dir = Driver(cfg, RunOptions(out_dir=out_dir, address=cluster.address, progress=False)).run()
        nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("pd_node_")) for n in ray.nodes() if n["Alive"]}
        print(json.dumps({"run_dir": str(run_dir), "nodes": nodes}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
