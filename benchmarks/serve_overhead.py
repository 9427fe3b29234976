"""Where `pdbench serve`'s time to first chunk goes: the same engine reached through each hop, side by side.

One engine law whose own latency is known and tiny (the simulated engine: 1 ms prefill, 5 ms decode
steps; stamped `simulated` below, and only the difference between layers is read from it) sits
behind six layers, each started once and driven at concurrency 1, request by request in rotation
so background load hits each alike:

- `actor`: the engine actor's streaming `generate`, called from this process through Ray
- `handle`: a Serve deployment holding the engine in its replica as `pdbench serve`'s aggregated
  replica does, called through a Serve deployment handle (no HTTP, no ASGI)
- `http-serve`: `pdbench serve`'s own app (cluster/serve.py) over HTTP through Serve's proxy
- `http-direct`: the same app at its replica's own port (Serve's direct ingress, as `pdbench
  serve` starts it: cluster/serve.py direct_ingress_env), no proxy hop
- `http-serve-thread`: the same app with Serve's default replica threading (user code on a second
  event loop in its own thread), which `pdbench serve` turns off (cluster/serve.py REPLICA_ENV)
- `http-plain`: the same request handling (openai_api checks, ChunkWriter, SSE framing) in a bare
  uvicorn + FastAPI process with the engine in-process: no Ray at all

HTTP layers are driven by pdbench's own client (actors/openai_client.py, token-id prompts). Per
request the overhead is the time to first token seen by the client minus the engine's own (queue +
prefill, from its server timing). Also timed in this process: the word tokenizer encoding a 1024-word
prompt (what a text client such as `vllm bench serve` makes the server do) and one first SSE chunk
(ChunkWriter + framing, detokenising with that tokenizer).

    python benchmarks/serve_overhead.py [--requests 30] [--prompt-tokens 1024] [--output-tokens 4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from actors.openai_api import CompletionRequest  # at module level: FastAPI resolves the route's body annotation here

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODEL = "tiny-qwen3"
VOCAB = 2048
LAW = {"prefill_fixed_s": 0.001, "prefill_s_per_token": 0.0, "decode_fixed_s": 0.005, "decode_s_per_seq": 0.0}
LAYERS = ("http-plain", "actor", "handle", "http-serve", "http-direct", "http-serve-thread")


def engine_config() -> Any:
    from actors.engines.spec import EngineConfig

    return EngineConfig.model_validate({"kind": "simulated", "model": MODEL, "max_model_len": 2048, "simulated": LAW})


# --- http-plain: the serving path without Ray -------------------------------------------------
def plain_app(tokenizer_dir: str) -> Any:
    """`pdbench serve`'s streaming completion path (cluster/serve.py Completions._generate) with the
    engine in this process: what an HTTP server costs when no Ray hop stands between it and the engine."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoTokenizer

    from actors.engines import EngineRequest, build_engine
    from actors.openai_api import ChunkWriter, check_supported, max_new_tokens, prompt_ids
    from cluster.serve import _events

    cfg = engine_config()
    engine = build_engine(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    async def deltas(req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        async for d in engine.generate(req):
            yield {"token_ids": d.token_ids, "finished": d.finished, "error": d.error, "server": d.server}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        check_supported(body)
        ids = prompt_ids(body, tokenizer, VOCAB, cfg.max_model_len, MODEL)
        n_out = max_new_tokens(body, len(ids), cfg.max_model_len)
        writer = ChunkWriter("plain", MODEL, len(ids), tokenizer)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(deltas(EngineRequest("plain", ids, n_out)), writer, usage)
        return StreamingResponse(events, media_type="text/event-stream")

    return app


def serve_plain(tokenizer_dir: str) -> None:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"port {port}", flush=True)
    uvicorn.run(plain_app(tokenizer_dir), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- handle: Serve without HTTP -----------------------------------------------------------------
def handle_deployment() -> Any:
    from ray import serve

    from cluster.serve import SERVE_ENTRIES, ServeSpec

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    class HandleEntry:
        """A replica holding its entry (the engine itself), as cluster/serve.py's Completions does, minus ASGI."""

        async def __init__(self, spec: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
            s = ServeSpec.model_validate(spec)
            replica = serve.get_replica_context().replica_id.unique_id
            self.entry = await SERVE_ENTRIES[s.mode](s, f"serve-{s.app_name}", replica)

        async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            async for d in self.entry.stream(request):
                yield d

    return HandleEntry


# --- driving ----------------------------------------------------------------------------------
async def first_token(stream: AsyncIterator[dict[str, Any]], t0: Callable[[], float | None]) -> tuple[float, float]:
    """(client TTFT, engine's own queue + prefill) of one request."""
    first = None
    server: dict[str, Any] = {}
    async for d in stream:
        if d.get("token_ids") and first is None:
            first = d.get("t_recv") or time.monotonic()
        if d.get("finished"):
            if d.get("error"):
                raise RuntimeError(f"request failed: {d['error']}")
            server = d.get("server") or {}
    sent = t0()  # read after the stream: a client stamps its send time as the request leaves
    assert first is not None and sent is not None
    return first - sent, server["server_queue_s"] + server["prefill_s"]


async def stamped(items: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Deltas stamped on arrival here (a replica's stream carries the stamps of the replica's own read)."""
    async for d in items:
        yield {**d, "t_recv": time.monotonic()}


async def measure(args: argparse.Namespace, tokenizer_dir: str, plain_port: int, http_port: int) -> dict[str, dict[str, list[float]]]:
    import ray
    from ray import serve

    from actors.backends import ActorBackend, Exchange
    from actors.engine_actor import EngineActor
    from actors.openai_client import OpenAIBackend
    from actors.target import TargetSpec
    from cluster.serve import Completions, ServeSpec, deploy, replica_urls

    cfg = engine_config()
    spec = ServeSpec(engine=cfg, tokenizer=tokenizer_dir, app_name="overhead")
    serve_url = await asyncio.to_thread(deploy, spec, "127.0.0.1", http_port)
    handle = serve.run(
        handle_deployment().bind(spec.model_copy(update={"app_name": "overhead-handle"}).model_dump(mode="json")),
        name="overhead-handle",
        route_prefix=None,
    )
    threaded = Completions.options(ray_actor_options={"num_cpus": 0})  # type: ignore[attr-defined]  # ray deployment class; Serve's default threading
    thread_spec = spec.model_copy(update={"app_name": "overhead-thread", "route_prefix": "/thread"})
    serve.run(threaded.bind(thread_spec.model_dump(mode="json")), name=thread_spec.app_name, route_prefix=thread_spec.route_prefix)
    actor = EngineActor.options(num_cpus=0).remote(cfg.model_dump(mode="json"))  # type: ignore[attr-defined]
    await actor.start.remote()
    await wait_ready(serve_url)
    (direct_url,) = replica_urls(spec, "127.0.0.1", http_port)

    clients = {
        "http-plain": OpenAIBackend(TargetSpec(base_url=f"http://127.0.0.1:{plain_port}", model=MODEL, vocab_size=VOCAB)),
        "http-serve": OpenAIBackend(TargetSpec(base_url=serve_url, model=MODEL, vocab_size=VOCAB)),
        "http-direct": OpenAIBackend(TargetSpec(base_url=direct_url, model=MODEL, vocab_size=VOCAB)),
        "http-serve-thread": OpenAIBackend(TargetSpec(base_url=f"{serve_url}/thread", model=MODEL, vocab_size=VOCAB)),
    }
    backend = ActorBackend(actor)
    stream_handle = handle.options(stream=True)
    rng = random.Random(0)

    async def one(layer: str, request: dict[str, Any]) -> tuple[float, float]:
        if layer == "actor":
            t = time.monotonic()
            return await first_token(backend.stream(request), lambda: t)
        if layer == "handle":
            t = time.monotonic()
            return await first_token(stamped(stream_handle.generate.remote(request)), lambda: t)  # type: ignore[arg-type]  # a streaming handle's generator
        ex = Exchange()
        return await first_token(clients[layer].stream(request, ex), lambda: ex.t_sent)

    out: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "engine": []} for name in LAYERS}
    layers = list(LAYERS)
    for i in range(args.warmup + args.requests):
        request = {
            "request_id": f"r{i}",
            "prompt_token_ids": [rng.randrange(VOCAB) for _ in range(args.prompt_tokens)],
            "max_tokens": args.output_tokens,
        }
        layers = layers[1:] + layers[:1]  # rotate: no layer always runs right after another
        for layer in layers:
            ttft, engine = await one(layer, {**request, "request_id": f"{layer}-{i}"})
            if i >= args.warmup:
                out[layer]["ttft"].append(ttft)
                out[layer]["engine"].append(engine)
    for c in clients.values():
        await c.aclose()
    ray.kill(actor)
    return out


async def wait_ready(url: str) -> None:
    import httpx

    async with httpx.AsyncClient() as c:
        for _ in range(600):
            try:
                if (await c.get(f"{url}/health", timeout=5)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} never answered /health")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- in-process costs -------------------------------------------------------------------------
def local_costs(tokenizer_dir: str, prompt_words: int, repeat: int) -> dict[str, float]:
    """ms per call, median of `repeat`: encoding a text prompt, and building + framing a first chunk."""
    from transformers import AutoTokenizer

    from actors.openai_api import ChunkWriter, sse

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = " ".join(f"t{random.randrange(VOCAB)}" for _ in range(prompt_words))

    def chunk() -> str:
        return sse(ChunkWriter("x", MODEL, prompt_words, tok).chunk([7], False))

    def med(fn: Callable[[], Any]) -> float:
        return float(np.median(timeit.repeat(fn, number=1, repeat=repeat))) * 1e3

    return {"tokenize_ms": med(lambda: tok.encode(text, add_special_tokens=False)), "first_chunk_ms": med(chunk)}


def layer_rows(out: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for name in LAYERS:
        ttft = np.array(out[name]["ttft"]) * 1e3
        over = ttft - np.array(out[name]["engine"]) * 1e3
        rows.append(
            {
                "layer": name,
                "requests": len(ttft),
                "ttft_p50_ms": float(np.percentile(ttft, 50)),
                "ttft_p90_ms": float(np.percentile(ttft, 90)),
                "overhead_p50_ms": float(np.percentile(over, 50)),
                "overhead_p90_ms": float(np.percentile(over, 90)),
            }
        )
    return rows


def hops(rows: list[dict[str, Any]]) -> dict[str, float]:
    """What each hop adds: differences of overhead p50 between layers."""
    by = {r["layer"]: r["overhead_p50_ms"] for r in rows}
    return {
        "ray actor hop (actor)": by["actor"],
        "serve handle + router to the replica holding the engine (handle)": by["handle"],
        "serve proxy + ASGI in replica (http-serve - handle)": by["http-serve"] - by["handle"],
        "the proxy's hop (http-serve - http-direct)": by["http-serve"] - by["http-direct"],
        "pdbench serve direct over a plain server (http-direct - http-plain)": by["http-direct"] - by["http-plain"],
        "all of serve over a plain server (http-serve - http-plain)": by["http-serve"] - by["http-plain"],
        "serve's default replica thread (http-serve-thread - http-serve)": by["http-serve-thread"] - by["http-serve"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=30, help="timed requests per layer")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per layer first")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plain-server", metavar="TOKENIZER_DIR", help=argparse.SUPPRESS)  # the http-plain subprocess
    args = p.parse_args()
    if args.plain_server:
        serve_plain(args.plain_server)
        return 0

    import ray
    from ray import serve

    from cluster.serve import direct_ingress_env
    from workloads.word_tokenizer import save_word_tokenizer

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tok = str(save_word_tokenizer(Path(tmp) / "words", vocab_size=VOCAB))
        plain = subprocess.Popen([sys.executable, __file__, "--plain-server", tok], stdout=subprocess.PIPE, text=True)
        try:
            assert plain.stdout is not None
            plain_port = int(plain.stdout.readline().split()[1])
            http_port = free_port()
            os.environ.update(direct_ingress_env(http_port))  # before Ray starts, as `pdbench serve` does
            ray.init(address="local", num_cpus=8, namespace="pdbench", include_dashboard=False, log_to_driver=False)
            try:
                asyncio.run(wait_ready(f"http://127.0.0.1:{plain_port}"))
                out = asyncio.run(measure(args, tok, plain_port, http_port))
            finally:
                serve.shutdown()
                ray.shutdown()
        finally:
            plain.terminate()
            plain.wait()
        costs = local_costs(tok, args.prompt_tokens, 50)
    rows = layer_rows(out)
    over = {r["layer"]: r["overhead_p50_ms"] for r in rows}
    result = {
        "evidence": "simulated engine (known 1 ms prefill): only the differences between layers are measurements",
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "rows": rows,
        "hops_ms": hops(rows),
        "serve_overhead_ratio_to_default_thread": over["http-serve"] / over["http-serve-thread"],
        "in_process_ms": costs,
        "load_avg_1m": os.getloadavg()[0],
        "wall_s": time.monotonic() - t_start,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"engine: {result['evidence']}; prompt {args.prompt_tokens} tokens, concurrency 1, load avg {result['load_avg_1m']:.1f}")
    print(f"{'layer':>17} {'n':>4} {'TTFT p50 ms':>12} {'p90':>7} {'overhead p50 ms':>16} {'p90':>7}")
    for r in rows:
        print(
            f"{r['layer']:>17} {r['requests']:>4} {r['ttft_p50_ms']:>12.2f} {r['ttft_p90_ms']:>7.2f} "
            f"{r['overhead_p50_ms']:>16.2f} {r['overhead_p90_ms']:>7.2f}"
        )
    print("added ms per hop (overhead p50 differences):")
    for k, v in result["hops_ms"].items():
        print(f"  {k:<66} {v:>7.2f}")
    ratio = result["serve_overhead_ratio_to_default_thread"]
    print(f"pdbench serve overhead / the same app on Serve's default replica thread: {ratio:.2f}")
    tokenize, chunk = costs["tokenize_ms"], costs["first_chunk_ms"]
    print(f"in this process: tokenize {args.prompt_tokens} words {tokenize:.2f} ms, first SSE chunk {chunk:.3f} ms")
    print(f"wall {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
