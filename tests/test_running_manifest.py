"""The running manifest of a long sweep: rewritten by the file writer, every MANIFEST_EVERY_S at
most, and less often where its last write cost more than MANIFEST_BUDGET of a core."""

import asyncio
import json
import time

from cluster import driver as drv
from cluster.config import resolve
from cluster.driver import Driver, RunOptions


def test_the_running_manifest_is_rewritten_within_its_cpu_budget(tmp_path):
    d = Driver(resolve("e1", {"params": {"input_lens": [8, 16], "output_lens": [4]}}), RunOptions(out_dir=tmp_path, progress=False))
    d.run_dir.mkdir(parents=True)
    d.facts._nodes, d.facts._versions = [{"summary": "test host"}], {"pdbench": "test"}  # no Ray, no git here
    metas = {"in8-out4": {"cell_id": "in8-out4", "status": "ok"}}

    d._ran(metas)  # the first cell: written (by the writer thread), its cost kept
    asyncio.run(d.files.flush())
    m = json.loads((d.run_dir / "manifest.json").read_text())
    assert m["status"] == "running" and list(m["cells"]) == ["in8-out4"] and d._manifest_cost_s > 0

    submitted = []
    d.files.submit = lambda *job: submitted.append(job)  # type: ignore[method-assign]
    d._ran(metas)
    assert not submitted  # within MANIFEST_EVERY_S of the last one
    d._manifest_at, d._manifest_cost_s = time.monotonic() - 3 * drv.MANIFEST_EVERY_S, 0.001
    d._ran(metas)
    assert len(submitted) == 1  # cheap and due
    d._manifest_at, d._manifest_cost_s = time.monotonic() - 3 * drv.MANIFEST_EVERY_S, 4 * drv.MANIFEST_EVERY_S * drv.MANIFEST_BUDGET
    d._ran(metas)
    assert len(submitted) == 1  # due by the clock, but its cost stretches the interval to 4 × MANIFEST_EVERY_S
    d.files.close()
