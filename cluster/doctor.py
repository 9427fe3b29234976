"""`pdbench doctor`: what this machine has, and which engines can run here."""

from __future__ import annotations

import importlib.util
from typing import Any

from cluster.manifest import gpus, versions


def report() -> dict[str, Any]:
    v = versions()
    g = gpus()
    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        pass
    has_vllm = importlib.util.find_spec("vllm") is not None
    engines = {
        "reference": "yes (CPU" + (" and CUDA" if cuda else "") + ")",
        "simulated": "yes, with --simulate (pipeline debugging only; stamped simulated)",
        "vllm": "yes"
        if (has_vllm and cuda)
        else "no: " + ("vllm not installed (pip install -e '.[vllm]')" if not has_vllm else "no CUDA GPU visible to torch"),
    }
    return {"versions": v, "gpus": g, "torch_cuda": cuda, "engines": engines}
