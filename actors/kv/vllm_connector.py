"""`RayObjectStoreConnector`: a vLLM (0.26, V1) KV connector that moves KV blocks through the Ray
object store with pdbench's own transport and accounting (actors/kv/transport.py).

Plugged in without patching vLLM (actors/handoffs/vllm_object_store.py builds this):
    kv_transfer_config = {"kv_connector": "RayObjectStoreConnector",
                          "kv_connector_module_path": "actors.kv.vllm_connector",
                          "kv_role": "kv_both",
                          "kv_connector_extra_config": {"directory": ..., "ray_address": ..., ...}}

One class serves both engines; each request says what it wants in its `kv_transfer_params`:
- producer (prefill engine, max_tokens=1): {"pdbench_role": "producer", "key": K}. After the step
  that completes the prompt (chunked prompts: the last chunk's step), a worker thread gathers the
  prompt's whole blocks from every layer and publishes them under K (device→host, ray.put per
  layer group, directory), group by group. With `kv_transfer.save: layerwise` the gather runs
  during that step's forward pass instead, layer by layer from `save_kv_layer`, and each group
  leaves once its last layer is written (actors/kv/layerwise.py). vLLM keeps the blocks
  (request_finished → True) until the gather is done, reported through `finished_sending`.
- consumer (decode engine): {"pdbench_role": "consumer", "key": K}. The scheduler reports those
  blocks as externally computed and loading asynchronously: the request waits in vLLM's
  WAITING_FOR_REMOTE_KVS while a worker thread receives K into its blocks, following the sender
  group by group, and the engine keeps stepping the other requests. `finished_recving` releases
  it. A failed receive marks its blocks invalid in the same pass; under kv_load_failure_policy
  "fail" vLLM ends the request, and the decode actor runs it again as a fresh request
  (actors/handoffs/vllm_object_store.py: vLLM 0.26's own recompute gives wrong tokens, vllm#49250).

The decisions live in actors/kv/blocks.py (scheduler side) and actors/kv/jobs.py (worker side),
both vLLM-free and tested on CPU against a fake scheduler that enforces vLLM's rules; this class
only adapts vLLM's hooks to them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole

from actors.kv.blocks import StepPlan, TransferBook, block_dim
from actors.kv.layerwise import layerwise_producer

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("pdbench.vllm_connector")


class RayObjectStoreMetadata(KVConnectorMetadata, StepPlan):
    """The step plan, as the metadata type vLLM passes from scheduler to worker."""


class RayObjectStoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.book = TransferBook(vllm_config.cache_config.block_size)
        self.worker: Any = None
        self._layer_index: dict[str, int] = {}

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise saves run Python after each attention layer, which a full CUDA graph's
        replay would skip: vLLM then keeps the producer's graphs piecewise."""
        return layerwise_producer(extra_config)

    # ---------------------------------------------------------------- scheduler side
    @staticmethod
    def _p(request: Request) -> dict[str, Any]:
        return request.kv_transfer_params or {}

    def on_new_request(self, request: Request) -> None:
        self.book.new_request(request.request_id, self._p(request), len(request.prompt_token_ids or []))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        n = self.book.matched_tokens(request.request_id, self._p(request), len(request.prompt_token_ids or []), num_computed_tokens)
        return n, n > 0  # loaded asynchronously: the request waits, the engine steps on

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.book.allocated(
            request.request_id, self._p(request), len(request.prompt_token_ids or []), blocks.get_block_ids()[0], num_external_tokens
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        n = scheduler_output.num_scheduled_tokens
        new = [(r.req_id, list(r.block_ids[0]), r.num_computed_tokens, n[r.req_id]) for r in scheduler_output.scheduled_new_reqs]
        c = scheduler_output.scheduled_cached_reqs
        cached = [
            (rid, list(c.new_block_ids[i][0]) if c.new_block_ids[i] else None, c.num_computed_tokens[i], n.get(rid, 0))
            for i, rid in enumerate(c.req_ids)
        ]
        plan = self.book.plan(new, cached, resumed=set(c.resumed_req_ids))
        return RayObjectStoreMetadata(saves=plan.saves, loads=plan.loads, cancels=plan.cancels, drops=plan.drops)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.book.worker_finished(connector_output.finished_sending or (), connector_output.finished_recving or ())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.book.finished(request.request_id), None

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        import ray

        from actors.kv import plasma, putter
        from actors.kv.directory import NAMESPACE, find_directory
        from actors.kv.jobs import ConnectorWorker
        from actors.kv.rdt import start_tensor_transport
        from actors.kv.spec import KVTransferConfig

        # Layers come in model order; both engines of a pair build the same model.
        caches = list(kv_caches.values())
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config is not None else None
        dim = block_dim(tuple(caches[0].shape), num_blocks)
        # vLLM's worker runs in a process of its own, outside Ray: it joins the cluster itself, once,
        # here at start-up, so no step ever waits for it.
        if not ray.is_initialized():
            ray.init(address=self.extra["ray_address"], namespace=NAMESPACE, log_to_driver=False)
        cfg = KVTransferConfig.model_validate(self.extra.get("kv_transfer", {}))
        # With a tensor transport the KV never enters the object store's memory: nothing to register or fault in.
        tensor_transport = self.extra.get("tensor_transport")
        registers = self.extra.get("receiver", False) and cfg.host_to_device == "registered" and caches[0].is_cuda and not tensor_transport
        store: dict[str, Any] = {}
        if tensor_transport:
            start_tensor_transport(tensor_transport)
            store = {"tensor_transport": tensor_transport}
        elif registers:  # once per process, before the first request (seconds for a large store)
            reg = plasma.registered()
            store = {"registered_s": reg.seconds if reg else None, "registration_error": plasma.registration_error()}
        elif not self.extra.get("receiver", False):  # the sender's puts must not fault pages in
            store = {"prefault_s": plasma.prefault()}
            if cfg.put_process:  # nor its putter's (started now rather than by the first save)
                store["putter_prefault_s"] = putter.client(cfg.put_threads).prefault()
        self.worker = ConnectorWorker(
            cfg,
            find_directory(self.extra["directory"]),
            run_id=self.extra.get("run_id", ""),
            cell_id=self.extra.get("cell_id", ""),
            engine=self.extra.get("engine_label", ""),
            kv_bytes_per_token=self.extra.get("kv_bytes_per_token"),
            registration=plasma.registered if registers else (lambda: None),
            store=store,
            tensor_transport=tensor_transport,
        )
        self.worker.register(caches, dim)
        log.info("pdbench connector: %d KV layers %s, blocks on dim %d", len(caches), tuple(caches[0].shape), dim)

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StepPlan)
        return meta

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_loads(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # whole-prompt loads, finished before vLLM schedules the request

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        index = self._layer_index.get(layer_name)
        if index is not None:  # save: layerwise gathers the layer now; after_forward waits for wait_for_save
            self.worker.layer_saved(index)

    def wait_for_save(self) -> None:
        self.worker.start_saves(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.load_errors()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
