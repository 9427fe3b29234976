"""Methods mixed into vLLM's GPU worker (`worker_extension_cls`), reached by `collective_rpc`.

They read what vLLM's own memory profiler measured at start-up (gpu_worker.py,
`determine_available_memory`) and NVML, so E5 decomposes memory with vLLM's numbers rather than
guesses; and a weight checksum, to prove two dummy-weight engines hold the same weights.
"""

from __future__ import annotations

from typing import Any

import torch


class PdbenchWorkerExtension:
    def pdbench_memory(self) -> dict[str, Any]:
        mr = self.model_runner  # type: ignore[attr-defined]
        kv_tensors = getattr(mr, "kv_caches", None) or []
        seen: set[int] = set()
        kv_bytes = 0
        for t in kv_tensors:  # layers may share storage; count each allocation once
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                kv_bytes += t.untyped_storage().nbytes()
        dev = self.device  # type: ignore[attr-defined]
        free, total = torch.cuda.mem_get_info(dev)
        out: dict[str, Any] = {
            "device": str(dev),
            "weights_bytes": int(mr.model_memory_usage),
            "activation_peak_bytes": int(getattr(self, "peak_activation_memory", 0)),
            "non_torch_bytes": int(getattr(self, "non_torch_memory", 0)),
            "cudagraph_bytes": int(getattr(self, "cudagraph_memory_estimate", 0)),
            "kv_cache_budget_bytes": int(getattr(self, "available_kv_cache_memory_bytes", 0)),
            "kv_cache_bytes": int(kv_bytes),
            "num_gpu_blocks": self.cache_config.num_gpu_blocks,  # type: ignore[attr-defined]
            "block_size": self.cache_config.block_size,  # type: ignore[attr-defined]
            "torch_allocated_bytes": int(torch.cuda.memory_allocated(dev)),
            "torch_reserved_bytes": int(torch.cuda.memory_reserved(dev)),
            "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(dev)),
            "device_total_bytes": int(total),
            "device_used_bytes": int(total - free),
        }
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(torch.cuda.current_device()))
            info = pynvml.nvmlDeviceGetMemoryInfo(h)
            out["nvml_used_bytes"] = int(info.used)
            out["nvml_total_bytes"] = int(info.total)
            pynvml.nvmlShutdown()
        except Exception as e:  # NVML is a cross-check, not a requirement
            out["nvml_error"] = repr(e)
        return out

    def pdbench_weight_checksum(self) -> str:
        from actors.engines.checksum import weight_checksum

        return weight_checksum(self.model_runner.model.named_parameters())  # type: ignore[attr-defined]


def _physical_index(logical: int) -> int:
    """NVML counts physical GPUs; CUDA_VISIBLE_DEVICES renumbers them inside the actor."""
    import os

    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v for v in vis.split(",") if v.strip()]
    if ids and ids[logical].strip().isdigit():
        return int(ids[logical])
    return logical
