import numpy as np
import pytest

from workloads.arrivals import ClosedLoop, Gamma, Poisson, schedule
from workloads.lengths import Fixed, NormalClipped, Uniform
from workloads.requests import WorkloadSpec, synthetic_requests


def spec(**kw):
    return WorkloadSpec(
        num_requests=kw.pop("n", 50),
        warmup_requests=kw.pop("warm", 3),
        input_len=kw.pop("input_len", Uniform(low=4, high=40)),
        output_len=kw.pop("output_len", NormalClipped(mean=20, std=5, min=1, max=30)),
        arrival=kw.pop("arrival", Poisson(rate=5.0)),
    )


def test_same_seed_same_stream_and_other_seed_differs():
    a = synthetic_requests(spec(), vocab_size=1000, seed=11)
    b = synthetic_requests(spec(), vocab_size=1000, seed=11)
    c = synthetic_requests(spec(), vocab_size=1000, seed=12)
    assert a == b
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in c]


def test_changing_arrivals_keeps_prompts():
    a = synthetic_requests(spec(arrival=Poisson(rate=5.0)), vocab_size=1000, seed=1)
    b = synthetic_requests(spec(arrival=ClosedLoop(concurrency=2)), vocab_size=1000, seed=1)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert all(r.t_scheduled is None for r in b)


def test_warmup_first_and_flagged_and_unscheduled():
    reqs = synthetic_requests(spec(warm=3), vocab_size=100, seed=0)
    assert [r.warmup for r in reqs[:4]] == [True, True, True, False]
    assert all(r.t_scheduled is None for r in reqs[:3])
    assert reqs[3].t_scheduled == 0.0
    assert len({r.request_id for r in reqs}) == len(reqs)


def test_lengths_respect_distributions():
    reqs = synthetic_requests(spec(n=500), vocab_size=100, seed=3)
    ins = [len(r.prompt_token_ids) for r in reqs]
    outs = [r.max_tokens for r in reqs]
    assert min(ins) >= 4 and max(ins) <= 40
    assert min(outs) >= 1 and max(outs) <= 30
    assert abs(np.mean(outs) - 20) < 1.0
    assert all(0 <= t < 100 for r in reqs for t in r.prompt_token_ids)
    fixed = synthetic_requests(spec(input_len=Fixed(value=7)), vocab_size=100, seed=3)
    assert {len(r.prompt_token_ids) for r in fixed} == {7}


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_mean_interarrival(rate):
    """Mean gap over many draws within 3 standard errors of 1/rate; CV ≈ 1 (exponential)."""
    rng = np.random.default_rng(42)
    t = schedule(Poisson(rate=rate), 20001, rng)
    gaps = np.diff(t)
    se = (1 / rate) / np.sqrt(gaps.size)
    assert abs(gaps.mean() - 1 / rate) < 3 * se
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05


@pytest.mark.parametrize("burst", [0.25, 1.0, 4.0])
def test_gamma_mean_rate_and_burstiness(burst):
    rng = np.random.default_rng(7)
    gaps = np.diff(schedule(Gamma(rate=2.0, burstiness=burst), 40001, rng))
    assert abs(gaps.mean() - 0.5) < 0.02
    # CV of a gamma with shape k is 1/sqrt(k): smaller burstiness, burstier traffic.
    assert abs(gaps.std() / gaps.mean() - 1 / np.sqrt(burst)) < 0.06


def test_schedule_starts_at_zero_and_increases():
    t = schedule(Poisson(rate=3.0), 100, np.random.default_rng(0))
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert schedule(ClosedLoop(concurrency=3), 10, np.random.default_rng(0)) is None


def test_packed_requests_travel_as_bytes_and_unpack_to_the_same_requests():
    """A queued cell's requests cross Ray as one blob (workloads/requests.py PackedRequests): unpickling
    the wrapper, as Ray does on arrival, leaves them bytes; only `unpack`, at the cell's turn, rebuilds them."""
    import pickle

    from workloads.requests import PackedRequests, RequestSpec

    reqs = [RequestSpec("r0", (1, 2, 3), 4, warmup=True), RequestSpec("r1", (5, 6), 2, t_scheduled=0.5, meta={"answer": "x"})]
    arrived = pickle.loads(pickle.dumps(PackedRequests.of(reqs)))
    assert isinstance(arrived.blob, bytes)
    assert arrived.unpack() == reqs
