"""A ground-truth OpenAI-compatible streaming server: an exact latency law and its own stamps.

`POST /v1/completions` (stream: true, `prompt` a token-id list) answers with one SSE chunk per
token on a fixed schedule from the moment the request's body was in: token k is written at
`ttft + k × tpot`, `ttft = ttft_fixed_s + ttft_per_prompt_token_s × prompt tokens` (defaults 40 ms +
0.05 ms/token, then 15 ms/token). The schedule is absolute, so a late wake-up never shifts later
tokens. Each chunk is stamped just before its bytes are handed to the socket, and the last chunk's
`server_timing` carries the stamps (seconds since the request was in: `gt_ttft_s`, `gt_chunk_s`,
`gt_e2e_s`), so a client's measurements can be checked per request against what the server did.

Loopback only (it refuses any other bind address): it is a measuring instrument for tests and
benchmarks, not a server. HTTP/1.1 keep-alive with chunked transfer encoding, nothing else.

    python benchmarks/groundtruth_server.py [--port 0]   # prints "port N" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Law:
    ttft_fixed_s: float = 0.040
    ttft_per_prompt_token_s: float = 0.00005
    tpot_s: float = 0.015

    def ttft_s(self, prompt_tokens: int) -> float:
        return self.ttft_fixed_s + self.ttft_per_prompt_token_s * prompt_tokens


async def _until(due: float) -> None:
    """No spin: with 64 streams a spinning server would take a core from the client it measures.
    A late wake-up is in the stamps, which are the truth; the law is the target."""
    if (wait := due - time.monotonic()) > 0:
        await asyncio.sleep(wait)


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: object) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


class GroundTruthServer:
    def __init__(self, law: Law = Law()):
        self.law = law
        self.served = 0

    async def _respond(self, writer: asyncio.StreamWriter, body: dict, t_in: float) -> None:
        n_prompt = len(body["prompt"])
        n_out = int(body["max_tokens"])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        ttft = self.law.ttft_s(n_prompt)
        stamps: list[float] = []
        for k in range(n_out):
            await _until(t_in + ttft + k * self.law.tpot_s)
            last = k == n_out - 1
            choice = {"index": 0, "text": "x", "token_ids": [k % 1000], "finish_reason": "length" if last else None}
            chunk: dict = {"id": "gt", "object": "text_completion", "choices": [choice]}
            stamp = time.monotonic() - t_in
            stamps.append(stamp)
            if last:
                chunk["server_timing"] = {"gt_ttft_s": stamps[0], "gt_chunk_s": stamps, "gt_e2e_s": stamp}
            writer.write(_event(chunk))
        writer.write(_event({"id": "gt", "object": "text_completion", "choices": [], "usage": {"completion_tokens": n_out}}))
        writer.write(_chunk(b"data: [DONE]\n\n") + _chunk(b""))
        await writer.drain()
        self.served += 1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                t_in = time.monotonic()
                if not lines[0].startswith("POST /v1/completions "):
                    msg = b'{"error":{"message":"only POST /v1/completions"}}'
                    writer.write(
                        b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(msg), msg)
                    )
                    continue
                await self._respond(writer, json.loads(body), t_in)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"--host {host}: the ground-truth server binds to a loopback address only (127.0.0.1)")
        return await asyncio.start_server(self.handle, host, port)


async def _main(args: argparse.Namespace) -> None:
    server = await GroundTruthServer(Law(args.ttft_fixed_s, args.ttft_per_prompt_token_s, args.tpot_s)).start(args.host, args.port)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-fixed-s", type=float, default=Law.ttft_fixed_s)
    p.add_argument("--ttft-per-prompt-token-s", type=float, default=Law.ttft_per_prompt_token_s)
    p.add_argument("--tpot-s", type=float, default=Law.tpot_s)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(p.parse_args()))
