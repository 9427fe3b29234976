"""A cheap fingerprint of a model's weights: equal weights give equal digests.

Two engines of a disaggregated pair must hold the same weights for their KV to be
interchangeable; with seeded random weights that is a claim to check, not to assume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def weight_checksum(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each parameter's name and float64 sum, in name order."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(named_parameters, key=lambda kv: kv[0]):
            h.update(name.encode())
            h.update(repr(float(p.detach().double().sum().item())).encode())
    return h.hexdigest()
