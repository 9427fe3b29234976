"""The max-rate goodput search, on monotone attainment laws with known answers."""

import pytest

from workloads.search import bracket, next_rates, round_rate


def run_search(true_rate: float, low: float, high: float, resolution: float, max_probes: int = 50):
    points: dict[float, bool] = {}
    rounds = 0
    while True:
        todo = next_rates(points, low, high, resolution)
        if not todo or len(points) >= max_probes:
            return bracket(points), points, rounds
        rounds += 1
        for r in todo:
            points[r] = r <= true_rate


@pytest.mark.parametrize("true_rate", [2.3, 5.0, 7.77, 9.9])
def test_bisection_brackets_the_true_rate_within_one_step(true_rate):
    b, _points, _ = run_search(true_rate, low=1.0, high=10.0, resolution=0.25)
    assert b.status == "bracketed"
    assert b.passing <= true_rate < b.failing
    assert b.width <= 0.25 and abs(b.passing - true_rate) <= 0.25


def test_probe_count_is_logarithmic():
    _, points, rounds = run_search(4.2, low=1.0, high=33.0, resolution=0.5)
    # 2 ends, then ceil(log2(32 / 0.5)) = 6 midpoints.
    assert len(points) == 8 and rounds == 7


def test_out_of_range_answers_stop_after_the_end_probe():
    b, points, _ = run_search(0.5, low=1.0, high=10.0, resolution=0.1)
    assert b.status == "below_range" and b.failing == 1.0 and b.passing is None and set(points) == {1.0, 10.0}
    b, points, _ = run_search(50.0, low=1.0, high=10.0, resolution=0.1)
    assert b.status == "above_range" and b.passing == 10.0 and set(points) == {1.0, 10.0}


def test_sweep_points_shorten_the_search():
    # A sweep already bracketed the answer between 4 and 6: no end probes, bisection inside.
    sweep = {2.0: True, 4.0: True, 6.0: False, 8.0: False}
    assert next_rates(sweep, 1.0, 10.0, 0.5) == [5.0]
    # Everything the sweep measured missed, and low is below it: probe low.
    assert next_rates({4.0: False, 6.0: False}, 1.0, 10.0, 0.5) == [1.0]


def test_non_monotone_points_are_ignored_conservatively():
    b = bracket({1.0: True, 2.0: False, 3.0: True, 4.0: False})
    assert (b.passing, b.failing, b.non_monotone) == (1.0, 2.0, (3.0,))


def test_bounds_are_validated_and_rates_rounded():
    with pytest.raises(ValueError, match="0 < low < high"):
        next_rates({}, 5.0, 5.0, 0.1)
    assert round_rate(13.912345) == 13.91 and round_rate(0.123456) == 0.1235
    assert next_rates({}, 1.00001, 9.99999, 0.1) == [1.0, 10.0]


def test_the_report_brackets_the_same_rates_the_search_passed_and_failed():
    """One pass rule (workloads.search.meets_target) for the search and the report: the same
    probes give the same bracket, including a probe exactly at the target."""
    import pandas as pd

    from analysis.tracks.e2 import max_rate_goodput
    from workloads.tracks import CellOutcome
    from workloads.tracks.e2 import probe_points

    attained = {1.0: 0.95, 2.0: 0.9, 4.0: 0.5}  # 0.9 is exactly the target: it passes in both
    done = {
        f"c{r}": CellOutcome(
            f"c{r}", {"phase": "search", "burstiness": 1.0, "rate": r}, True, None, {"slo_attainment": a, "slo": {"attainment": 0.9}}
        )
        for r, a in attained.items()
    }
    search = bracket(probe_points(done, 1.0))
    df = pd.DataFrame(
        [{"phase": "search", "burstiness": 1.0, "status": "ok", "rate": r, "slo_attainment": a, "target": 0.9} for r, a in attained.items()]
    )
    report = max_rate_goodput(df, {}, gpus=1)  # no params: the track's own search defaults
    assert report is not None
    assert (
        (report["rate_rps"], report["first_failing_rps"], report["status"])
        == (search.passing, search.failing, search.status)
        == (2.0, 4.0, "bracketed")
    )
