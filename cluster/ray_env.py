"""Connecting to Ray (embedded or a cluster) and placing a cell's actors.

Without an address pdbench starts an embedded local Ray; with one (`auto` inside `ray job
submit`) it joins that cluster. Either way actors live in the `pdbench` namespace.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from analysis.errortext import first_line

NAMESPACE = "pdbench"


def object_store_options() -> dict[str, Any]:
    """An embedded Ray's object store as PDBENCH_OBJECT_STORE_GB asks: sized explicitly and mapped
    populated (RAY_preallocate_plasma_memory), so KV puts never land on cold pages (a first put of
    1.2 GB into fresh pages took 817 ms on an H200 host, 25 ms into warm ones) and a GPU receiver
    registers a store of known size with CUDA (seconds per 8 GiB, once). Ray's default, 30% of RAM,
    would be far larger than a KV transfer needs on a GPU host."""
    gb = os.environ.get("PDBENCH_OBJECT_STORE_GB")
    if not gb:
        return {}
    os.environ.setdefault("RAY_preallocate_plasma_memory", "1")
    return {"object_store_memory": int(float(gb) * 2**30)}


class EmbeddedRayError(RuntimeError):
    """The embedded Ray instance could not start on this machine."""


def connect(address: str | None) -> dict[str, Any]:
    """Start or join Ray once per process; return what the manifest records about it."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            # "local": always a fresh embedded instance, never a `ray start` cluster found on this box.
            try:
                ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, log_to_driver=False, **object_store_options())
            except Exception as e:  # raylet or GCS not up in time: Ray's own text, and the machine's state
                raise EmbeddedRayError(
                    f"the embedded Ray did not start: {first_line(str(e))} (load average {os.getloadavg()[0]:.1f} on "
                    f"{os.cpu_count()} cores; Ray's logs are under /tmp/ray/session_latest/logs); try again once the machine is less busy"
                ) from e
    return {
        "address": address or "embedded",
        "cluster_resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
        "nodes": [
            {
                "node_id": n["NodeID"],
                "alive": n["Alive"],
                "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")},
            }
            for n in ray.nodes()
        ],
    }


def check_fits(bundles: list[dict[str, float]], what: str, total: dict[str, float] | None = None) -> None:
    """Refuse before any engine starts if the cluster (its resources `total`, else read now) can
    never hold these bundles."""
    total = ray.cluster_resources() if total is None else total
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0) + v
    for k, v in need.items():
        if total.get(k, 0) < v:
            raise RuntimeError(f"{what}: a cell needs {v:g} {k} but the cluster has {total.get(k, 0):g}")


def make_placement_group(bundles: list[dict[str, float]], strategy: str, name: str) -> PlacementGroup:
    return placement_group(bundles, strategy=strategy, name=name)


def in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def release(pg: PlacementGroup | None) -> None:
    if pg is not None:
        remove_placement_group(pg)


def on_each_node(fn: Any) -> list[Any]:
    """Run a zero-CPU task on every alive node (hardware fingerprints of a multi-node cluster)."""
    remote = ray.remote(num_cpus=0)(fn)
    refs = [
        remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in ray.nodes()
        if n["Alive"]
    ]
    return ray.get(refs, timeout=120)


def actor_on_each_node(actor_cls: Any, *args: Any) -> list[Any]:
    """One instance of a (zero-CPU) actor class pinned to every alive node."""
    return [
        actor_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
        for n in ray.nodes()
        if n["Alive"]
    ]
