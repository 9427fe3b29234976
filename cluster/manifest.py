"""Run manifest facts: code versions and a hardware fingerprint.

Nothing from the environment is copied wholesale: only named facts, so no token or key that a
user exported can end up in a packet.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("ray", "torch", "transformers", "vllm", "pandas", "pyarrow", "plotly", "pydantic", "nvidia-ml-py")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            v[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            v[p] = None
    v["pdbench"] = metadata.version("pdbench") if _installed("pdbench") else None
    v["pdbench_git_sha"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    v["pdbench_git_dirty"] = None if status is None else bool(status)
    if os.environ.get("PDBENCH_GIT_SHA"):
        # A copy of the tree shipped to a GPU box: the shipper says which commit it was, and the
        # manifest says that it was told rather than it looked. The shipper wins over a .git in
        # the copy, which may have travelled stale (seen: HEAD of an older checkout, "dirty").
        if v["pdbench_git_sha"] not in (None, os.environ["PDBENCH_GIT_SHA"]):
            v["pdbench_git_seen"] = {"sha": v["pdbench_git_sha"], "dirty": v["pdbench_git_dirty"]}
        v["pdbench_git_sha"] = os.environ["PDBENCH_GIT_SHA"]
        v["pdbench_git_dirty"] = os.environ.get("PDBENCH_GIT_DIRTY", "unknown") == "1"
        v["pdbench_git_source"] = "PDBENCH_GIT_SHA"
    try:
        import torch

        v["cuda"] = torch.version.cuda
    except ImportError:
        v["cuda"] = None
    return v


def pdbench_version() -> str:
    """The package version, and the commit where the code is a git checkout."""
    v = metadata.version("pdbench") if _installed("pdbench") else "unknown"
    sha = _git("rev-parse", "--short=12", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return v + (f" (git {sha}{', modified' if dirty else ''})" if sha else "")


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> dict[str, Any]:
    """GPUs through NVML; an empty list (with the reason) where there is no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no driver, no library: a CPU machine
        return {"count": 0, "devices": [], "driver": None, "nvml_error": type(e).__name__}
    try:
        devs = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            devs.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                    "uuid": (lambda u: u.decode() if isinstance(u, bytes) else u)(pynvml.nvmlDeviceGetUUID(h)),
                }
            )
        drv = pynvml.nvmlSystemGetDriverVersion()
        return {"count": len(devs), "devices": devs, "driver": drv.decode() if isinstance(drv, bytes) else drv}
    finally:
        pynvml.nvmlShutdown()


def hardware() -> dict[str, Any]:
    """This node's fingerprint: CPU, memory, GPUs."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    g = gpus()
    cpu = {"model": _cpu_model(), "logical_cores": os.cpu_count(), "memory_bytes": mem, "arch": platform.machine()}
    if g["count"]:
        names = sorted({d["name"] for d in g["devices"]})
        summary = f"{g['count']}× {', '.join(names)} (driver {g['driver']}); {cpu['logical_cores']} CPU cores"
    else:
        summary = f"no GPU; {cpu['logical_cores']}× {cpu['model']}, {round((mem or 0) / 2**30)} GiB"
    return {"hostname": platform.node(), "cpu": cpu, "gpu": g, "summary": summary, "os": platform.platform()}
