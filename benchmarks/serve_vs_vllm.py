"""`pdbench serve` side by side with `vllm serve`: same engine arguments, weights and tokenizer, the
same `vllm bench serve` command against each, alternating and repeated; then pdbench's own load
generator against each.

Run on a node with two GPUs and the kit installed (docs/gpu-runbook.md):

    python benchmarks/serve_vs_vllm.py --model qwen3-8b --json $OUT/serve_vs_vllm.json --out /tmp/svv

What it does, in order:
1. Builds an offline word tokenizer and a dummy-weight model folder (`pdbench tokenizer build`):
   the architecture's config.json and a tokenizer where the word `t<i>` is token id i, so every
   prompt has exactly the length asked for, for the client and both servers alike.
2. Starts the servers one after another (vLLM profiles GPU memory at start; a quiet GPU keeps
   that right), each with --gpu-memory-utilization of its GPU:
     vllm         `vllm serve DIR` on GPU 0, engine arguments taken from pdbench's own
                  (actors/engines/vllm_engine.py:engine_args), so both run the same engine
     pdbench      `pdbench serve` aggregated, on GPU 0
     pdbench-pd   `pdbench serve --mode disaggregated`: prefill and decode on GPUs 0 and 1
   A server that is not being driven is idle: it holds memory, not compute. Then each answers
   the same three token-id prompts greedily: equal tokens show the same (seeded dummy) weights.
3. `vllm bench serve` with its defaults and only base URL, model and tokenizer, against
   `pdbench serve` (the peer-client check: default endpoint /v1/completions).
4. For each repeat and each concurrency, one identical `vllm bench serve` run per server, the
   server order rotating every repeat: random dataset, --input-len/--output-len/--num-prompts,
   --max-concurrency, plus --temperature 0 --ignore-eos on every server, because pdbench's
   engines always decode exactly the requested tokens greedily and vLLM would otherwise sample
   and could stop at EOS: the same work on both sides.
5. pdbench's own load generator (`pdbench run e0` with a `target:`) against each server.
6. Prints TTFT/TPOT/ITL/E2E percentiles and throughput per server (medians over repeats), with
   ratios to `vllm serve`, and the issue's bar for the aggregated server (output throughput
   >= 0.97x, TTFT p50 within +5 ms); --json writes every run's numbers too.

Time: each `vllm bench serve` run pays ~12 s of imports; at concurrency 1, 64 prompts of 1024+64
tokens take ~35 s on an H100-class GPU. No run starts past --deadline-s, so a device call of
600 s always ends with the table; split the work over calls with --servers and --repeats
(docs/gpu-runbook.md gives the two calls that cover everything).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.engines.spec import EngineConfig  # noqa: E402
from actors.engines.vllm_engine import engine_args  # noqa: E402
from analysis.metrics import lockstep_share  # noqa: E402

BASELINE = "vllm"
PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
# pdbench-only engine arguments with no effect on serving: its worker extension (memory and
# weight-checksum RPCs) and skipping the tokenizer (pdbench detokenises in the HTTP layer; `vllm
# serve` needs its tokenizer to detokenise).
NOT_FOR_VLLM_SERVE = ("model", "skip_tokenizer_init", "worker_extension_cls")
# vLLM 0.26's engine flags that are plain store_true (default False, no --no- form); every other
# boolean engine flag is a BooleanOptionalAction (--x / --no-x).
STORE_TRUE_ONLY = ("disable_log_stats", "aggregate_engine_logging", "data_parallel_multi_port_external_lb")


@dataclass(frozen=True)
class Workload:
    input_len: int = 1024
    output_len: int = 64
    num_prompts: int = 64
    concurrencies: tuple[int, ...] = (1, 8)
    repeats: int = 3
    warmups: int = 2
    seed: int = 0


@dataclass(frozen=True)
class Server:
    name: str
    kind: str  # "vllm" or "pdbench"
    mode: str  # "aggregated" or "disaggregated"
    gpus: str  # CUDA_VISIBLE_DEVICES
    port: int

    @property
    def url(self) -> str:
        """Where clients go: `pdbench serve`'s replica on its own port (Serve's direct ingress, the
        proxy's port + 1: no proxy hop, as `vllm serve` has none); the readiness check waits on it."""
        return f"http://127.0.0.1:{self.port + 1 if self.kind == 'pdbench' else self.port}"


def servers(names: list[str], base_port: int) -> list[Server]:
    known = {
        "vllm": Server("vllm", "vllm", "aggregated", "0", base_port),
        "pdbench": Server("pdbench", "pdbench", "aggregated", "0", base_port + 10),
        "pdbench-pd": Server("pdbench-pd", "pdbench", "disaggregated", "0,1", base_port + 20),
    }
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--servers: unknown {bad}; choose from {list(known)}")
    return [known[n] for n in names]


def engine_config(model_dir: Path, a: argparse.Namespace) -> EngineConfig:
    vllm = {
        "gpu_memory_utilization": a.gpu_memory_utilization,
        # Stated, not left to vLLM: its default per-step token budget depends on how the engine
        # is started (`vllm serve` on a >= 70 GiB GPU: 8192; AsyncLLM from engine args, as in
        # pdbench: 2048), and at concurrency 8 the budget decides how prefills share steps.
        "max_num_batched_tokens": a.max_num_batched_tokens,
        **({"enforce_eager": True} if a.eager else {}),
    }
    return EngineConfig(
        kind=a.engine,
        model=str(model_dir),
        dtype="bfloat16" if a.engine == "vllm" else "float32",
        max_model_len=a.max_model_len,
        max_batch_size=a.max_batch_size,
        # the config refuses vLLM's arguments for another engine (the reference engine tries the script on CPU)
        vllm=vllm if a.engine == "vllm" else {},
    )


def _flag(key: str, value: Any) -> list[str]:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        if key in STORE_TRUE_ONLY:
            return [name] if value else []
        return [name] if value else ["--no-" + key.replace("_", "-")]
    if isinstance(value, (dict, list)):
        return [name, json.dumps(value)]
    return [name, str(value)]


def vllm_serve_command(cfg: EngineConfig, model_dir: Path, served_name: str, port: int) -> list[str]:
    """`vllm serve` with pdbench's engine arguments, flag for flag (dummy load, seed, no prefix caching, ...)."""
    args = engine_args(cfg, str(model_dir), dummy=True)
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir)]
    for k, v in args.items():
        if k not in NOT_FOR_VLLM_SERVE:
            cmd += _flag(k, v)
    return [*cmd, "--served-model-name", served_name, "--tokenizer", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]


# The disaggregated server moves KV as E3's GPU profile does (configs/gpu/e3-qwen3-8b.yaml), so its
# numbers sit next to E3's; the reference engine moves KV itself and refuses with_prefill.
E3_KV_TRANSFER = {"decode_submit": "with_prefill", "worker_threads": 16, "put_threads": 4}


def pdbench_serve_config(cfg: EngineConfig, served_name: str, model_dir: Path) -> dict[str, Any]:
    return {
        "engine": cfg.model_dump(mode="json"),
        "served_model_name": served_name,
        "tokenizer": str(model_dir),
        **({"kv_transfer": E3_KV_TRANSFER} if cfg.kind == "vllm" else {}),
    }


def pdbench_serve_command(config: Path, s: Server) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cluster.cli",
        "serve",
        "--config",
        str(config),
        "--mode",
        s.mode,
        "--port",
        str(s.port),
        "--name",
        s.name,
    ]


def bench_command(url: str, model: str, tokenizer: Path, wl: Workload, concurrency: int, result: Path) -> list[str]:
    """The one `vllm bench serve` command every server gets; no --backend/--endpoint: its default."""
    return [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
        "--base-url", url, "--model", model, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--random-input-len", str(wl.input_len), "--random-output-len", str(wl.output_len),
        "--num-prompts", str(wl.num_prompts), "--max-concurrency", str(concurrency), "--num-warmups", str(wl.warmups),
        "--seed", str(wl.seed), "--temperature", "0", "--ignore-eos",
        "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", ",".join(map(str, PERCENTILES)),
        "--save-result", "--save-detailed", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]  # fmt: skip


def peer_check_command(url: str, model: str, tokenizer: Path, result: Path) -> list[str]:
    """`vllm bench serve` as a new user runs it: defaults, only base URL, model and tokenizer (and a small run)."""
    return [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--base-url", url, "--model", model,
        "--tokenizer", str(tokenizer), "--num-prompts", "16",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]  # fmt: skip


@dataclass
class BenchResult:
    """One `vllm bench serve` run, from its --save-result JSON (milliseconds, tokens/s)."""

    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    output_throughput: float
    request_throughput: float
    latency_ms: dict[str, float] = field(default_factory=dict)  # "ttft_p50" → ms, "e2el_mean" → ms, ...
    # Share of sends in bursts of 4+ users (analysis.metrics.lockstep_share), from --save-detailed's
    # start times: which closed-loop regime the run settled in. None without per-request times.
    lockstep_share: float | None = None


def parse_bench(path: Path) -> BenchResult:
    d = json.loads(Path(path).read_text())
    starts = d.get("start_times") or []
    lat = {}
    for m in METRICS:
        for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES)):
            key = f"{stat}_{m}_ms"
            if key in d:
                lat[f"{m}_{stat}"] = float(d[key])
    return BenchResult(
        completed=int(d["completed"]),
        failed=int(d.get("failed", 0)),
        total_input_tokens=int(d["total_input_tokens"]),
        total_output_tokens=int(d["total_output_tokens"]),
        output_throughput=float(d["output_throughput"]),
        request_throughput=float(d["request_throughput"]),
        latency_ms=lat,
        lockstep_share=lockstep_share(np.asarray(starts, dtype=float)) if starts else None,
    )


def summarise(runs: list[BenchResult]) -> dict[str, float]:
    """Median over repeats of every number (throughput and each latency statistic)."""
    out = {"output_throughput": statistics.median(r.output_throughput for r in runs)}
    out["request_throughput"] = statistics.median(r.request_throughput for r in runs)
    for k in runs[0].latency_ms:
        out[k] = statistics.median(r.latency_ms[k] for r in runs if k in r.latency_ms)
    if shares := [r.lockstep_share for r in runs if r.lockstep_share is not None]:
        out["lockstep_share"] = statistics.median(shares)
    return out


# lockstep_share, last: at the same load, TTFT depends on whether the client's users moved in waves.
ROWS = ("output_throughput", *(f"{m}_p{p}" for m in METRICS for p in PERCENTILES), "lockstep_share")
# Where a pdbench server's TTFT went, from the server timings its last chunk carries (pdbench's load
# generator records them; `vllm bench serve` cannot see them): p50 of each stage.
STAGES = ("server_queue", "prefill", "transfer", "first_decode")
STAGE_ROWS = tuple(f"{st}_p50" for st in STAGES)


def side_by_side(table: dict[str, dict[str, float]], baseline: str = BASELINE, rows: tuple[str, ...] = ROWS) -> str:
    """Rows = metrics, columns = servers; each non-baseline cell also shows its ratio to the baseline
    (and, for latencies, the difference in ms)."""
    names = list(table)
    lines = [f"{'metric':22s}" + "".join(f"{n:>30s}" for n in names)]
    base = table.get(baseline)
    for row in rows:
        if not any(row in table[n] for n in names):
            continue
        cells = []
        for n in names:
            v = table[n].get(row)
            if v is None:
                cells.append(f"{'—':>30s}")
                continue
            if row == "lockstep_share":  # a share, not a cost: no ratio
                cells.append(f"{v:>30.0%}")
                continue
            text = f"{v:.1f}" if row == "output_throughput" else f"{v:.2f} ms"
            if base is not None and n != baseline and base.get(row):
                text += f" ({v / base[row]:.3f}x"
                text += ")" if row == "output_throughput" else f", {v - base[row]:+.2f})"
            cells.append(f"{text:>30s}")
        lines.append(f"{row:22s}" + "".join(cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    value: str


def goal_checks(table: dict[str, dict[str, float]], concurrency: int) -> list[Check]:
    """The issue's bar for the aggregated server: output throughput ≥ 0.97× vLLM's, TTFT p50 within +5 ms."""
    if BASELINE not in table or "pdbench" not in table:
        return []
    b, p = table[BASELINE], table["pdbench"]
    ratio = p["output_throughput"] / b["output_throughput"]
    dt = p["ttft_p50"] - b["ttft_p50"]
    return [
        Check(f"c={concurrency}: pdbench output throughput >= 0.97x vllm serve", ratio >= 0.97, f"{ratio:.3f}x"),
        Check(f"c={concurrency}: pdbench TTFT p50 <= vllm serve + 5 ms", dt <= 5.0, f"{dt:+.2f} ms"),
    ]


# --- same engine, same weights: greedy tokens agree ------------------------------------------
def probe_prompts(vocab_size: int, n: int = 3, length: int = 64, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(n)]


def greedy_tokens(client: httpx.Client, url: str, model: str, prompt: list[int], n: int = 16) -> list[int]:
    """Token ids a server returns for a token-id prompt, greedy, exactly n (both servers speak this)."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = client.post(f"{url}/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    return list(r.json()["choices"][0]["token_ids"])


def same_tokens(outputs: dict[str, list[list[int]]], baseline: str = BASELINE) -> dict[str, bool]:
    """Per server: do its greedy tokens equal the baseline's, prompt by prompt? (Dummy weights are
    seeded: equal tokens show both servers run the same weights and the same engine.)"""
    base = outputs.get(baseline)
    return {name: out == base for name, out in outputs.items() if name != baseline and base is not None}


# --- pdbench's own load generator against each server ---------------------------------------
def target_config(url: str, model: str, vocab_size: int, wl: Workload, concurrency: int) -> dict[str, Any]:
    """An E0 config whose `target:` is the server: token-id prompts of exactly the same lengths."""
    return {
        "track": "e0",
        "seed": wl.seed,
        "workload": {
            "num_requests": wl.num_prompts,
            "warmup_requests": wl.warmups,
            "input_len": {"kind": "fixed", "value": wl.input_len},
            "output_len": {"kind": "fixed", "value": wl.output_len},
            "arrival": {"kind": "closed", "concurrency": concurrency},
        },
        "target": {"base_url": url, "model": model, "vocab_size": vocab_size},
        # One cell per repeat: throughput is per cell, over the same request count as vllm bench's.
        "params": {"repeats": 2, "rounds": 1},
    }


def loadgen_metrics(run_dir: Path) -> dict[str, float]:
    """The packet's measured requests → the same names and units as vllm bench's (ms, tokens/s)."""
    from analysis.packet import load_packet
    from analysis.records import measured

    sent = measured(load_packet(run_dir).requests)  # every measured send, failed ones too
    df = sent[sent["ok"].astype(bool)]
    out: dict[str, float] = {}
    series: dict[str, Any] = {"ttft": df["ttft_s"], "tpot": df["tpot_s"], "e2el": df["e2e_s"], "itl": [x for v in df["itl_s"] for x in v]}
    for m, vals in series.items():
        arr = np.asarray(list(vals), dtype=float) * 1000.0
        for p in PERCENTILES:
            out[f"{m}_p{p}"] = float(np.percentile(arr, p))
    # Per cell (repeat): output tokens over the cell's span from first send to last token.
    tput = []
    for _, cell in df.groupby("cell_id"):
        span = cell["t_last_token"].max() - cell["t_sent"].min()
        tput.append(cell["output_tokens"].sum() / span)
    out["output_throughput"] = float(statistics.median(tput))
    for st in STAGES:
        if f"{st}_s" in df and df[f"{st}_s"].notna().any():
            out[f"{st}_p50"] = float(np.nanpercentile(df[f"{st}_s"].to_numpy(float), 50) * 1000.0)
    shares = [s for _, c in sent.groupby("cell_id") if (s := lockstep_share(c["t_sent"].to_numpy(float))) is not None]
    if shares:
        out["lockstep_share"] = float(statistics.median(shares))
    return out


# --- processes (GPU node only) -----------------------------------------------------------------
def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 - the child keeps writing to it until stopped
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server for {url} exited ({proc.returncode}); last log lines:\n" + "\n".join(log.read_text().splitlines()[-30:])
            )
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"server for {url} not ready after {timeout_s:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C first (pdbench serve deletes its app, vLLM shuts its engine down), then the session's processes."""
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> int:
    """Run to completion with output in `log`; past `timeout_s` its whole session is killed and 124 returned."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return 124


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-8b", help="architecture (configs/models/ name or config path); weights are dummy")
    ap.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --model)")
    ap.add_argument("--servers", default="vllm,pdbench,pdbench-pd", help="which servers, comma-separated: vllm, pdbench, pdbench-pd")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8", help="comma-separated --max-concurrency values")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.28, help="per engine; GPU 0 holds up to three")
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="vLLM's per-step token budget, the same for every server (default: `vllm serve`'s own on an H100/H200)",
    )
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs on any engine")
    ap.add_argument(
        "--engine",
        choices=["vllm", "reference"],
        default="vllm",
        help="pdbench's engine; 'reference' (CPU, torch) only to try the script without a GPU, with --servers pdbench,pdbench-pd",
    )
    ap.add_argument("--no-loadgen", action="store_true", help="skip pdbench's own load generator pass")
    ap.add_argument("--base-port", type=int, default=8100)
    ap.add_argument("--start-timeout-s", type=float, default=300.0)
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=500.0,
        help="start no new bench or load-generator run past this many seconds (a device call ends at 600 s)",
    )
    ap.add_argument("--out", default="/tmp/serve_vs_vllm", help="folder for logs, bench results and packets")
    ap.add_argument("--json", help="also write the summary and every run to this file")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit (no GPU needed)")
    a = ap.parse_args(argv)
    t_start = time.monotonic()

    from workloads.word_tokenizer import save_word_tokenizer

    try:
        chosen = servers(a.servers.split(","), a.base_port)
    except ValueError as e:
        ap.error(str(e))
    if a.engine != "vllm" and any(s.kind == "vllm" for s in chosen):
        ap.error("--engine reference runs pdbench's CPU engine; `vllm serve` needs --engine vllm (and a GPU)")
    wl = Workload(a.input_len, a.output_len, a.num_prompts, tuple(int(c) for c in a.concurrency.split(",")), a.repeats)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.served_model_name or Path(a.model).stem
    model_dir = save_word_tokenizer(out / "model", model=a.model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    cfg = engine_config(model_dir, a)
    conf = out / "pdbench-serve.yaml"
    conf.write_text(yaml.safe_dump(pdbench_serve_config(cfg, name, model_dir)))
    cmds = {
        s.name: vllm_serve_command(cfg, model_dir, name, s.port) if s.kind == "vllm" else pdbench_serve_command(conf, s) for s in chosen
    }
    if a.dry_run:
        for s in chosen:
            print(f"CUDA_VISIBLE_DEVICES={s.gpus} {' '.join(cmds[s.name])}")
        for c in wl.concurrencies:
            print(" ".join(bench_command("URL", name, model_dir, wl, c, out / f"SERVER-c{c}-rR.json")))
        return 0

    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    procs: dict[str, subprocess.Popen] = {}
    report: dict[str, Any] = {"model": a.model, "workload": asdict(wl), "engine": cfg.model_dump(mode="json"), "commands": cmds}
    runs: list[dict[str, Any]] = []
    try:
        for s in chosen:  # one after another: each vLLM engine profiles memory on a quiet GPU
            log = out / f"{s.name}.log"
            procs[s.name] = start(cmds[s.name], {**env, "CUDA_VISIBLE_DEVICES": s.gpus}, log)
            took = wait_ready(s.url, procs[s.name], log, a.start_timeout_s)
            print(f"{s.name}: ready at {s.url} after {took:.0f} s", flush=True)
            report.setdefault("start_s", {})[s.name] = took
        with httpx.Client() as client:
            outputs = {s.name: [greedy_tokens(client, s.url, name, p) for p in probe_prompts(vocab)] for s in chosen}
        ref = BASELINE if BASELINE in outputs else chosen[0].name
        report["greedy_tokens_equal"] = {"reference": ref, "servers": same_tokens(outputs, ref)}
        for n, ok in report["greedy_tokens_equal"]["servers"].items():
            print(f"{'PASS' if ok else 'FAIL'}  {n}: greedy tokens equal {ref}'s (3 prompts x 16 tokens)", flush=True)
        pd_agg = next((s for s in chosen if s.kind == "pdbench" and s.mode == "aggregated"), None)
        if pd_agg is not None:
            res = out / "peer-check.json"
            rc = run_logged(peer_check_command(pd_agg.url, name, model_dir, res), env, out / "peer-check.log", 180)
            peer = asdict(parse_bench(res)) if rc == 0 else None
            report["peer_check"] = {"command": peer_check_command(pd_agg.url, name, model_dir, res), "returncode": rc, "result": peer}
            ok = rc == 0 and peer is not None and peer["completed"] > 0 and peer["failed"] == 0
            report["peer_check"]["ok"] = ok
            counts = "" if peer is None else f"{peer['completed']} completed, {peer['failed']} failed"
            print(f"{'PASS' if ok else 'FAIL'}  peer check (vllm bench serve defaults against pdbench serve): rc={rc} {counts}", flush=True)
        for r in range(wl.repeats):
            order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
            for c in wl.concurrencies:
                for s in order:
                    if time.monotonic() - t_start > a.deadline_s:
                        print(f"deadline: repeat {r} c={c} {s.name} not started", flush=True)
                        continue
                    res = out / f"{s.name}-c{c}-r{r}.json"
                    rc = run_logged(bench_command(s.url, name, model_dir, wl, c, res), env, res.with_suffix(".log"), 300)
                    row: dict[str, Any] = {"server": s.name, "concurrency": c, "repeat": r, "returncode": rc}
                    if rc == 0:
                        row.update(asdict(parse_bench(res)))
                    runs.append(row)
                    print(
                        f"r{r} c={c} {s.name}: rc={rc} {row.get('output_throughput', 0):.1f} tok/s "
                        f"TTFT p50 {row.get('latency_ms', {}).get('ttft_p50', float('nan')):.1f} ms",
                        flush=True,
                    )
        if not a.no_loadgen:
            for s in chosen:
                c = max(wl.concurrencies)
                if time.monotonic() - t_start > a.deadline_s:
                    print(f"deadline: loadgen against {s.name} not started", flush=True)
                    continue
                tc = out / f"loadgen-{s.name}.yaml"
                tc.write_text(yaml.safe_dump(target_config(s.url, name, vocab, wl, c)))
                log = out / f"loadgen-{s.name}.log"
                cmd = [sys.executable, "-m", "cluster.cli", "run", "e0", "--config", str(tc), "--out", str(out / "runs"), "--no-progress"]
                rc = run_logged(cmd, env, log, 300)
                lines = log.read_text().strip().splitlines()
                run_dir = next((ln for ln in reversed(lines) if (Path(ln) / "manifest.json").is_file()), None)
                row = {"server": s.name, "concurrency": c, "returncode": rc, "run_dir": run_dir}
                if rc == 0 and run_dir:
                    row["metrics"] = loadgen_metrics(Path(run_dir))
                else:
                    row["log_tail"] = "\n".join(lines[-20:])
                report.setdefault("loadgen", []).append(row)
    finally:
        for s in reversed(chosen):
            if s.name in procs:
                stop(procs[s.name])

    report["runs"] = runs
    report["summary"] = {}
    for c in wl.concurrencies:
        table = {}
        for s in chosen:
            ok = [
                BenchResult(**{k: v for k, v in r.items() if k in BenchResult.__dataclass_fields__})
                for r in runs
                if r["server"] == s.name and r["concurrency"] == c and r["returncode"] == 0
            ]
            if ok:
                table[s.name] = summarise(ok)
        checks = goal_checks(table, c)
        report["summary"][str(c)] = {"servers": table, "checks": [asdict(k) for k in checks]}
        print(f"\n=== vllm bench serve, concurrency {c}: medians over repeats (ratio to vllm serve) ===")
        print(side_by_side(table))
        for k in checks:
            print(f"{'PASS' if k.ok else 'FAIL'}  {k.what}: {k.value}")
    if report.get("loadgen"):
        lg = {r["server"]: r["metrics"] for r in report["loadgen"] if "metrics" in r}
        print(f"\n=== pdbench load generator (E0 target, concurrency {max(wl.concurrencies)}) ===")
        print(side_by_side(lg, rows=ROWS + STAGE_ROWS))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
