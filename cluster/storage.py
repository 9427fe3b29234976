"""Where a run's packet lands: a local folder, or any `pyarrow.fs` URI (s3://, gs://, hdfs://,
file://, ...) such as storage shared by a cluster and a laptop.

The driver always writes the packet atomically into a local folder first. For a URI destination
that folder is a staging copy on the driver's node, and each finished cell (then the run-level
files) is copied up file by file: written under a temporary name, then moved into place, and
`cell.json` / `manifest.json` last, so a reader never sees a cell or a run before its data. If the
upload fails the run still has every byte in staging, whose path is printed.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from analysis.schemas import evidence_of

JOB_DEFAULT = "~/pdbench-runs"
# Ray sets this for the driver of a submitted job (ray.dashboard.modules.job.common).
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def is_uri(dest: str) -> bool:
    return "://" in dest


def default_out() -> str:
    """$PDBENCH_OUT; else, inside `ray job submit`, ~/pdbench-runs on the head node (the job's
    working directory is a copy Ray deletes later); else ./runs."""
    if os.environ.get("PDBENCH_OUT"):
        return os.environ["PDBENCH_OUT"]
    return JOB_DEFAULT if _RAY_JOB_ENV in os.environ else "runs"


def staging_root() -> Path:
    return Path(os.environ.get("PDBENCH_STAGING", Path.home() / ".cache" / "pdbench" / "staging"))


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"--out: {uri!r} is not a URI pyarrow.fs can open: {e}") from None


def _put(fs: pafs.FileSystem, local: Path, remote: str) -> None:
    """One file, all or nothing: write a temporary object, then move it onto its name."""
    parent, name = remote.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{name}.{secrets.token_hex(4)}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(local.read_bytes())
    fs.move(tmp, remote)


class Destination:
    """A runs folder (`--out`): local, or a URI with a local staging copy."""

    def __init__(self, out: str | Path):
        self.out = str(out)
        self.remote = is_uri(self.out)
        if self.remote:
            self.fs, self.root = _fs(self.out)
            self.root = self.root.rstrip("/")
            self.local_root = staging_root()
        else:
            self.local_root = Path(self.out).expanduser()

    def check_writable(self) -> None:
        """Refuse, naming --out, a runs folder that is a file or cannot be written, before anything runs."""
        root = self.local_root
        if root.exists() and not root.is_dir():
            raise ValueError(f"--out: {root} is a file, not a folder; give a folder for the runs (it is created if missing)")
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as e:
            what = "--out" if not self.remote else "PDBENCH_STAGING (the staging copy of a URI --out)"
            raise ValueError(f"{what}: cannot write to {root} ({e.strerror or e}); choose a folder you can write to") from None

    def local_dir(self, run_id: str) -> Path:
        return self.local_root / run_id

    def location(self, run_id: str) -> str:
        return f"{self.out.rstrip('/')}/{run_id}" if self.remote else str(self.local_dir(run_id))

    def _publish(self, run_dir: Path, rels: list[str]) -> None:
        if not self.remote:
            return  # already in place, written atomically
        for rel in rels:
            local = run_dir / rel
            if local.is_file():
                _put(self.fs, local, f"{self.root}/{run_dir.name}/{rel}")

    def publish_cell(self, run_dir: Path, cell_id: str) -> None:
        cell = run_dir / "cells" / cell_id
        rels = sorted(
            f"cells/{cell_id}/{p.name}" for p in cell.iterdir() if p.is_file() and p.name != "cell.json" and not p.name.startswith(".")
        )
        self._publish(run_dir, [*rels, f"cells/{cell_id}/cell.json"])

    def publish_run(self, run_dir: Path) -> None:
        """Top-level files; manifest.json last (its status says whether the run is complete)."""
        rels = sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."))
        self._publish(run_dir, [*rels, "manifest.json"])


def pull(src: str, dest: Path) -> Path:
    """Copy one run folder (a URI or a local path ending in the run id) into dest/<run-id>/.

    The last segment of SRC names the folder made under dest, so a `.`/`..` segment anywhere in
    SRC is refused (`.../run/..` would name dest's parent), and the target must lie inside dest."""
    segments = src.split("://", 1)[-1].replace("\\", "/").split("/")
    if any(seg in (".", "..") for seg in segments):
        raise ValueError(f"runs pull: {src} has a '.' or '..' segment; name the run folder itself (…/<run-id>)")
    fs, path = _fs(src) if is_uri(src) else (pafs.LocalFileSystem(), str(Path(src).expanduser().resolve()))
    path = path.rstrip("/")
    info = fs.get_file_info(f"{path}/manifest.json")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{src} is not a pdbench run folder (no manifest.json)")
    root = Path(dest).expanduser().resolve()
    target = root / path.rsplit("/", 1)[-1]
    if target.resolve().parent != root:
        raise ValueError(f"runs pull: {src} would be written outside --to {dest}; name the run folder itself")
    if root.exists() and not root.is_dir():
        raise ValueError(f"--to: {dest} is a file, not a folder; give a folder that receives <run-id>/")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--to: cannot write to {dest} ({e.strerror or e}); choose a folder you can write to") from None
    pafs.copy_files(path, str(target.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    for tmp in target.rglob(".*.tmp"):  # a file caught mid-upload; its finished twin is there or will be
        tmp.unlink()
    return target


def list_runs(src: str) -> list[str]:
    """Run folders (those with a manifest.json) directly under a runs folder or URI."""
    fs, path = _fs(src) if is_uri(src) else (pafs.LocalFileSystem(), str(Path(src).expanduser().resolve()))
    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
    return sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and fs.get_file_info(f"{i.path}/manifest.json").type == pafs.FileType.File
    )


@dataclass(frozen=True)
class RunEntry:
    """One line of `pdbench runs list`: what a reader picks a run by."""

    run_id: str
    track: str
    status: str
    verdict: str | None
    evidence: str
    engine: str
    started_at: str


def describe_runs(src: str) -> list[RunEntry]:
    """The runs under src with their manifest's facts and summary's verdict, oldest first."""
    fs, path = _fs(src) if is_uri(src) else (pafs.LocalFileSystem(), str(Path(src).expanduser().resolve()))
    out = []
    for name in list_runs(src):
        root = f"{path.rstrip('/')}/{name}"
        with fs.open_input_stream(f"{root}/manifest.json") as f:
            m = json.loads(f.read())
        verdict = None
        if fs.get_file_info(f"{root}/summary.json").type == pafs.FileType.File:
            with fs.open_input_stream(f"{root}/summary.json") as f:
                verdict = (json.loads(f.read()).get("verdicts") or {}).get("verdict")
        out.append(
            RunEntry(
                run_id=name,
                track=str(m.get("track")),
                status=str(m.get("status")),
                verdict=verdict,
                evidence=str(evidence_of(m)),
                engine=str(m.get("engine")),
                started_at=str(m.get("started_at") or ""),
            )
        )
    return sorted(out, key=lambda r: (r.started_at, r.run_id))
