import ray

from actors.telemetry import TelemetrySampler, sample


def test_sample_without_gpu_still_reports_cpu():
    rows = sample("n1", [])
    assert rows[0]["node_id"] == "n1" and rows[0]["gpu"] is None
    assert 0.0 <= rows[0]["cpu_percent"] <= 100.0 * 64 and rows[0]["host_mem_used_bytes"] > 0


def test_sampler_actor_collects_until_stopped(ray_local):
    import time

    s = TelemetrySampler.remote(interval_s=0.05)
    node = ray.get(s.start.remote())
    time.sleep(0.4)
    rows = ray.get(s.stop.remote())
    ray.kill(s)
    assert len(rows) >= 3 and {r["node_id"] for r in rows} == {node}
    times = [r["t_wall"] for r in rows]
    assert times == sorted(times)
