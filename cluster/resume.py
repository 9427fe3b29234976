"""Resume: taking over an earlier run's folder, one process per folder, and which cells stand.

A cell stands when its cell.json says ok under the same cell config hash and its record files
read back; everything else runs again from a cleared folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from analysis.packet import CELL_REQUESTS, CELL_TRANSFERS, PacketError, read_json, read_rows
from analysis.schemas import read_requests, read_transfers
from cluster.config import ConfigError

LOCK_FILE = ".pdbench.lock"  # a dot file: never published, never part of the packet


@dataclass(frozen=True)
class Prior:
    """What a resumed run keeps of the run it continues."""

    run_id: str
    started_at: str
    resumed_at: list[str]


def adopt(run_dir: Path, track: str, config_hash: str) -> Prior:
    """The earlier run in `run_dir`; refused, in one line, unless it is the same track and config."""
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: {run_dir} is not a folder; give the runs/<run-id>/ folder of the run to continue")
    try:
        prior = read_json(run_dir / "manifest.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"--resume: {run_dir} is not a pdbench run folder (no readable manifest.json)") from None
    if not isinstance(prior, dict):
        raise ConfigError(f"--resume: {run_dir}/manifest.json is not a pdbench manifest")
    if prior.get("track") != track:
        raise ConfigError(f"--resume: {run_dir} is a run of track {prior.get('track')!r}, not {track!r}")
    if prior.get("config_hash") != config_hash:
        raise ConfigError(
            f"--resume: {run_dir} was run with config hash {str(prior.get('config_hash'))[:12]}…, this command "
            f"resolves to {config_hash[:12]}…; resume with the same config, seed and engine flags "
            f"(leave out --config to reuse {run_dir / 'config.yaml'})"
        )
    return Prior(prior["run_id"], prior["started_at"], list(prior.get("resumed_at", [])))


def hold(run_dir: Path) -> FileLock:
    """One pdbench process per run folder: a second `--resume` of a run in progress would run
    the same cells (same placement group names) and race it for the same files."""
    lock = FileLock(run_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"--resume: {run_dir} is being run by another pdbench process right now; wait for it to end (or end it), then resume"
        ) from None
    return lock


def clear_temporaries(run_dir: Path) -> None:
    """Atomic writes of a killed run leave their temporary files (write_json, write_parquet):
    called holding the lock, when nothing else writes here, so any left is a dead process's."""
    for tmp in run_dir.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def finished(cell_dir: Path, cell_hash: str) -> dict[str, Any] | None:
    """A resumable result: status ok, same cell config hash, its records on disk."""
    try:
        meta = read_json(cell_dir / "cell.json")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if meta.get("status") != "ok" or meta.get("config_hash") != cell_hash or not (cell_dir / CELL_REQUESTS).is_file():
        return None
    try:  # a damaged record file (a disk filled, a bad copy, columns of the wrong type) means the cell runs again
        read_rows(cell_dir / CELL_REQUESTS, read_requests)
        if (cell_dir / CELL_TRANSFERS).is_file():
            read_rows(cell_dir / CELL_TRANSFERS, read_transfers)
    except PacketError:
        return None
    return dict(meta)


def clear(cell_dir: Path) -> None:
    """Before a (re)run: drop what an earlier, unfinished or failed attempt left behind."""
    if cell_dir.is_dir():
        for f in cell_dir.iterdir():
            if f.is_file():
                f.unlink()
