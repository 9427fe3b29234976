"""`RayObjectStoreConnector`: a vLLM (0.26, V1) KV connector that moves KV blocks through the Ray
object store with pdbench's own transport and accounting (actors/kv/transport.py).

Plugged in without patching vLLM (actors/vllm_disaggregated.py builds this):
    kv_transfer_config = {"kv_connector": "RayObjectStoreConnector",
                          "kv_connector_module_path": "actors.kv.vllm_connector",
                          "kv_role": "kv_both",
                          "kv_connector_extra_config": {"directory": ..., "ray_address": ..., ...}}

One class serves both engines; each request says what it wants in its `kv_transfer_params`:
- producer (prefill engine, max_tokens=1): {"pdbench_role": "producer", "key": K}. After the step
  that completes the prompt (chunked prompts: the last chunk's step), the worker gathers the
  prompt's whole blocks from every layer and publishes them under K (device→host, ray.put per
  layer group, directory).
- consumer (decode engine): {"pdbench_role": "consumer", "key": K}. The scheduler reports those
  blocks as externally computed; the worker receives K into them before the forward pass and
  hands its transfer record to the directory. A failed receive marks the blocks invalid; under
  kv_load_failure_policy "fail" vLLM ends the request, and the decode actor runs it again as a
  fresh request (actors/vllm_disaggregated.py: vLLM 0.26's own recompute of a failed synchronous
  load gives wrong tokens, vllm-project/vllm#49250).

Loads and saves are synchronous, inside the step: simple and exact, at the price of stalling the
step's other requests while a transfer runs (the accounting shows it). The decisions live in
actors/kv/blocks.py (vLLM-free, tested on CPU); this class only adapts vLLM's hooks to them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

from actors.kv.blocks import BlockInjector, StepPlan, Transfer, TransferBook, block_dim, gather_blocks

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("pdbench.vllm_connector")


class RayObjectStoreMetadata(KVConnectorMetadata, StepPlan):
    """The step plan, as the metadata type vLLM passes from scheduler to worker."""


class RayObjectStoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.book = TransferBook(vllm_config.cache_config.block_size)
        self._caches: list[torch.Tensor] = []
        self._dim = 0
        self._directory: Any = None
        self._failed_blocks: set[int] = set()

    # ---------------------------------------------------------------- scheduler side
    @staticmethod
    def _p(request: "Request") -> dict[str, Any]:
        return request.kv_transfer_params or {}

    def on_new_request(self, request: "Request") -> None:
        self.book.new_request(request.request_id, self._p(request), len(request.prompt_token_ids or []))

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        n = self.book.matched_tokens(request.request_id, self._p(request), len(request.prompt_token_ids or []), num_computed_tokens)
        return n, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        self.book.allocated(
            request.request_id, self._p(request), len(request.prompt_token_ids or []), blocks.get_block_ids()[0], num_external_tokens
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        n = scheduler_output.num_scheduled_tokens
        new = [(r.req_id, list(r.block_ids[0]), r.num_computed_tokens, n[r.req_id]) for r in scheduler_output.scheduled_new_reqs]
        c = scheduler_output.scheduled_cached_reqs
        cached = [
            (rid, list(c.new_block_ids[i][0]) if c.new_block_ids[i] else None, c.num_computed_tokens[i], n.get(rid, 0))
            for i, rid in enumerate(c.req_ids)
        ]
        plan = self.book.plan(new, cached)
        return RayObjectStoreMetadata(saves=plan.saves, loads=plan.loads)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.book.finished(request.request_id)
        return False, None

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # Layers come in model order; both engines of a pair build the same model.
        self._caches = list(kv_caches.values())
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config is not None else None
        self._dim = block_dim(tuple(self._caches[0].shape), num_blocks)
        log.info("pdbench connector: %d KV layers %s, blocks on dim %d", len(self._caches), tuple(self._caches[0].shape), self._dim)

    def _dir(self) -> Any:
        if self._directory is None:
            import ray

            from actors.kv.directory import NAMESPACE, find_directory

            if not ray.is_initialized():
                ray.init(address=self.extra["ray_address"], namespace=NAMESPACE, log_to_driver=False)
            self._directory = find_directory(self.extra["directory"])
        return self._directory

    def _kv_cfg(self):
        from actors.kv.spec import KVTransferConfig

        return KVTransferConfig.model_validate(self.extra.get("kv_transfer", {}))

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StepPlan)
        return meta

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        for t in self._plan().loads:
            self._load(t)

    def _load(self, t: Transfer) -> None:
        import ray

        from actors.kv.transport import receive

        cfg = self._kv_cfg()
        rec = receive(
            self._dir(),
            t.key,
            BlockInjector(self._caches, t.block_ids, self._dim, cfg.host_copy_threads),
            cfg,
            run_id=self.extra.get("run_id", ""),
            cell_id=self.extra.get("cell_id", ""),
            request_id=t.key.split("/")[0],
            kv_bytes_per_token=self.extra.get("kv_bytes_per_token"),
        )
        if not rec.ok:
            self._failed_blocks.update(t.block_ids)
        ray.get(self._dir().report.remote(t.key, rec.row()))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks are saved after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        for t in self._plan().saves:
            self._save(t)

    def _save(self, t: Transfer) -> None:
        import ray

        from actors.kv.transport import publish, reason_of

        d = self._dir()
        try:
            layers = gather_blocks(self._caches, t.block_ids, self._dim)
            publish(d, t.key, layers, t.tokens, self._kv_cfg(), run_id=self.extra.get("run_id", ""), cell_id=self.extra.get("cell_id", ""))
        except Exception as e:  # the decode side learns why at once and recomputes
            ray.get(d.fail.remote(t.key, reason_of(e)))

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed
