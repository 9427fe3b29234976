"""Before anything starts on the GPU node: does everything the runs import, import?

A missing module otherwise shows up minutes into a lease, deep in a Ray worker's log or as a
server that never answers. This imports each module the runs need in turn (Ray Serve and its
proxy, vLLM's engine and its CLI's `serve` and `bench serve` paths, pdbench's own packages), then
asks the `vllm` CLI for `serve --help` and `bench serve --help` (which build their full argument
parsers), and prints one line per failure with the missing module named.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass

MODULES = (
    # Ray Serve: the API, its controller and HTTP proxy (uvicorn, starlette), the dashboard's
    # optional dependencies (Ray starts its agents in minimal mode only if these fail cleanly).
    "ray",
    "ray.serve",
    "ray.serve._private.controller",
    "ray.serve._private.proxy",
    "ray.dashboard.optional_deps",
    # vLLM: the engine pdbench embeds, and what `vllm serve` / `vllm bench serve` import.
    "vllm",
    "vllm.v1.engine.async_llm",
    "vllm.entrypoints.cli.main",
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.cli.benchmark.main",
    "vllm.entrypoints.openai.api_server",
    "vllm.benchmarks.serve",
    "vllm.benchmarks.datasets",
    # NIXL, for the nixl-vllm KV backend: vLLM's NixlConnector and the nixl API it loads ...
    "nixl._api",
    "vllm.distributed.kv_transfer.kv_connector.v1.nixl",
    # ... and for the ray-rdt-nixl backend: Ray Direct Transport's NIXL transport.
    "ray.experimental.rdt.nixl_tensor_transport",
    # pdbench
    "cluster.cli",
    "cluster.serve",
    "cluster.gpu_suite",
    "actors.engine_actor",
    "actors.engines.vllm_engine",
    "actors.loadgen",
    "actors.openai_client",
    "analysis.report",
    "workloads.word_tokenizer",
)
CLI_CALLS = (("serve", "--help"), ("bench", "serve", "--help"))


@dataclass(frozen=True)
class Result:
    what: str
    ok: bool
    seconds: float
    detail: str = ""


def import_one(name: str) -> Result:
    t0 = time.monotonic()
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        return Result(name, False, time.monotonic() - t0, f"missing module {e.name!r}")
    except Exception as e:  # an import that fails any other way is just as fatal there
        return Result(name, False, time.monotonic() - t0, f"{type(e).__name__}: {e}"[:300])
    return Result(name, True, time.monotonic() - t0)


def cli_call(args: tuple[str, ...], timeout_s: float = 180.0) -> Result:
    t0 = time.monotonic()
    what = "vllm " + " ".join(args)
    try:
        p = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", *args], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Result(what, False, time.monotonic() - t0, f"no answer in {timeout_s:.0f} s")
    tail = (p.stderr.strip().splitlines() or [""])[-1]
    return Result(what, p.returncode == 0, time.monotonic() - t0, "" if p.returncode == 0 else f"exit {p.returncode}: {tail[:300]}")


def run_checks(modules: tuple[str, ...] = MODULES, cli: bool = True) -> list[Result]:
    # vLLM 0.26 imports FlashInfer for its sampler unless told not to; FlashInfer is not carried.
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    results = [import_one(m) for m in modules]
    if cli and all(r.ok for r in results if r.what.startswith("vllm")):
        results += [cli_call(a) for a in CLI_CALLS]
    return results


def report(results: list[Result]) -> str:
    lines = [f"{'ok  ' if r.ok else 'FAIL'} {r.what:45s} {r.seconds:6.1f} s  {r.detail}".rstrip() for r in results]
    bad = [r for r in results if not r.ok]
    missing = f"; missing or broken: {', '.join(r.what for r in bad)}" if bad else ""
    lines.append(f"gpu-kit check: {len(results) - len(bad)}/{len(results)} ok{missing}")
    return "\n".join(lines)
