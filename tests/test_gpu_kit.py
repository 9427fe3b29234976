"""The GPU kit: the pinned set is closed, batches fit a call, the device-side install works, and
the import check names what is missing."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from cluster.gpu_kit import closure
from cluster.gpu_kit.check import report, run_checks
from cluster.gpu_kit.pack import first_fit_decreasing, pack

KIT = Path(closure.__file__).parent


def test_pinned_wheels_cover_ray_serve_and_the_vllm_cli():
    """Declared requirements from ray[serve], vllm and pdbench's imports, markers evaluated for the
    machine, are all met by the image or the kit, less what left-out.txt explains."""
    assert closure.gaps() == []
    kit = closure.carried()
    # What the GPU node was found lacking (issue 11): Ray Serve's and `vllm serve`'s imports.
    for name in (
        "grpcio-reflection",
        "aiohttp-cors",
        "colorful",
        "opencensus",
        "opencensus-context",
        "opentelemetry-sdk",
        "smart-open",
        "virtualenv",
        "py-spy",
        "uvicorn",
        "model-hosting-container-standards",
        "httpx-sse",
        "plotly",
    ):
        assert name in kit, name
    assert kit["aiohttp"] >= Version("3.14.4") > closure.image()["aiohttp"]  # ray[serve] needs newer than the image's
    text = (KIT / "wheels.txt").read_text().splitlines()
    pins = [ln for ln in text if ln and not ln.startswith("#")]
    assert all("--hash=sha256:" in ln for ln in pins) and len(pins) == len(kit)


def test_gaps_follow_extras_markers_and_versions():
    kit = {"a": Version("1.0"), "b": Version("2.0")}
    img = {"c": Version("0.9")}
    reqs = {
        "a": (Version("1.0"), ['b>=2; extra == "x"', "c>=1", 'd; python_version < "3.10"', 'e; extra == "y"']),
        "b": (Version("2.0"), []),
    }
    found = {g.requirement: g.problem for g in closure.gaps(("a[x]",), kit, img, reqs, {})}
    assert found == {"c>=1": "the image has 0.9"}  # d: not for 3.12; e: extra not asked
    found = {g.requirement: g.problem for g in closure.gaps(("a[x,y]",), kit, img, reqs, {"c": "why"})}
    assert found == {'e; extra == "y"': "in neither the image nor the kit"}
    found = closure.gaps(("b", "f"), kit, img, {}, {})
    assert {g.requirement for g in found} == {"b", "f"} and "not recorded in requires.txt" in str(found[0])
    stale = closure.gaps(("b",), kit, img, {"b": (Version("1.5"), [])}, {})
    assert [g.problem for g in stale] == ["carried as 2.0, but its requirements are recorded for 1.5 in requires.txt (run `requires`)"]


def test_batches_fit_and_big_wheels_are_cut():
    assert first_fit_decreasing({"a": 5, "b": 4, "c": 3, "d": 2}, 7) == [["a", "d"], ["b", "c"]]
    with pytest.raises(ValueError, match="bigger than a batch"):
        first_fit_decreasing({"a": 8}, 7)


def _wheel(dst: Path, name: str, payload: bytes = b"") -> Path:
    """A minimal real wheel: one module `name` that records VALUE, plus an optional filler."""
    files = {
        f"{name}.py": b"VALUE = 42\n",
        f"{name}_filler.bin": payload,
        f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v).digest()).rstrip(b'=').decode()},{len(v)}\n" for k, v in files.items()
    )
    files[f"{name}-1.0.dist-info/RECORD"] = (record + f"{name}-1.0.dist-info/RECORD,,\n").encode()
    path = dst / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_raw_batches_install_on_the_device_across_calls(tmp_path):
    """pack → one call per batch → install-on-device.sh stashes, then rebuilds, checks and installs."""
    whl = tmp_path / "repo" / ".whl"
    (whl / "dl").mkdir(parents=True)
    _wheel(whl / "dl", "kitsmall")
    _wheel(whl / "dl", "kitbig", os.urandom(300_000))  # incompressible: cut into parts
    packed = pack(whl, "raw", batch_mib=0.25)
    assert len(packed.batches) >= 2 and packed.wheels == 2
    assert all(sum(f.stat().st_size for f in b.iterdir()) <= 0.25 * 2**20 for b in packed.batches)
    env = {**os.environ, "KIT_STASH": str(tmp_path / "stash"), "KIT_TARGET": str(tmp_path / "site"), "PYTHON": sys.executable}
    script = KIT / "install-on-device.sh"
    for i, b in enumerate(sorted(packed.batches)):  # each call carries one batch; the tree is laid anew
        call = tmp_path / f"call{i}"
        (call / ".whl").mkdir(parents=True)
        b.rename(call / ".whl" / b.name)
        last = i == len(packed.batches) - 1
        p = subprocess.run(["bash", str(script), *(["--need-complete"] if last else [])], cwd=call, env=env, capture_output=True, text=True)
        if not last:
            assert p.returncode == 0 and "still missing" in p.stdout, p.stdout + p.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    assert "installed 2 wheels" in p.stdout and "export PYTHONPATH=" in p.stdout
    out = subprocess.run(
        [sys.executable, "-c", "import kitsmall, kitbig; print(kitsmall.VALUE + kitbig.VALUE)"],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "84"
    again = subprocess.run(["bash", str(script)], cwd=tmp_path / "call0", env=env, capture_output=True, text=True)
    assert "already installed" in again.stdout


def test_check_names_what_is_missing():
    results = run_checks(("json", "workloads.word_tokenizer", "no_such_module_for_gpu_kit"), cli=False)
    assert [r.ok for r in results] == [True, True, False]
    text = report(results)
    assert "missing module 'no_such_module_for_gpu_kit'" in text and "2/3 ok" in text


def test_batches_leave_room_for_the_tree_that_travels(tmp_path):
    """The batch size follows the tree: tracked and untracked-not-ignored files travel, ignored ones do not."""
    from cluster.gpu_kit.pack import batch_budget_mib, travelling_bytes

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text(".whl/\n")
    (repo / "tracked.bin").write_bytes(b"x" * 3 * 2**20)
    subprocess.run(["git", "-C", str(repo), "add", "tracked.bin", ".gitignore"], check=True)
    (repo / "new.bin").write_bytes(b"y" * 2**20)
    (repo / ".whl").mkdir()
    (repo / ".whl" / "big.whl").write_bytes(b"z" * 5 * 2**20)
    tree = travelling_bytes(repo)
    assert 4 * 2**20 <= tree < 4 * 2**20 + 100
    assert batch_budget_mib(tree) == 57.0  # 64 - 2 margin - (4 MiB + .gitignore), rounded down
    with pytest.raises(ValueError, match="too little room"):
        batch_budget_mib(60 * 2**20)
