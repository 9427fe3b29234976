"""The OpenAI-compatible endpoint on Ray Serve, driven by pdbench's own HTTP backend."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.config import resolve

MODEL = "tiny-qwen3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_hosts(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def non_loopback_ip() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


@pytest.fixture(scope="module")
def served(ray_local):
    from ray import serve

    from cluster.serve import deploy, serve_spec

    port = free_port()
    spec = serve_spec({}, {"app_name": "pdbench-test", "engine": {"max_model_len": 256}})
    url = deploy(spec, "127.0.0.1", port)
    yield url, port
    serve.shutdown()


def _post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=60)


def test_endpoint_bound_to_loopback_only(served):
    url, port = served
    assert url == f"http://127.0.0.1:{port}"
    assert listening_hosts(port) == {"127.0.0.1"}
    ip = non_loopback_ip()
    if ip is not None:  # the machine's own non-loopback address must not reach it
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{ip}:{port}/health", timeout=5)


def test_models_card_and_refusals(served):
    url, _ = served
    card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == MODEL and card["vocab_size"] == 2048 and card["max_model_len"] == 256

    r = _post(url, prompt="hello world", max_tokens=4)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prompt" and "tokenizer" in err["message"] and "token ids" in err["message"]

    r = _post(url, prompt=[1, 2, 3], max_tokens=4, temperature=0.7)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = _post(url, prompt=[1, 5000], max_tokens=4)
    assert r.status_code == 400 and "2048" in r.json()["error"]["message"]
    r = _post(url, prompt=[1, 2], max_tokens=300)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = _post(url, prompt=[1, 2], max_tokens=0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": [1], "max_tokens": 2}, timeout=30)
    assert r.status_code == 404


def test_stream_and_whole_agree(served):
    url, _ = served
    whole = _post(url, prompt=[3, 1, 4, 1, 5], max_tokens=6).json()
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == 6 and whole["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert whole["choices"][0]["text"] == "".join(f" {i}" for i in ids)
    streamed, events = [], []
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": [3, 1, 4, 1, 5], "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]

    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    for c in chunks:
        for ch in c["choices"]:
            streamed += ch["token_ids"]
    assert streamed == ids
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"]][-1] == "length"


@pytest.fixture(scope="module")
def served_tok(served, tmp_path_factory):
    """A second app on the same port with the offline word tokenizer: text prompts and chat work."""
    from ray import serve

    from cluster.serve import deploy, serve_spec
    from workloads.word_tokenizer import save_word_tokenizer

    _, port = served
    tok = save_word_tokenizer(tmp_path_factory.mktemp("words"), vocab_size=2048)
    spec = serve_spec({}, {"app_name": "pdbench-test-tok", "route_prefix": "/tok", "tokenizer": str(tok), "engine": {"max_model_len": 256}})
    yield deploy(spec, "127.0.0.1", port)
    serve.delete(spec.app_name)


def _sse(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_max_completion_tokens_is_honoured_over_http(served):
    url, _ = served
    r = _post(url, prompt=[1, 2, 3], max_completion_tokens=3)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3
    r = _post(url, prompt=[1, 2, 3], max_tokens=3, max_completion_tokens=4)
    assert r.status_code == 400
    assert "max_tokens (3)" in r.json()["error"]["message"] and "max_completion_tokens (4)" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_vllm_bench_default_request_with_text(served_tok):
    """`vllm bench serve`'s default (--backend openai → /v1/completions), body as vLLM 0.26 builds it."""
    body = {
        "model": MODEL,
        "prompt": "t10 t20 t30 t40",
        "repetition_penalty": 1.0,
        "max_tokens": 5,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = _sse(served_tok, "/v1/completions", body)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    ids = [i for c in chunks for ch in c["choices"] for i in ch["token_ids"]]
    assert len(ids) == 5 and "".join(texts) == " ".join(f"t{i}" for i in ids)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    # The same prompt as token ids gives the same greedy tokens: the tokenizer is exact.
    as_ids = _post(served_tok, prompt=[10, 20, 30, 40], max_tokens=5).json()["choices"][0]
    assert as_ids["token_ids"] == ids and as_ids["text"] == "".join(texts)


def test_chat_streaming_and_whole_agree(served_tok):
    msgs = [{"role": "user", "content": "t10 t20 t30 t40"}]
    # vllm bench serve --backend openai-chat, and aiperf --streaming (chat is aiperf's default endpoint)
    chunks = _sse(
        served_tok,
        "/v1/chat/completions",
        {"model": MODEL, "messages": msgs, "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True}},
    )
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert chunks[0]["object"] == "chat.completion.chunk" and deltas[0]["role"] == "assistant" and deltas[0]["content"]
    streamed = "".join(d["content"] for d in deltas)
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    # aiperf's default request: not streamed
    r = httpx.post(
        f"{served_tok}/v1/chat/completions",
        json={"messages": msgs, "model": MODEL, "stream": False, "max_completion_tokens": 5},
        timeout=60,
    )
    whole = r.json()
    assert r.status_code == 200 and whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": streamed} and whole["choices"][0]["finish_reason"] == "length"
    assert len(streamed.split()) == 5 and whole["usage"]["completion_tokens"] == 5
    # Refusals name the field over HTTP too.
    r = httpx.post(f"{served_tok}/v1/chat/completions", json={"messages": msgs, "model": MODEL, "n": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(f"{served_tok}/v1/chat/completions", json={"model": MODEL}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_models_listing_as_clients_read_it(served_tok):
    """`vllm bench serve` without --model takes data[0].id; the OpenAI client's Model needs id, object, created, owned_by."""
    listing = httpx.get(f"{served_tok}/v1/models", timeout=30).json()
    assert listing["object"] == "list"
    card = listing["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"] == "pdbench"


def test_http_backend_drives_the_endpoint_with_greedy_tokens_and_timestamps(served, tmp_path):
    """A whole track through pdbench's HTTP backend; tokens equal the engine's own greedy tokens."""
    import ray

    from actors.engine_actor import EngineActor
    from analysis.packet import load_packet
    from cluster.driver import Driver, RunOptions
    from workloads.requests import synthetic_requests

    url, _ = served
    cfg = resolve(
        "e0",
        {
            "workload": {
                "num_requests": 6,
                "warmup_requests": 1,
                "input_len": {"kind": "uniform", "low": 8, "high": 32},
                "output_len": {"kind": "fixed", "value": 8},
                "arrival": {"kind": "closed", "concurrency": 3},
            },
            "target": {"base_url": url, "model": MODEL, "vocab_size": 2048},
        },
    )
    run_dir = Driver(cfg, RunOptions(out_dir=tmp_path)).run()
    p = load_packet(run_dir)
    assert p.manifest["status"] == "complete" and p.manifest["engine"] == "external"
    assert p.manifest["target"]["base_url"] == url
    df = p.requests
    assert set(df["serving_mode"]) == {"external"} and df["ok"].all()
    # Latency medians of 5 requests are noise; the token check across repeats is not.
    checks = {c["check"]: c["ok"] for c in p.summary["verdicts"]["checks"]}
    assert checks["greedy token ids identical request by request"], p.summary["verdicts"]

    # The oracle: the same prompts straight into an engine actor (no HTTP, no Serve).
    engine = EngineActor.remote({"max_model_len": 256})
    try:
        ray.get(engine.start.remote())
        reqs = synthetic_requests(cfg.workload, 2048, cfg.seed)

        async def direct(spec):
            out = []
            gen = engine.generate.options(num_returns="streaming").remote(
                {"request_id": spec.request_id, "prompt_token_ids": spec.prompt_token_ids, "max_tokens": spec.max_tokens}
            )
            async for ref in gen:
                out += (await ref)["token_ids"]
            return out

        async def all_direct():
            return await asyncio.gather(*(direct(s) for s in reqs))

        expected = dict(zip([s.request_id for s in reqs], asyncio.run(all_direct()), strict=True))
    finally:
        ray.kill(engine)
    for row in df.itertuples():
        assert list(row.output_token_ids) == expected[row.request_id], row.request_id
        # Client timestamps, one process's clock: sent ≤ first ≤ last, one ITL per gap between
        # messages (tokens that arrive in one message share it: docs/metrics.md).
        assert row.t_sent <= row.t_first_token <= row.t_last_token
        assert row.ttft_s > 0 and row.output_tokens == 8 and 1 <= len(row.itl_s) <= 7
        assert row.ttft_s <= row.e2e_s
        # The endpoint's server_timing extension carries the engine-side breakdown.
        assert row.prefill_s > 0 and row.server_queue_s >= 0


def test_disaggregated_endpoint_streams_the_aggregated_tokens(served):
    """Prefill and decode actors behind the same API, on the same port under another prefix."""
    from ray import serve

    from cluster.serve import deploy, serve_spec

    url, port = served
    spec = serve_spec({}, {"mode": "disaggregated", "app_name": "pdbench-test-pd", "route_prefix": "/pd", "engine": {"max_model_len": 256}})
    pd_url = deploy(spec, "127.0.0.1", port)
    try:
        assert pd_url == f"{url}/pd"
        assert httpx.get(f"{pd_url}/v1/models", timeout=30).json()["data"][0]["serving_mode"] == "disaggregated"
        for prompt in ([3, 1, 4, 1, 5], list(range(40, 70))):
            agg = _post(url, prompt=prompt, max_tokens=6).json()
            pd = _post(pd_url, prompt=prompt, max_tokens=6).json()
            assert pd["choices"][0]["token_ids"] == agg["choices"][0]["token_ids"]
            timing = pd["server_timing"]
            assert timing["kv_transfer_ok"] is True and timing["transfer_s"] > 0
    finally:
        serve.delete(spec.app_name)


def test_cli_serve_defaults_to_loopback(tmp_path):
    """`pdbench serve` as a user runs it: embedded Ray, default host, Ctrl-C stops it. The replica
    also answers on its own port (Serve's direct ingress, port + 1): same tokens, loopback only."""
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--name", "pdbench-cli"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()  # printed once the app is deployed and serving
        assert url == f"http://127.0.0.1:{port}", proc.communicate()[1][-3000:] if proc.poll() is not None else url
        direct = proc.stdout.readline().strip()
        assert direct == f"http://127.0.0.1:{port + 1}"
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        assert listening_hosts(port) == {"127.0.0.1"} and listening_hosts(port + 1) == {"127.0.0.1"}
        tokens = []
        for base in (url, direct):
            r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": [7, 8, 9], "max_tokens": 3}, timeout=60)
            tokens.append(r.json()["choices"][0]["token_ids"])
        assert len(tokens[0]) == 3 and tokens[0] == tokens[1]
    finally:
        proc.send_signal(signal.SIGINT)
        t_int = time.monotonic()
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        stop_s = time.monotonic() - t_int
    assert proc.returncode == 0, err[-3000:]
    assert "stopped" in err
    # No load balancer stands in front of the Ray started here: Ctrl-C does not sit out Serve's 30 s
    # direct-ingress drain (cluster/serve.py direct_ingress_env), only a short one.
    assert stop_s < 20, f"Ctrl-C took {stop_s:.1f} s"


@pytest.mark.parametrize(
    "track,why", [("e3", "compares serving modes"), ("e5", "sets the engine per cell"), ("e6", "sets the engine per cell")]
)
def test_target_is_refused_where_the_track_needs_our_engines(track, why):
    from cluster.config import ConfigError
    from cluster.planning import plan_cells

    with pytest.raises(ConfigError, match=why):
        plan_cells(resolve(track, {"target": {"base_url": "http://127.0.0.1:9", "model": MODEL, "vocab_size": 2048}}))


def test_target_cells_drive_the_server_in_every_round():
    from cluster.planning import plan_cells

    plans = plan_cells(resolve("e2", {"target": {"base_url": "http://127.0.0.1:9", "model": MODEL, "vocab_size": 2048}}))
    assert plans and {p.serving_mode for p in plans} == {"external"}


def test_serve_refuses_a_simulated_engine():
    import pytest as _pytest

    from cluster.config import ConfigError
    from cluster.serve import serve_spec

    with _pytest.raises(ConfigError, match=r"engine.kind: pdbench serve runs real engines only"):
        serve_spec({"engine": {"kind": "simulated"}}, {})


def test_replica_runs_its_code_on_the_replica_loop(served):
    """Serve's default second loop in its own thread adds a cross-thread hop to every streamed ASGI
    message (benchmarks/serve_overhead.py); the replica process must start without it."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    names = [a["name"] for a in actors if a["name"].startswith("SERVE_REPLICA::pdbench-test#Completions#")]
    assert names, "no replica of the served app found"
    replica = ray.get_actor(names[0], namespace="serve")

    def separate_thread(_: object) -> bool:
        from ray.serve._private import constants

        return constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD

    assert ray.get(replica.__ray_call__.remote(separate_thread), timeout=60) is False


def test_replica_options_keep_the_job_runtime_env():
    from cluster.serve import REPLICA_ENV, replica_options, serve_spec

    spec = serve_spec({}, {})
    job = {"pip": ["x==1"], "working_dir": "/w", "env_vars": {"A": "1"}}
    opts = replica_options(spec, job)
    assert opts["runtime_env"] == {"pip": ["x==1"], "working_dir": "/w", "env_vars": {"A": "1", **REPLICA_ENV}}
    assert replica_options(spec, {})["runtime_env"] == {"env_vars": REPLICA_ENV}


def test_an_aggregated_replica_takes_its_engines_resources_a_disaggregated_one_none():
    from cluster.serve import replica_options, serve_spec

    agg = serve_spec({}, {"engine": {"kind": "vllm", "model": "qwen3-8b"}, "placement": {"cpus_per_engine": 2}})
    assert (replica_options(agg, {})["num_cpus"], replica_options(agg, {})["num_gpus"]) == (2, 1)
    pd = serve_spec({}, {"mode": "disaggregated", "engine": {"kind": "vllm", "model": "qwen3-8b"}})
    assert replica_options(pd, {})["num_cpus"] == 0 and "num_gpus" not in replica_options(pd, {})


def test_the_aggregated_engine_runs_in_the_replica_without_an_engine_actor(served):
    """No Ray hop between the HTTP handler and the engine: no engine actor exists for the app, and
    the replica's process serves (the endpoint answers, the engine is the replica's own)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert any(n.startswith("SERVE_REPLICA::pdbench-test#Completions#") for n in names)
    assert not [n for n in names if n.startswith("pdbench:serve-pdbench-test:")], names
    r = _post(served[0], prompt=[1, 2, 3], max_tokens=2)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_replica_urls_say_why_when_serve_cannot_list_them(monkeypatch):
    from cluster import serve as srv

    class Controller:
        class get_target_groups:
            @staticmethod
            def remote(_):
                raise AttributeError("no get_target_groups in this Ray")

    monkeypatch.setattr(srv.serve.context, "_get_global_client", lambda: type("C", (), {"_controller": Controller})())
    with pytest.raises(RuntimeError, match=r"did not list the replicas' ports .*no get_target_groups"):
        srv.replica_urls(srv.serve_spec({}, {}), "127.0.0.1", 8000)
