"""How tracks E0, E1, E2, E4, E5, E6 expand a config into cells (no Ray, no engine)."""

import pytest

from cluster.config import ConfigError, resolve
from cluster.planning import cell_engine, cell_hash, plan_cells
from workloads.arrivals import ClosedLoop, Gamma, Poisson
from workloads.tracks import CellOutcome, get_track


def test_e0_rounds_interleave_the_repeats():
    cfg = resolve("e0", {"workload": {"num_requests": 10}, "params": {"repeats": 3, "rounds": 2}})
    cells = plan_cells(cfg)
    assert [c.cell_id for c in cells] == ["rep0.round0", "rep1.round0", "rep2.round0", "rep0.round1", "rep1.round1", "rep2.round1"]
    assert [(c.labels["repeat"], c.labels["round"]) for c in cells] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert {c.workload for c in cells} == {cfg.workload} and {c.seed_offset for c in cells} == {0}
    # Each round is its own cell config (resume tells them apart); the same round is one config in every repeat.
    hashes = {c.cell_id: cell_hash(cfg, c) for c in cells}
    assert len({hashes[f"rep{i}.round0"] for i in range(3)}) == 1 and hashes["rep0.round0"] != hashes["rep0.round1"]
    one = plan_cells(resolve("e0", {"params": {"rounds": 1}}))
    assert [c.cell_id for c in one] == ["rep0", "rep1"] and {c.measured_slice for c in one} == {None}
    assert resolve("e0", {}).params["rounds"] == 2


def test_e0_rounds_must_fit_the_requests():
    with pytest.raises(ConfigError, match=r"params.rounds: 5 rounds need at least as many measured requests"):
        plan_cells(resolve("e0", {"workload": {"num_requests": 4}, "params": {"rounds": 5}}))
    with pytest.raises(ConfigError, match=r"params.rounds: Input should be greater than or equal to 1"):
        resolve("e0", {"params": {"rounds": 0}})


@pytest.mark.parametrize("arrival", [{"kind": "closed", "concurrency": 2}, {"kind": "poisson", "rate": 5.0}])
def test_e0_round_slices_send_every_request_once_per_repeat(arrival):
    from workloads.requests import synthetic_requests

    cfg = resolve("e0", {"workload": {"num_requests": 11, "warmup_requests": 2, "arrival": arrival}, "params": {"rounds": 3}})
    cells = plan_cells(cfg)
    full = synthetic_requests(cfg.workload, 97, cfg.seed)
    whole = {r.request_id: r for r in full if not r.warmup}
    sent: dict[int, list[str]] = {0: [], 1: []}
    for c in cells:
        reqs = c.build_requests(97, cfg.seed)
        assert len(reqs) == c.num_requests
        assert reqs[:2] == full[:2], "every round warms up the same way"
        part = [r for r in reqs if not r.warmup]
        assert [r.prompt_token_ids for r in part] == [whole[r.request_id].prompt_token_ids for r in part]
        if part[0].t_scheduled is not None:  # open loop: a round's schedule starts with its first request
            assert part[0].t_scheduled == 0.0
            assert part[-1].t_scheduled == pytest.approx(whole[part[-1].request_id].t_scheduled - whole[part[0].request_id].t_scheduled)
        sent[c.labels["repeat"]] += [r.request_id for r in part]
    # Every measured request in exactly one round of each repeat, under the same ids in both repeats.
    assert sent[0] == sent[1] == list(whole)
    assert [len([r for r in c.build_requests(97, cfg.seed) if not r.warmup]) for c in cells] == [3, 3, 4, 4, 4, 4]


def test_e1_grid_at_concurrency_one():
    cells = plan_cells(resolve("e1", {"params": {"input_lens": [10, 20], "output_lens": [3, 4, 5]}}))
    assert len(cells) == 6 and len({c.cell_id for c in cells}) == 6
    for c in cells:
        assert c.workload.arrival == ClosedLoop(concurrency=1)
        assert c.workload.input_len.value == c.labels["input_len"] and c.workload.output_len.value == c.labels["output_len"]


def _outcome(plan, attainment=1.0, rps=10.0, target=0.9, ok=True):
    metrics = {"slo_attainment": attainment, "request_throughput_rps": rps, "slo": {"attainment": target}}
    return CellOutcome(plan.cell_id, plan.labels, ok, None if ok else "boom", metrics if ok else None)


def test_e2_rounds_capacity_then_sweep_then_bisection():
    cfg = resolve(
        "e2",
        {
            "params": {
                "concurrencies": [1, 4],
                "rate_fractions": [0.5, 1.0],
                "burstiness": [1.0, 0.5],
                "search": {"low_fraction": 0.5, "high_fraction": 2.0, "resolution_fraction": 0.1, "max_probes": 3},
            }
        },
    )
    track, params = get_track("e2"), get_track("e2").params_model.model_validate(cfg.params)
    first = plan_cells(cfg)
    assert [c.cell_id for c in first] == ["closed-c1", "closed-c4"]
    done = {c.cell_id: _outcome(c, rps=r) for c, r in zip(first, (4.0, 10.0), strict=True)}
    sweep = track.next_cells(cfg.workload, params, done)
    assert {c.cell_id for c in sweep} == {"poisson-r5", "poisson-r10", "gamma0.5-r5", "gamma0.5-r10"}
    assert {type(c.workload.arrival) for c in sweep} == {Poisson, Gamma}
    # The sweep alone: the search waits for it to finish.
    assert track.next_cells(cfg.workload, params, done) == sweep
    true_rate = 13.0
    for c in sweep:
        done[c.cell_id] = _outcome(c, attainment=1.0 if c.labels["rate"] <= true_rate else 0.5)
    rounds = []
    while True:
        new = [c for c in track.next_cells(cfg.workload, params, done) if c.cell_id not in done]
        if not new:
            break
        rounds.append([c.cell_id for c in new])
        for c in new:
            assert c.labels["phase"] == "search" and c.labels["arrival"] == "poisson"
            done[c.cell_id] = _outcome(c, attainment=1.0 if c.labels["rate"] <= true_rate else 0.5)
    # Sweep gave passing 10 (Poisson); search probes high = 20 first, then bisects 10..20; bounded by max_probes = 3.
    assert rounds == [["search-poisson-r20"], ["search-poisson-r15"], ["search-poisson-r12.5"]]


def test_e2_failed_probe_stops_the_search():
    cfg = resolve("e2", {"params": {"concurrencies": [], "rates": [], "search": {"low": 1, "high": 9, "resolution": 0.5}}})
    track, params = get_track("e2"), get_track("e2").params_model.model_validate(cfg.params)
    assert plan_cells(cfg) == []
    done = {}
    ends = track.next_cells(cfg.workload, params, done)
    assert [c.labels["rate"] for c in ends] == [1.0, 9.0]
    done.update({c.cell_id: _outcome(c, attainment=1.0 if c.labels["rate"] < 5 else 0.0) for c in ends})
    mid = track.next_cells(cfg.workload, params, done)
    assert [c.cell_id for c in mid] == ["search-poisson-r5"]
    done["search-poisson-r5"] = _outcome(mid[0], ok=False)
    again = [c for c in track.next_cells(cfg.workload, params, done) if c.cell_id not in done]
    assert again == [], "a failed probe is not re-run and the search ends"


def test_e2_needs_capacity_or_absolute_rates():
    with pytest.raises(ConfigError, match=r"params: .*concurrencies is empty"):
        resolve("e2", {"params": {"concurrencies": []}})
    with pytest.raises(ConfigError, match=r"params.search: .*low \(5.0\) must be < high"):
        resolve("e2", {"params": {"search": {"low": 5, "high": 2, "resolution": 1}}})


def test_e4_cells_carry_prompts_answers_and_provenance():
    cfg = resolve("e4", {"params": {"datasets": [{"family": "gsm8k", "n": 5, "max_tokens": 7}, {"family": "mmlu", "n": 3}]}})
    g, m = plan_cells(cfg)
    assert (g.cell_id, m.cell_id) == ("gsm8k", "mmlu") and g.tokenizer == "byt5"
    measured = [r for r in g.requests if not r.warmup]
    assert len(measured) == 5 and all(r.max_tokens == 7 for r in g.requests)
    assert all(r.meta["scorer"] == "exact_match" and r.meta["answer"].isdigit() for r in measured)
    assert [r.meta["item_id"] for r in measured] == g.provenance["dataset_subset"]["ids"]
    assert g.workload.num_requests == 5 and g.workload.warmup_requests == cfg.workload.warmup_requests
    assert max(max(r.prompt_token_ids) for r in g.requests) < 259
    assert m.requests[-1].max_tokens == 4 and m.requests[-1].meta["scorer"] == "multiple_choice"
    # The cell hash covers the prompts: another template is another cell.
    other = plan_cells(resolve("e4", {"params": {"datasets": [{"family": "gsm8k", "n": 5, "max_tokens": 7, "template": "{question}"}]}}))[0]
    assert cell_hash(cfg, g) != cell_hash(cfg, other)


def test_e4_bad_dataset_source_is_a_config_error():
    with pytest.raises(ConfigError, match=r"params.datasets\[0\].source: no such file"):
        plan_cells(resolve("e4", {"params": {"datasets": [{"family": "gsm8k", "n": 5, "source": "/nope.jsonl"}]}}))
    with pytest.raises(ConfigError, match=r"workload.arrival: E4 sends dataset items closed loop"):
        plan_cells(resolve("e4", {"workload": {"arrival": {"kind": "poisson", "rate": 2}}}))


def test_e5_grid_holds_each_wave_at_once():
    cells = plan_cells(resolve("e5", {"params": {"contexts": [100, 200], "concurrencies": [1, 3], "output_len": 4}}))
    assert [c.cell_id for c in cells] == ["ctx100-c1", "ctx100-c3", "ctx200-c1", "ctx200-c3"]
    c = cells[1]
    assert c.workload.num_requests == 3 and c.workload.arrival == ClosedLoop(concurrency=3)
    assert c.workload.input_len.value + c.workload.output_len.value == 100 and c.engine_overrides == {"max_batch_size": 3}
    with pytest.raises(ConfigError, match=r"params: .*leave no prompt"):
        resolve("e5", {"params": {"contexts": [4], "output_len": 4}})


def test_e6_ladder_yarn_per_rung_and_exact_prompt_lengths():
    cfg = resolve("e6", {"params": {"native_context": 300, "multipliers": [1, 2, 4], "depths": [0.2, 0.8], "samples_per_depth": 2}})
    cells = plan_cells(cfg)
    assert [c.labels["context"] for c in cells] == [300, 600, 1200]
    assert "hf_overrides" not in cells[0].engine_overrides
    for c, m in zip(cells[1:], (2, 4), strict=True):
        rope = c.engine_overrides["hf_overrides"]["rope_parameters"]
        assert rope == {"rope_type": "yarn", "factor": float(m), "original_max_position_embeddings": 300, "rope_theta": 1e6}
        assert c.engine_overrides["max_model_len"] == 300 * m
    for c in cells:
        assert {len(r.prompt_token_ids) + r.max_tokens for r in c.requests} == {c.labels["context"]}
        assert len([r for r in c.requests if not r.warmup]) == 4
    with pytest.raises(ConfigError, match=r"params.depths.0: Input should be less than or equal to 1"):
        resolve("e6", {"params": {"depths": [1.5]}})


def test_a_cell_without_engine_overrides_runs_the_configs_engine():
    cfg = resolve("e1", {"params": {"input_lens": [10, 20], "output_lens": [3]}})
    assert all(cell_engine(cfg, c) is cfg.engine for c in plan_cells(cfg)), "no copy validated per call"
    cfg = resolve("e6", {"params": {"native_context": 300, "multipliers": [1, 2], "depths": [0.5], "samples_per_depth": 1}})
    assert [cell_engine(cfg, c).max_model_len for c in plan_cells(cfg)] == [300, 600], "a cell's own engine settings still apply"
