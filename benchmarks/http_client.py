"""HTTP streaming clients side by side against the ground-truth server: each client's own overhead.

The server (benchmarks/groundtruth_server.py, a subprocess on loopback) stamps every chunk and
reports the stamps in its last chunk, so per request a client's overhead is its own TTFT minus the
server's (request in → first chunk written) and likewise for E2E: what the client adds on top of
loopback, the server's read and its own parsing. Candidates, alternating round by round so noise
hits each alike:

- `pdbench`: actors/openai_client.py as shipped (h11 over an asyncio Protocol that stamps each
  read in `data_received`)
- `aiohttp`: aiohttp, stamped when its `iter_any` read returns
- `httpx-sse`: httpx + httpx-sse, pdbench's client before (stamped per parsed event)
- `raw`: asyncio streams with a minimal HTTP/1.1 + chunked + SSE reader (stamped per read)

Prints overhead p50/p99 per client and concurrency, the client process's CPU time per request
(steadier than latency on a shared box), and each TTFT overhead as a ratio to pdbench's; the goal
is pdbench's overhead below 1 ms per request at 64 streams.

    python benchmarks/http_client.py [--streams 4 64] [--requests-per-stream 3] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
from httpx_sse import aconnect_sse

from actors.backends import Exchange
from actors.openai_client import OpenAIBackend, completion_body, sse_events
from actors.target import TargetSpec

ROOT = Path(__file__).resolve().parents[1]
PROMPT, OUT = 200, 64


def start_server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "groundtruth_server.py")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None  # stdout=PIPE
    line = proc.stdout.readline().split()
    return proc, int(line[1])


class HttpxSse:
    """pdbench's earlier client, kept here as the baseline."""

    def __init__(self, target: TargetSpec):
        self.target = target
        self.client = httpx.AsyncClient(
            base_url=target.base_url,
            timeout=httpx.Timeout(None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def stream(self, request: dict[str, Any], ex: Exchange) -> AsyncIterator[dict[str, Any]]:
        body = completion_body(self.target, request)
        ex.t_sent = time.monotonic()
        server = None
        async with aconnect_sse(self.client, "POST", "/v1/completions", json=body) as source:
            async for event in source.aiter_sse():
                t = time.monotonic()
                if event.data.strip() == "[DONE]":
                    break
                chunk = json.loads(event.data)
                server = chunk.get("server_timing") or server
                for choice in chunk.get("choices") or []:
                    if choice.get("token_ids"):
                        yield {"token_ids": choice["token_ids"], "t_recv": t, "finished": False}
        yield {"token_ids": [], "t_recv": time.monotonic(), "finished": True, "server": server}

    async def aclose(self) -> None:
        await self.client.aclose()


class Aiohttp:
    """aiohttp, stamped per `iter_any` read, the send stamped when its tracing says the headers went out."""

    def __init__(self, target: TargetSpec):
        self.target = target
        self.session: aiohttp.ClientSession | None = None

    async def stream(self, request: dict[str, Any], ex: Exchange) -> AsyncIterator[dict[str, Any]]:
        if self.session is None:
            sent = aiohttp.TraceConfig()
            sent.on_request_headers_sent.append(_headers_sent)
            self.session = aiohttp.ClientSession(trace_configs=[sent], connector=aiohttp.TCPConnector(limit=0))
        body = json.dumps(completion_body(self.target, request)).encode()
        server = None
        headers = {"Content-Type": "application/json"}
        async with self.session.post(f"{self.target.base_url}/v1/completions", data=body, headers=headers, trace_request_ctx=ex) as resp:
            buf = b""
            async for data in resp.content.iter_any():
                t = time.monotonic()
                events, buf = sse_events(buf + data)
                for event in events:
                    if event == "[DONE]":
                        continue
                    chunk = json.loads(event)
                    server = chunk.get("server_timing") or server
                    for choice in chunk.get("choices") or []:
                        if choice.get("token_ids"):
                            yield {"token_ids": choice["token_ids"], "t_recv": t, "finished": False}
        yield {"token_ids": [], "t_recv": time.monotonic(), "finished": True, "server": server}

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()


async def _headers_sent(session: Any, ctx: Any, params: Any) -> None:
    ctx.trace_request_ctx.t_sent = time.monotonic()


class RawStreams:
    """HTTP/1.1 over asyncio streams, one keep-alive connection per stream; chunked bodies only."""

    def __init__(self, target: TargetSpec):
        self.target = target
        host_port = target.base_url.split("//", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def stream(self, request: dict[str, Any], ex: Exchange) -> AsyncIterator[dict[str, Any]]:
        body = json.dumps(completion_body(self.target, request)).encode()
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        ex.t_sent = time.monotonic()
        writer.write(head.encode() + body)
        await reader.readuntil(b"\r\n\r\n")
        raw, buf, server, done = b"", b"", None, False
        while not done:
            data = await reader.read(65536)
            t = time.monotonic()
            raw += data
            while True:  # de-chunk what is complete
                size_end = raw.find(b"\r\n")
                if size_end < 0:
                    break
                size = int(raw[:size_end], 16)
                if len(raw) < size_end + 2 + size + 2:
                    break
                if size == 0:
                    done = True
                buf += raw[size_end + 2 : size_end + 2 + size]
                raw = raw[size_end + 4 + size :]
            events, buf = sse_events(buf)
            for event in events:
                if event == "[DONE]":
                    continue
                chunk = json.loads(event)
                server = chunk.get("server_timing") or server
                for choice in chunk.get("choices") or []:
                    if choice.get("token_ids"):
                        yield {"token_ids": choice["token_ids"], "t_recv": t, "finished": False}
        self.idle.append((reader, writer))
        yield {"token_ids": [], "t_recv": time.monotonic(), "finished": True, "server": server}

    async def aclose(self) -> None:
        for _, w in self.idle:
            w.close()


CLIENTS: dict[str, Callable[[TargetSpec], Any]] = {"pdbench": OpenAIBackend, "aiohttp": Aiohttp, "httpx-sse": HttpxSse, "raw": RawStreams}


async def measure(make: Callable[[TargetSpec], Any], target: TargetSpec, streams: int, per_stream: int) -> dict[str, list[float]]:
    client = make(target)
    over: dict[str, list[float]] = {"ttft": [], "e2e": [], "cpu": []}
    cpu0 = time.process_time()

    async def user(u: int) -> None:
        for i in range(per_stream + 1):  # the first request of each stream opens its connection: not counted
            ex = Exchange()
            first: float | None = None
            last: float | None = None
            server: dict[str, Any] | None = None
            req = {"request_id": f"{u}-{i}", "prompt_token_ids": [1] * PROMPT, "max_tokens": OUT}
            async for d in client.stream(req, ex):
                if d["token_ids"]:
                    first = first or d["t_recv"]
                    last = d["t_recv"]
                if d["finished"]:
                    server = d.get("server")
            if i and server and first is not None and last is not None and ex.t_sent is not None:
                over["ttft"].append(first - ex.t_sent - server["gt_ttft_s"])
                over["e2e"].append(last - ex.t_sent - server["gt_e2e_s"])

    try:
        await asyncio.gather(*(user(u) for u in range(streams)))
    finally:
        await client.aclose()
    over["cpu"].append((time.process_time() - cpu0) / (streams * (per_stream + 1)))
    return over


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[4, 64])
    p.add_argument("--requests-per-stream", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    proc, port = start_server()
    target = TargetSpec(base_url=f"http://127.0.0.1:{port}", model="gt", vocab_size=1000)
    results: dict[int, dict[str, dict[str, list[float]]]] = {}
    try:
        for n in args.streams:
            results[n] = {name: {"ttft": [], "e2e": [], "cpu": []} for name in CLIENTS}
            for _ in range(args.rounds):
                for name, make in CLIENTS.items():
                    got = asyncio.run(measure(make, target, n, args.requests_per_stream))
                    for k in got:
                        results[n][name][k] += got[k]
    finally:
        proc.terminate()
        proc.wait()
    out = []
    for n, per in results.items():
        base = float(np.percentile(per["pdbench"]["ttft"], 50))
        for name, o in per.items():
            row: dict[str, Any] = {"streams": n, "client": name, "requests": len(o["ttft"])}
            for k in ("ttft", "e2e"):
                row[f"{k}_overhead_p50_ms"] = float(np.percentile(o[k], 50)) * 1e3
                row[f"{k}_overhead_p99_ms"] = float(np.percentile(o[k], 99)) * 1e3
            row["cpu_ms_per_request"] = float(np.mean(o["cpu"])) * 1e3
            row["ttft_p50_ratio_to_pdbench"] = float(np.percentile(o["ttft"], 50)) / base if base > 0 else None
            out.append(row)
    pd_64 = next(r for r in out if r["client"] == "pdbench" and r["streams"] == max(args.streams))
    verdict = (
        f"goal pdbench TTFT overhead p50 < 1 ms at {pd_64['streams']} streams: {'met' if pd_64['ttft_overhead_p50_ms'] < 1 else 'NOT met'}"
    )
    if args.json:
        print(json.dumps({"rows": out, "verdict": verdict}, indent=1))
        return
    print(
        f"{'streams':>7} {'client':>10} {'n':>4} {'TTFT+ p50 ms':>13} {'p99':>7} {'E2E+ p50 ms':>12} {'p99':>7} "
        f"{'CPU ms/req':>10} {'TTFT+ / pdbench':>16}"
    )
    for r in out:
        print(
            f"{r['streams']:>7} {r['client']:>10} {r['requests']:>4} {r['ttft_overhead_p50_ms']:>13.3f} {r['ttft_overhead_p99_ms']:>7.3f} "
            f"{r['e2e_overhead_p50_ms']:>12.3f} {r['e2e_overhead_p99_ms']:>7.3f} {r['cpu_ms_per_request']:>10.3f} "
            f"{r['ttft_p50_ratio_to_pdbench']:>16.2f}"
        )
    print(verdict)


if __name__ == "__main__":
    main()
