"""The report as a reader meets it: verdict and headline first, workload and SLOs, readable units,
percentile curves, a timeline per cell, colours that mean the same series in every panel."""

import re

import pandas as pd
import yaml

from analysis.packet import load_packet, write_json, write_parquet
from analysis.plots import colours, latency_cdfs
from analysis.report import MAX_CURVES, lockstep_note, render_markdown, sections, spread_cells
from analysis.summary import build_summary
from analysis.tracks.e2 import E2Analysis, offered_vs_achieved, points
from analysis.tracks.e3 import by_burst, counts_text, evidence

CONFIG = {
    "track": "e0",
    "seed": 7,
    "workload": {
        "num_requests": 6,
        "warmup_requests": 2,
        "input_len": {"kind": "uniform", "low": 16, "high": 128},
        "output_len": {"kind": "fixed", "value": 3},
        "arrival": {"kind": "closed", "concurrency": 4},
    },
    "slo": {"ttft_s": 0.5, "tpot_s": 0.05, "e2e_s": None, "attainment": 0.9},
    "params": {"repeats": 2, "tolerance": 0.25},
}


def _rows(cell, n=6, warm=2, slow=1.0):
    rows = []
    for i in range(warm + n):
        t0 = 0.1 * i
        rows.append(
            {
                "run_id": "r",
                "cell_id": cell,
                "request_id": f"q{i}",
                "serving_mode": "aggregated",
                "engine": "reference",
                "warmup": i < warm,
                "ok": True,
                "error": None,
                "input_tokens": 16 + i,
                "output_tokens": 3,
                "t_scheduled": t0,
                "t_sent": t0,
                "t_first_token": t0 + 0.02 * slow,
                "t_last_token": t0 + 0.06 * slow,
                "ttft_s": 0.02 * slow,
                "tpot_s": 0.02 * slow,
                "e2e_s": 0.06 * slow,
                "queue_delay_s": 0.0,
                "itl_s": [0.02 * slow, 0.02 * slow],
                "server_queue_s": 0.0,
                "prefill_s": 0.01,
                "transfer_s": None,
                "first_decode_s": 0.005,
                "output_token_ids": [1, 2, 3],
            }
        )
    return rows


def packet(tmp_path, track="e0", n_cells=2):
    names = [f"rep{i}" for i in range(n_cells)]
    df = pd.DataFrame([r for i, c in enumerate(names) for r in _rows(c, slow=1 + 0.1 * i)])
    cells = {
        c: {
            "status": "ok",
            "serving_mode": "aggregated",
            "config_hash": "h",
            "labels": {"repeat": i},
            "host_load": {
                "cores": 2,
                "wall_s": 5.0,
                "load_avg_1m": 1.5,
                "cpu_busy_percent": 80.0,
                "cpu_steal_percent": 0.0,
                "other_processes_cpu_percent": 20.0,
            },
        }
        for i, c in enumerate(names)
    }
    summary = build_summary(track, "r", "real", df, cells, CONFIG["slo"], CONFIG["params"])
    write_parquet(tmp_path / "requests.parquet", df)
    write_json(tmp_path / "summary.json", summary)
    write_json(
        tmp_path / "manifest.json",
        {
            "run_id": "r",
            "track": track,
            "evidence": "real",
            "engine": "reference",
            "status": "complete",
            "serving_modes": ["aggregated"],
            "model": {"name": "tiny"},
        },
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "track": track}))
    return load_packet(tmp_path)


def test_headline_and_workload_come_first_with_readable_units(tmp_path):
    p = packet(tmp_path)
    md = render_markdown(p, sections(p))
    order = [md.index(t) for t in ("## Headline", "## Workload and SLOs", "## Cells", "## Run", "| run id |", "## E0 verdict")]
    assert order == sorted(order), "verdict and workload before the run facts and the cells"
    head = md[md.index("## Headline") : md.index("## Workload")]
    assert "| verdict | reproducible |" in head and "correctness" in head and "host load" in head
    for text in (
        "uniform 16–128",
        "closed loop, 4 concurrent users",
        "≤ 500 ms",
        "≤ 50 ms",
        "| SLO: E2E | not checked |",
        "| warm-up requests per cell | 2 (sent first",
        "| attainment target (max-rate goodput) | 90.0% |",
        "| seed | 7 |",
    ):
        assert text in md, text
    cells = md[md.index("## Cells") : md.index("## Host load")]
    assert "TTFT p50 (ms)" in cells and "| 20 |" in cells and "| 22.0 |" in cells and "100%" in cells and "| 6/6 |" in cells
    assert "Small samples (every cell has 6 measured requests)" in cells
    assert "users in lockstep" in cells and "Users in lockstep differ" not in cells  # sends 100 ms apart: 0%, no note
    load = md[md.index("## Host load") : md.index("## Run")]
    assert "| rep0 | 2 | 1.50 | 80% | 0.0% | 20% |" in load
    assert not re.search(r"\bnan\b|\bNone\b|\{'", md)


def test_lockstep_note_only_where_like_cells_settled_in_different_regimes():
    def summary(**shares):
        return {"cells": {c: {"metrics": {"schedule": {"lockstep_share": s}}} for c, s in shares.items()}}

    note = lockstep_note(summary(waves=0.78, mid=0.5, spread=0.12, open_loop=None), "e3")
    assert note is not None and note.startswith("Users in lockstep differ between cells: waves 78% of its measured")
    assert "spread 12% (the Cells table" in note and "open_loop" not in note and "mid" not in note
    assert lockstep_note(summary(a=1.0, b=0.9), "e0") is None  # every cell in waves: alike, comparable
    assert lockstep_note(summary(a=0.12, b=0.25, c=None), "e3") is None
    assert lockstep_note(summary(c=None), "e3") is None
    # A sweep's cells differ on purpose (one user is never in a wave, 64 often are): no note.
    assert lockstep_note(summary(c1=0.0, c64=0.67), "e2") is None


def test_e3_ttft_by_how_many_users_sent_together():
    # One cell: a wave of 4 (sent 1 ms apart) whose transfers queued, then 2 alone; one failed wave request.
    sends = [0.0, 0.001, 0.002, 0.003, 1.0, 2.0]
    df = pd.DataFrame(
        {
            "cell_id": "d",
            "t_sent": sends,
            "ok": [True, True, True, False, True, True],
            "ttft_s": [0.40, 0.42, 0.44, None, 0.10, 0.12],
            "prefill_s": [0.13, 0.13, 0.13, None, 0.04, 0.04],
            "transfer_s": [0.17, 0.19, 0.21, None, 0.03, 0.05],
        }
    )
    t = by_burst(df).set_index("sent")
    assert t.loc["alone", "requests"] == 2 and t.loc["alone", "TTFT p50 (ms)"] == "110" and t.loc["alone", "transfer p50 (ms)"] == "40"
    wave = t.loc["4+ together (a wave)"]
    assert wave["requests"] == 3 and wave["TTFT p50 (ms)"] == "420" and wave["transfer p50 (ms)"] == "190"
    assert "2–3 together" not in t.index  # no such burst: no row


def test_percentile_curves_and_a_timeline_for_every_cell(tmp_path):
    p = packet(tmp_path)
    secs = {s.title: s for s in sections(p)}
    cdf = secs["Latency percentiles"].figures[0]
    titles = [a.text for a in cdf.layout.annotations]
    assert titles == ["TTFT (ms)", "TPOT (ms)", "ITL (every gap between tokens) (ms)", "E2E (ms)"]
    itl = [t for t in cdf.data if t.xaxis == "x3"]
    assert [t.name for t in itl] == ["rep0", "rep1"] and len(itl[0].x) == 12, "every gap of the 6 measured requests"
    assert max(itl[0].y) == 100
    assert [f.layout.title.text.split(",")[1].split("(")[0].strip() for f in secs["Request timelines"].figures] == [
        "cell rep0",
        "cell rep1",
    ]


def test_a_series_keeps_its_colour_in_every_panel(tmp_path):
    p = packet(tmp_path)
    fig = latency_cdfs(p.requests)
    by_name: dict[str, set] = {}
    for t in fig.data:
        by_name.setdefault(t.name, set()).add(t.line.color)
    assert all(len(c) == 1 for c in by_name.values()) and len({next(iter(c)) for c in by_name.values()}) == 2
    assert colours(["b", "a"]) == colours(["a", "b", "a"])
    # Each panel (TTFT, TPOT, ITL, E2E) holds one curve per cell, on its own axes; the legend lists each cell once.
    assert [(t.xaxis, t.yaxis) for t in fig.data] == [(f"x{i or ''}", f"y{i or ''}") for i in (0, 0, 2, 2, 3, 3, 4, 4)]
    assert [t.showlegend for t in fig.data] == [True, True] + [False] * 6


def test_many_cells_draw_a_bounded_number_of_curves_and_say_which(tmp_path):
    p = packet(tmp_path, n_cells=MAX_CURVES + 6)
    secs = {s.title: s for s in sections(p)}
    cdf, tput = secs["Latency percentiles"], secs["Throughput"]
    drawn = {t.name for t in cdf.figures[0].data}
    assert len(drawn) == MAX_CURVES and {t.name for t in tput.figures[0].data} == drawn
    assert len([t for t in cdf.figures[0].data if t.xaxis == "x"]) == MAX_CURVES, "one curve per drawn cell in each panel"
    slowest, fastest = f"rep{MAX_CURVES + 5}", "rep0"  # the least and the most loaded (request rate) are kept
    assert {slowest, fastest} <= drawn
    note = cdf.text[1]
    assert f"This run has {MAX_CURVES + 6} cells" in note and "The other 6 cells are left out" in note
    assert all(c in note for c in drawn) and "same cells" in tput.text[0]
    md = render_markdown(p, sections(p))
    assert note in md
    # A run of few cells draws every cell and says nothing more (test_percentile_curves_and_a_timeline_for_every_cell).
    few = {s.title: s for s in sections(packet(tmp_path / "few"))}
    assert len(few["Latency percentiles"].text) == 1 and few["Throughput"].text == []


def test_timelines_sample_many_cells_across_the_load_range():
    cells = {f"c{i}": {"metrics": {"request_throughput_rps": float(i)}} for i in range(10)}
    picked = spread_cells({"cells": cells}, sorted(cells), 6)
    assert len(picked) == 6 and picked[0] == "c0" and picked[-1] == "c9"


def test_e2_colours_offered_vs_achieved_and_no_raw_names():
    cells = {}
    for series, b in (("poisson", 1.0), ("gamma0.25", 0.25)):
        for r in (2.0, 4.0):
            cells[f"{series}-r{r}"] = {
                "status": "ok",
                "labels": {"phase": "sweep", "arrival": series, "rate": r, "burstiness": b},
                "metrics": {
                    "request_throughput_rps": r * 0.9,
                    "output_token_throughput_tps": r * 10,
                    "ttft_s": {"p99": 0.1 * r},
                    "tpot_s": {"p50": 0.01 * r},
                    "slo_attainment": 1 / r,
                    "goodput_rps": r / 2,
                    "slo": {"attainment": 0.9},
                },
            }
    cells["closed-c1"] = {
        "status": "ok",
        "labels": {"phase": "closed", "concurrency": 1},
        "metrics": {
            "request_throughput_rps": 3.0,
            "output_token_throughput_tps": 30.0,
            "ttft_s": {"p99": 0.1},
            "tpot_s": {"p50": 0.01},
            "slo_attainment": 1.0,
            "goodput_rps": 3.0,
        },
    }
    a = E2Analysis()
    summary = {"cells": cells, "verdicts": a.verdicts(pd.DataFrame(), cells, {"search": {"enabled": False}})}
    req = pd.DataFrame([{"cell_id": c, "warmup": False, "t_sent": i / 2.0} for c in cells for i in range(5)])
    secs = {s.title: s for s in a.sections(req, summary)}
    by_name: dict[str, set] = {}
    for title in ("E2: throughput–latency", "E2: SLO attainment vs rate", "E2: offered vs achieved load"):
        for t in secs[title].figures[0].data:
            if t.name != "achieved = offered":
                by_name.setdefault(t.name.split(" ")[0], set()).add(t.marker.color)
    assert set(by_name) == {"closed", "poisson", "gamma0.25"}
    assert all(len(c) == 1 for c in by_name.values()), "a series has one colour in every panel of every figure"
    load = offered_vs_achieved(points(cells), req)
    assert list(load["sent (req/s)"]) == [2.0] * 4 and list(load["offered (req/s)"]) == [2.0, 4.0, 2.0, 4.0]
    goodput = secs["E2: goodput"].table
    assert "slo_attainment" not in goodput.columns and set(goodput["SLO attainment"]) == {"50.0%", "25.0%"}
    assert "E2: offered vs achieved load" in secs


def test_e3_evidence_is_prose_and_counts_explain_the_warm_up():
    req = pd.DataFrame([{"serving_mode": m, "warmup": i < 2} for m in ("aggregated", "disaggregated") for i in range(8)])
    assert counts_text(req) == "aggregated 8 (2 warm-up + 6 measured), disaggregated 8 (2 warm-up + 6 measured)"
    assert (
        evidence({"requests_compared": 8, "mismatches": [], "missing": []}, {}) == "8 requests compared (warm-up included); all identical"
    )
    assert (
        evidence({"aggregated": 0, "disaggregated": 1}, {"aggregated": 8, "disaggregated": 8})
        == "aggregated: 0 failed of 8, disaggregated: 1 failed of 8"
    )
    assert evidence({"exact": 6, "within_padding": 2, "outside": 0}, {}) == "6 exact, 2 within block padding, 0 outside"


def test_cells_sort_by_the_numbers_in_their_ids():
    from analysis.headline import cell_rows

    cells = {c: {"status": "ok", "metrics": {}} for c in ("poisson-r26.88", "poisson-r8.961", "closed-c16", "closed-c4", "poisson-r17.92")}
    assert list(cell_rows({"cells": cells})["cell"]) == ["closed-c4", "closed-c16", "poisson-r8.961", "poisson-r17.92", "poisson-r26.88"]


def test_run_facts_count_engine_starts_and_each_cells_wall(tmp_path):
    p = packet(tmp_path)
    p.manifest["engine_pool"] = {"reuse": True, "engine_starts": 1, "cells_on_warm_engines": 1}
    p.manifest["cells"] = {
        "rep0": {"wall_s": 97.48, "engine": "fresh", "setup_s": 61.04},
        "rep1": {"wall_s": 19.5, "engine": "reused"},
        "rep2": {"wall_s": 36.0, "engine": "reused", "queued_s": 17.2, "gap_s": 0.4},  # its call waited behind rep1's load
    }
    md = render_markdown(p, sections(p))
    assert "| engine starts | 1 (1 cells on warm engines; warm engines reused) |" in md
    p.manifest["engine_pool"] |= {"depth": 2, "cells_queued": 1}
    md = render_markdown(p, sections(p))
    queued = "warm engines reused, the next cell's call queued behind the running one (1 cells)"
    assert f"| engine starts | 1 (1 cells on warm engines; {queued}) |" in md
    rep2 = "rep2 36.0 s (reused, 17.2 s of it queued, engine idle 0.40 s before its load)"
    assert f"| cell wall times | rep0 97.5 s (fresh, 61.0 s to start it), rep1 19.5 s (reused), {rep2} |" in md


def test_run_facts_leave_out_engine_starts_when_the_manifest_has_none(tmp_path):
    md = render_markdown(packet(tmp_path), sections(packet(tmp_path)))
    assert "engine starts" not in md and "cell wall times" not in md
