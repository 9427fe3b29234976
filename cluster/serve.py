"""`pdbench serve`: pdbench's engines behind OpenAI-compatible `/v1/completions` and
`/v1/chat/completions` (Ray Serve).

External clients (`vllm bench serve`, aiperf, GuideLLM, curl) then drive the very engines pdbench
benchmarks. Each Serve replica starts its own entry for the chosen serving mode and streams its
`generate(request)` deltas as SSE chunks: an aggregated replica holds the engine in its own process
(EngineHost), a disaggregated one starts a prefill/decode pair that fate-shares with it. Clients
reach a replica through Serve's proxy (`--port`) or, under direct ingress, at its own port. Both
listen on 127.0.0.1 unless told otherwise: the endpoint has no authentication.
"""

import asyncio
import ipaddress
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from actors.backends import ActorBackend
from actors.engine_actor import EngineHost, actor_name
from actors.engines.models import model_path_problem
from actors.engines.spec import EngineConfig
from actors.handoffs import check_backend
from actors.handoffs.spec import KVHandoffConfig
from actors.metrics import cell_tags
from actors.openai_api import (
    ApiError,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    check_supported,
    max_new_tokens,
    prompt_ids,
    sse,
)
from cluster.config import ConfigError, PlacementSpec, _format, _merge

ENGINE_START_TIMEOUT_S = 900.0
LOOPBACK = "127.0.0.1"


class ServeSpec(BaseModel):
    """What `pdbench serve` deploys (the `engine:` and `placement:` sections of a config file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["aggregated", "disaggregated"] = "aggregated"
    engine: EngineConfig = EngineConfig()
    placement: PlacementSpec = PlacementSpec()
    kv_transfer: KVHandoffConfig = Field(default_factory=KVHandoffConfig, description="disaggregated mode: how KV moves")
    served_model_name: str | None = Field(default=None, description="the `model` clients send; default engine.model")
    tokenizer: str | None = Field(default=None, description="Hugging Face tokenizer (folder or hub name) for text prompts")
    app_name: str = Field(default="pdbench", pattern=r"^[A-Za-z0-9_-]+$")
    replicas: int = Field(default=1, ge=1, description="data-parallel replicas, each with its own engine")
    route_prefix: str = Field(default="/", pattern=r"^/", description="URL path the app is served under")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model

    def gpus_per_engine(self) -> int:
        if self.placement.gpus_per_engine is not None:
            return self.placement.gpus_per_engine
        return 1 if self.engine.kind == "vllm" or self.engine.device == "cuda" else 0


# Sections of an experiment config that mean nothing to a server: one file can serve both.
_EXPERIMENT_ONLY = ("track", "seed", "workload", "slo", "params", "max_concurrent_cells", "request_timeout_s", "target")


def serve_spec(file_data: dict[str, Any], overrides: dict[str, Any]) -> ServeSpec:
    """Config file ← CLI flags, validated; errors name the field."""
    data = _merge({k: v for k, v in file_data.items() if k not in _EXPERIMENT_ONLY}, overrides)
    try:
        spec = ServeSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, ServeSpec)) from None
    if spec.engine.kind == "simulated":
        # A client benchmarking this endpoint cannot see a stamp: it would measure a simulation as real.
        raise ConfigError("invalid config:\n  engine.kind: pdbench serve runs real engines only (reference or vllm), not 'simulated'")
    problem = model_path_problem(spec.engine.model)
    if problem:
        raise ConfigError(f"invalid config:\n  engine.model: {problem}")
    if spec.mode == "disaggregated":
        try:
            check_backend(spec.kv_transfer.backend, spec.engine.kind)
        except ValueError as e:
            raise ConfigError(f"invalid config:\n  {e}") from None
    return spec


# --- entries per serving mode --------------------------------------------------------------
@dataclass
class Entry:
    """A started serving mode: its request stream (`generate(request)` deltas), its engine info,
    the actors it owns, and how to stop what runs in the replica itself."""

    stream: Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]
    info: dict[str, Any]
    owned: list[Any]
    # Called now and then while serving (e.g. to hand over records an actor would otherwise keep).
    housekeeping: Callable[[], Awaitable[Any]] | None = None
    close: Callable[[], Awaitable[None]] | None = None


async def _aggregated_entry(spec: ServeSpec, run: str, cell: str) -> Entry:
    """The engine inside the replica's own process, as `vllm serve` runs it beside its HTTP server:
    a request reaches it without a Ray hop (3-4 ms of time to first token each on 2 CPU cores,
    benchmarks/serve_overhead.py). The replica holds the engine's GPUs (replica_options)."""
    host = EngineHost(spec.engine.model_dump(mode="json"))
    host.tags = cell_tags(run, cell, "engine")
    info = await asyncio.wait_for(host.start(), ENGINE_START_TIMEOUT_S)
    return Entry(stream=host.generate, info=info, owned=[], close=host.shutdown)


async def _disaggregated_entry(spec: ServeSpec, run: str, cell: str) -> Entry:
    """Prefill and decode actors, KV moved by `kv_transfer.backend`; the decode actor is the entry.

    No placement group: each engine takes its own GPU (or CPUs) wherever Ray finds one, so
    prefill and decode may share a node or not, as the cluster has room.
    """
    from actors.disaggregated import launch_pair, start_pair

    opts = {"num_cpus": spec.placement.cpus_per_engine, "num_gpus": spec.gpus_per_engine()}
    owned: list[Any] = []
    try:
        pair = launch_pair(
            spec.engine,
            spec.kv_transfer,
            run,
            cell,
            lambda role: actor_name(run, cell, role),
            lambda role: {} if role == "kvdir" else opts,
            owned,
        )
        _, d_info = await start_pair(pair, ENGINE_START_TIMEOUT_S)
    except BaseException:
        for a in owned:
            ray.kill(a)
        raise
    # The decode actor keeps one transfer record per request for a cell to collect; a server
    # has no cell end, so they are handed over and dropped (the Ray metrics keep the story).
    return Entry(
        stream=ActorBackend(pair.decode).stream,
        info=d_info,
        owned=[pair.decode, pair.prefill, pair.directory],
        housekeeping=pair.decode.transfers.remote,
    )


SERVE_ENTRIES: dict[str, Callable[[ServeSpec, str, str], Awaitable[Entry]]] = {
    "aggregated": _aggregated_entry,
    "disaggregated": _disaggregated_entry,
}
HOUSEKEEPING_EVERY_S = 30.0


# --- the HTTP app --------------------------------------------------------------------------
api = FastAPI(title="pdbench OpenAI-compatible endpoint", docs_url=None, redoc_url=None)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    err = ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param)
    return JSONResponse(err.body(), status_code=400)


async def _events(deltas: AsyncIterator[dict[str, Any]], writer: ChunkWriter, usage: bool) -> AsyncIterator[str]:
    async for d in deltas:
        if d["finished"] and d["error"]:
            yield sse(ApiError(500, f"engine error: {d['error']}", None, "engine_error").body())
            break
        if d["token_ids"] or d["finished"]:
            yield sse(writer.chunk(d["token_ids"], d["finished"], d["server"] if d["finished"] else None))
    if usage:
        yield sse(writer.usage_chunk())
    yield sse("[DONE]")


# Serve runs a replica's code on a second event loop in its own thread by default, so each ASGI
# message of a streamed response crosses threads on its way out: 0.9-1.5 ms of the first chunk
# on CPU (benchmarks/serve_overhead.py). Nothing here blocks its loop for long (the engine runs in
# its own actor; a 1024-word prompt encodes in under 1 ms), so the replica's own loop runs it.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def replica_options(spec: ServeSpec, job_env: dict[str, Any]) -> dict[str, Any]:
    """The replica's actor options: an aggregated replica holds its engine, so it takes the engine's
    CPUs and GPUs (a disaggregated one only relays to its decode actor); the runtime env is the job's
    plus REPLICA_ENV (Serve gives a deployment that names its own runtime env only the job's
    working_dir, so the rest is carried over here)."""
    env = {**job_env, "env_vars": {**job_env.get("env_vars", {}), **REPLICA_ENV}}
    if spec.mode == "aggregated":
        return {"num_cpus": spec.placement.cpus_per_engine, "num_gpus": spec.gpus_per_engine(), "runtime_env": env}
    return {"num_cpus": 0, "runtime_env": env}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Completions:
    async def __init__(self, spec: dict[str, Any]):  # type: ignore[misc]  # Serve awaits an async __init__
        self.spec = ServeSpec.model_validate(spec)
        replica = serve.get_replica_context().replica_id.unique_id
        self.entry = await SERVE_ENTRIES[self.spec.mode](self.spec, f"serve-{self.spec.app_name}", replica)
        self.vocab_size = int(self.entry.info["vocab_size"])
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep()) if self.entry.housekeeping else None
        self.created = int(time.time())
        self.tokenizer = None
        if self.spec.tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.spec.tokenizer)

    async def _housekeep(self) -> None:
        housekeeping = self.entry.housekeeping
        assert housekeeping is not None  # started only for entries that have it
        while True:
            await asyncio.sleep(HOUSEKEEPING_EVERY_S)
            await housekeeping()

    async def __del__(self) -> None:
        # Serve's shutdown hook: free the engines' GPUs now rather than when the owner is reaped.
        entry = getattr(self, "entry", None)
        for actor in getattr(entry, "owned", []):
            ray.kill(actor)
        if entry is not None and entry.close is not None:
            await entry.close()

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        card = {
            "id": self.spec.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "pdbench",
            "max_model_len": self.spec.engine.max_model_len,
            "vocab_size": self.vocab_size,
            "serving_mode": self.spec.mode,
            "engine": self.spec.engine.kind,
        }
        return {"object": "list", "data": [card]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        return await self._generate(body)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        return await self._generate(body)

    async def _generate(self, body: CompletionRequest | ChatCompletionRequest) -> Any:
        try:
            if body.model != self.spec.model_name:
                raise ApiError(
                    404, f"model {body.model!r} is not served here; this server serves {self.spec.model_name!r}", "model", "model_not_found"
                )
            check_supported(body)
            max_len = self.spec.engine.max_model_len
            ids = prompt_ids(body, self.tokenizer, self.vocab_size, max_len, self.spec.model_name)
            n_out = max_new_tokens(body, len(ids), max_len)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        rid = uuid.uuid4().hex
        writer = ChunkWriter(rid, self.spec.model_name, len(ids), self.tokenizer, chat=isinstance(body, ChatCompletionRequest))
        deltas = self.entry.stream({"request_id": rid, "prompt_token_ids": ids, "max_tokens": n_out})
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(deltas, writer, usage), media_type="text/event-stream")
        out: list[int] = []
        server = None
        async for d in deltas:
            out += d["token_ids"]
            if d["finished"]:
                if d["error"]:
                    err = ApiError(500, f"engine error: {d['error']}", None, "engine_error")
                    return JSONResponse(err.body(), status_code=500)
                server = d["server"]
        return writer.whole(out, server)


# --- deploying -----------------------------------------------------------------------------
def check_listen(host: str, port: int, here: bool) -> None:
    """Refuse, in one line naming the flag, an address the HTTP proxy could never listen on.
    `here`: the proxy runs on this machine (embedded Ray), so the port can be tried too."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port: {port} is not a TCP port; give one from 1 to 65535 (default 8000)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host: {host!r} is not an address or a host name that resolves here ({e}); e.g. 127.0.0.1") from None
    if not here:
        return
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(
                f"--host/--port: cannot listen on {host}:{port} ({e.strerror or e}); pick a free port or an address of this machine"
            ) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


DIRECT_INGRESS_DRAIN_S = 1.0


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment for a Ray that `pdbench serve` starts itself: Serve's direct ingress, where each
    ingress replica runs its own HTTP server (ports from port + 1 up) next to the proxy on `port`.
    A request to a replica's own port skips the proxy's hop: ~5 ms of time to first token on 2 CPU
    cores; what is left is 0.4 ms over a bare uvicorn server (benchmarks/serve_overhead.py). Serve reads
    these variables when its controller and replicas start, so they must be in Ray's environment
    before Ray starts (on a cluster: in ray_cluster.yaml's `ray start` commands).

    A replica that stops keeps its port open for a minimum draining period (Serve's default 30 s) so
    that a load balancer in front can take it out of rotation; the Ray started here has none, so
    Ctrl-C waits DIRECT_INGRESS_DRAIN_S instead. Requests in flight still get Serve's graceful-shutdown
    timeout (20 s by default; the 30 s drain had also raised it to 35 s) to finish."""
    first = port + 1
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(min(first + 999, 65535)),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DIRECT_INGRESS_DRAIN_S),
    }


def replica_urls(spec: ServeSpec, host: str, proxy_port: int) -> list[str]:
    """Each replica's own HTTP address under direct ingress ([] where Serve runs without it: then
    only the proxy serves). Read from the controller's target groups, the list Serve itself keeps
    for load balancers (no public call returns it in Ray 2.60)."""
    client = serve.context._get_global_client()
    assert client is not None  # deploy() started Serve
    try:
        groups = ray.get(client._controller.get_target_groups.remote(spec.app_name), timeout=30)
    except Exception as e:  # a private call: another Ray version may lack it
        raise RuntimeError(f"Serve's controller did not list the replicas' ports ({type(e).__name__}: {e})") from e
    ports = sorted({t.port for g in groups if g.protocol == "HTTP" for t in g.targets} - {proxy_port})
    shown = f"[{host}]" if ":" in host else host
    return [f"http://{shown}:{p}{spec.route_prefix.rstrip('/')}" for p in ports]


def deploy(spec: ServeSpec, host: str = LOOPBACK, port: int = 8000) -> str:
    """Start Serve's HTTP proxy on host:port and run the app; return its base URL.

    Ray must already be connected (cluster.ray_env.connect). Serve keeps the HTTP options it was
    first started with on a cluster, so a conflicting host or port is refused, not ignored.
    """
    serve.start(http_options={"host": host, "port": port})
    # serve.start only logs when Serve already runs with other options; no public API reads them.
    client = serve.context._get_global_client()
    assert client is not None  # serve.start just made it
    actual = client.http_config
    if (actual.host, actual.port) != (host, port):
        raise RuntimeError(
            f"--host/--port: Serve already runs on this cluster at {actual.host}:{actual.port}; "
            f"shut it down (`serve shutdown`) or pass --host {actual.host} --port {actual.port}"
        )
    options = replica_options(spec, dict(ray.get_runtime_context().runtime_env))
    deployment = Completions.options(num_replicas=spec.replicas, ray_actor_options=options)  # type: ignore[attr-defined]  # a Serve deployment
    app = deployment.bind(spec.model_dump(mode="json"))
    serve.run(app, name=spec.app_name, route_prefix=spec.route_prefix, blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{spec.route_prefix.rstrip('/')}"


def undeploy(spec: ServeSpec) -> None:
    serve.delete(spec.app_name)
