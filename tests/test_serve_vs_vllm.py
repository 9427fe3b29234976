"""benchmarks/serve_vs_vllm.py without a GPU: the commands it runs, the results it reads, the table it prints."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("serve_vs_vllm", ROOT / "benchmarks" / "serve_vs_vllm.py")
svv = importlib.util.module_from_spec(_spec)
sys.modules["serve_vs_vllm"] = svv
_spec.loader.exec_module(svv)

# A real `vllm bench serve` 0.26.0 --save-result file (pdbench serve on CPU, 8 prompts of 32 tokens).
FIXTURE = ROOT / "tests" / "data" / "vllm_bench_serve_0.26.json"


def _cfg(model: Path = Path("/m"), **kw):
    a = Namespace(
        engine="vllm", max_model_len=4096, max_batch_size=64, gpu_memory_utilization=0.28, max_num_batched_tokens=8192, eager=False
    )
    return svv.engine_config(model, Namespace(**{**vars(a), **kw}))


def test_vllm_serve_gets_pdbenchs_engine_arguments_flag_for_flag():
    cmd = svv.vllm_serve_command(_cfg(), Path("/m"), "qwen3-8b", 8100)
    assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    flags = " ".join(cmd[5:])
    for f in (
        "--dtype bfloat16",
        "--max-model-len 4096",
        "--max-num-seqs 64",
        "--seed 0",
        "--no-enable-prefix-caching",
        "--load-format dummy",
        "--gpu-memory-utilization 0.28",
        "--served-model-name qwen3-8b",
        "--tokenizer /m",
        "--port 8100",
        "--max-num-batched-tokens 8192",
    ):
        assert f in flags, f
    # store_true-only flags have no --no- form in vLLM; pdbench-only arguments stay out.
    assert "disable-log-stats" not in flags and "worker-extension" not in flags and "skip-tokenizer" not in flags
    assert "--enforce-eager" in svv.vllm_serve_command(_cfg(eager=True), Path("/m"), "m", 1)
    yarn = _cfg().model_copy(update={"hf_overrides": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}})
    cmd = svv.vllm_serve_command(yarn, Path("/m"), "m", 1)
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}


def test_one_bench_command_for_every_server_with_the_default_endpoint(tmp_path):
    wl = svv.Workload()
    a = svv.bench_command("http://127.0.0.1:8100", "qwen3-8b", tmp_path, wl, 8, tmp_path / "r.json")
    b = svv.bench_command("http://127.0.0.1:8101", "qwen3-8b", tmp_path, wl, 8, tmp_path / "r.json")
    assert [x for x in a if "8100" not in x] == [x for x in b if "8101" not in x]
    assert "--backend" not in a and "--endpoint" not in a
    s = " ".join(a)
    for f in (
        "--dataset-name random",
        "--random-input-len 1024",
        "--random-output-len 64",
        "--num-prompts 64",
        "--max-concurrency 8",
        "--temperature 0",
        "--ignore-eos",
        "--metric-percentiles 50,90,99",
        "--save-detailed",  # per-request start times: which closed-loop regime the run settled in
    ):
        assert f in s, f
    peer = svv.peer_check_command("http://h:1", "m", tmp_path, tmp_path / "p.json")
    assert [x for x in peer if x.startswith("--") and x not in ("--save-result", "--result-dir", "--result-filename")] == [
        "--base-url",
        "--model",
        "--tokenizer",
        "--num-prompts",
    ]


def test_servers_and_placement():
    s = {x.name: x for x in svv.servers(["vllm", "pdbench", "pdbench-pd"], 8100)}
    assert (s["vllm"].gpus, s["pdbench"].gpus, s["pdbench-pd"].gpus) == ("0", "0", "0,1")
    assert s["pdbench-pd"].mode == "disaggregated" and len({x.port for x in s.values()}) == 3
    # Clients reach pdbench's replica on its own port (direct ingress: proxy port + 1), vllm at its port;
    # no two servers' proxy or replica ports collide.
    assert s["pdbench"].url == f"http://127.0.0.1:{s['pdbench'].port + 1}" and s["vllm"].url == "http://127.0.0.1:8100"
    assert len({x.port for x in s.values()} | {x.port + 1 for x in s.values() if x.kind == "pdbench"}) == 5
    with pytest.raises(ValueError, match="--servers"):
        svv.servers(["sglang"], 8100)
    cmd = svv.pdbench_serve_command(Path("c.yaml"), s["pdbench-pd"])
    assert cmd[cmd.index("--mode") + 1] == "disaggregated"


def test_pdbench_serve_config_is_valid_and_matches_the_engine(tmp_path):
    import shutil

    from cluster.serve import serve_spec

    shutil.copy(ROOT / "configs" / "models" / "qwen3-8b.json", tmp_path / "config.json")  # a model folder that exists
    cfg = _cfg(tmp_path)
    spec = serve_spec(svv.pdbench_serve_config(cfg, "qwen3-8b", tmp_path), {})
    assert spec.engine == cfg and spec.model_name == "qwen3-8b" and spec.tokenizer == str(tmp_path) and spec.gpus_per_engine() == 1
    if cfg.kind == "vllm":  # the disaggregated server moves KV as E3's GPU profile does
        e3 = yaml.safe_load((ROOT / "configs" / "gpu" / "e3-qwen3-8b.yaml").read_text())["kv_transfer"]
        assert spec.kv_transfer.model_dump(include=set(svv.E3_KV_TRANSFER)) == {k: e3[k] for k in svv.E3_KV_TRANSFER}


def test_parse_real_bench_output_and_medians():
    r = svv.parse_bench(FIXTURE)
    assert (r.completed, r.failed, r.total_input_tokens, r.total_output_tokens) == (8, 0, 256, 64)
    assert r.latency_ms["ttft_p50"] == pytest.approx(86.7165, rel=1e-4) and r.latency_ms["e2el_p99"] == pytest.approx(309.844, rel=1e-4)
    assert set(svv.ROWS) - {"output_throughput", "lockstep_share"} <= set(r.latency_ms)
    other = svv.BenchResult(**{**r.__dict__, "output_throughput": 100.0, "latency_ms": {**r.latency_ms, "ttft_p50": 10.0}})
    third = svv.BenchResult(**{**r.__dict__, "output_throughput": 50.0, "latency_ms": {**r.latency_ms, "ttft_p50": 20.0}})
    med = svv.summarise([r, other, third])
    assert med["output_throughput"] == pytest.approx(r.output_throughput) and med["ttft_p50"] == 20.0


def test_a_detailed_bench_result_says_how_much_of_it_moved_in_lockstep(tmp_path):
    d = json.loads(FIXTURE.read_text())
    assert svv.parse_bench(FIXTURE).lockstep_share is None  # saved without --save-detailed: no start times
    # 8 users: the opening wave of 8 together, then one send every 70 ms.
    d["start_times"] = [100.0 + 0.001 * i for i in range(8)] + [100.5 + 0.07 * i for i in range(24)]
    (tmp_path / "r.json").write_text(json.dumps(d))
    r = svv.parse_bench(tmp_path / "r.json")
    assert r.lockstep_share == pytest.approx(8 / 32)
    table = {"vllm": svv.summarise([r]), "pdbench-pd": {"output_throughput": 1.0, "lockstep_share": 0.78}}
    row = next(line for line in svv.side_by_side(table).splitlines() if line.startswith("lockstep_share"))
    assert row.split()[1:] == ["25%", "78%"]  # a share: no ratio to the baseline


def test_loadgen_numbers_are_rebuilt_from_the_packet_as_the_device_printed_them():
    """The GPU run's own packet (docs/evidence): the script's table reads the same numbers from it."""
    m = svv.loadgen_metrics(ROOT / "docs" / "evidence" / "serve-vs-vllm-pd-2xh200-loadgen" / "loadgen")
    assert m["ttft_p50"] == pytest.approx(410.50, abs=0.01) and m["output_throughput"] == pytest.approx(667.1, abs=0.1)
    assert m["lockstep_share"] == pytest.approx(0.78, abs=0.01)  # pdbench's users stayed in waves (E3, docs/tracks.md)
    # The disaggregated server's own stages (its last chunk's server timings): the transfer is what waves cost.
    assert m["prefill_p50"] == pytest.approx(134.6, abs=3) and m["transfer_p50"] == pytest.approx(185, abs=15)
    assert m["first_decode_p50"] == pytest.approx(45, abs=2)
    table = svv.side_by_side({"pdbench-pd": m}, rows=svv.ROWS + svv.STAGE_ROWS)
    assert "transfer_p50" in table and "lockstep_share" in table


def test_side_by_side_ratios_and_goal_checks():
    table = {
        "vllm": {"output_throughput": 1000.0, "ttft_p50": 50.0},
        "pdbench": {"output_throughput": 980.0, "ttft_p50": 53.0},
        "pdbench-pd": {"output_throughput": 900.0, "ttft_p50": 80.0},
    }
    text = svv.side_by_side(table)
    assert "980.0 (0.980x)" in text and "53.00 ms (1.060x, +3.00)" in text and "80.00 ms (1.600x, +30.00)" in text
    assert [c.ok for c in svv.goal_checks(table, 8)] == [True, True]
    table["pdbench"] = {"output_throughput": 960.0, "ttft_p50": 56.0}
    checks = svv.goal_checks(table, 1)
    assert [c.ok for c in checks] == [False, False] and checks[0].value == "0.960x" and checks[1].value == "+6.00 ms"
    assert svv.goal_checks({"pdbench": table["pdbench"]}, 1) == []


def test_loadgen_target_config_is_a_valid_e0_config():
    from cluster.config import resolve

    data = svv.target_config("http://127.0.0.1:8100", "qwen3-8b", 151936, svv.Workload(), 8)
    cfg = resolve("e0", data)
    assert cfg.target.base_url == "http://127.0.0.1:8100" and cfg.workload.num_requests == 64
    assert cfg.workload.input_len.value == 1024 and cfg.workload.output_len.value == 64 and cfg.workload.arrival.concurrency == 8


def test_dry_run_prints_the_commands(tmp_path, capsys):
    assert svv.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("CUDA_VISIBLE_DEVICES=0 ") and " serve " in out[0]
    assert out[2].startswith("CUDA_VISIBLE_DEVICES=0,1 ") and "--mode disaggregated" in out[2]
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit):  # the reference engine cannot stand beside `vllm serve`
        svv.main(["--dry-run", "--engine", "reference", "--out", str(tmp_path)])
    # ... but tries the script on CPU with pdbench's two servers: no vLLM arguments in its config
    assert svv.main(["--dry-run", "--engine", "reference", "--servers", "pdbench,pdbench-pd", "--out", str(tmp_path)]) == 0
    assert " serve " in capsys.readouterr().out and _cfg(engine="reference").vllm == {}


def test_greedy_token_probe_over_http():
    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(
            200, json={"choices": [{"index": 0, "text": "", "token_ids": [p % 7 for p in body["prompt"][: body["max_tokens"]]]}]}
        )

    prompts = svv.probe_prompts(100)
    assert len(prompts) == 3 and all(len(p) == 64 and max(p) < 100 for p in prompts) and prompts == svv.probe_prompts(100)
    with httpx.Client(transport=httpx.MockTransport(handler)) as c:
        out = svv.greedy_tokens(c, "http://s", "m", prompts[0])
    assert out == [p % 7 for p in prompts[0][:16]]
    assert seen[0]["temperature"] == 0 and seen[0]["ignore_eos"] is True and seen[0]["return_token_ids"] is True
    assert svv.same_tokens({"vllm": [[1, 2]], "pdbench": [[1, 2]], "pdbench-pd": [[1, 3]]}) == {"pdbench": True, "pdbench-pd": False}
    assert svv.same_tokens({"pdbench": [[1]]}) == {}
