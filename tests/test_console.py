"""The run's terminal output: plain progress lines off a terminal, Ray's records routed, and the closing summary."""

import io
import logging

from rich.console import Console

from cluster.console import RunDisplay, ray_logs_on, summary_tables
from cluster.rounds import CellState, RunProgress


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def test_plain_lines_per_cell_when_not_a_terminal():
    con, buf = _console()
    with RunDisplay(con, cells=2, requests=20, interval_s=0.0) as d:
        assert not d.live
        d.phase("starting an embedded Ray")
        d.update(RunProgress(0, 2, 0, 20, (CellState("rep0", "running", 0, 10), CellState("rep1", "waiting", 0, 10))))
        d.update(RunProgress(1, 2, 12, 20, (CellState("rep0", "ok", 10, 10), CellState("rep1", "running", 2, 10))))
    out = buf.getvalue()
    assert "starting an embedded Ray" in out
    assert "cell rep0 started" in out and "rep0: starting engines" in out and "cell rep0 ok" in out and "cell rep1 started" in out
    assert "cells 1/2, requests 12/20; rep1: running 2/10" in out
    assert "\x1b[" not in out, "no terminal escapes in a log file"


def test_ray_records_go_through_the_console_without_auth_advice():
    con, buf = _console()
    ray_logger = logging.getLogger("ray")
    before = list(ray_logger.handlers)
    with ray_logs_on(con):
        for h in ray_logger.handlers:  # what ray.init does to the handlers of its logger
            h.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
        logging.getLogger("ray._private.x").warning("node lost")
        logging.getLogger("ray._private.authentication").warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
        )
        logging.getLogger("ray._private.x").info("Started a local Ray instance.")
    out = buf.getvalue()
    assert "node lost" in out and " -- " not in out
    assert "RAY_AUTH_MODE" not in out and "Started a local Ray" not in out
    assert ray_logger.handlers == before


def test_closing_summary_has_headline_and_per_cell_numbers():
    summary = {
        "cells": {
            "rep0": {
                "status": "ok",
                "metrics": {
                    "requests": 48,
                    "completed": 48,
                    "request_throughput_rps": 4.25,
                    "output_token_throughput_tps": 136.0,
                    "ttft_s": {"p50": 0.0213, "p99": 0.0871},
                    "tpot_s": {"p50": 0.012, "p99": 0.02},
                    "itl_s": {"p50": 0.011, "p99": None},
                    "slo_attainment": 0.875,
                },
            }
        },
        "verdicts": {"verdict": "reproducible"},
    }
    con, buf = _console()
    for t in summary_tables(summary, {"track": "e0", "run_id": "e0-x", "status": "complete", "evidence": "real"}):
        con.print(t)
    out = buf.getvalue()
    assert "verdict" in out and "reproducible" in out and "complete (1/1 cells ok)" in out
    for text in ("TTFT p50 (ms)", "21.3", "87.1", "4.25", "136", "87.5%", "48/48", "–"):
        assert text in out, text
    assert "nan" not in out and "None" not in out
