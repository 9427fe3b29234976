"""The evidence packet on disk: atomic writers, and a loader that needs nothing but the files.

Every file is written to a temporary name in the same folder, flushed, then renamed, so a
killed run leaves either the old file or the new one, never half of one. Everything written goes
through analysis/redact.py first: no secret reaches a packet.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.redact import redact_obj, redact_text, secret_env_values


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a packet is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    clean = redact_text(text)
    _atomic_write(Path(path), lambda f: f.write(clean.encode()))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(redact_obj(json.loads(json.dumps(obj, default=str))), indent=2, sort_keys=True) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(redact_obj(obj), sort_keys=True))


def _redact_strings(df: pd.DataFrame) -> pd.DataFrame:
    secrets = secret_env_values()
    out = df
    for col in df.columns:
        if df[col].dtype == object and df[col].map(lambda v: isinstance(v, str)).any():
            out = out.copy() if out is df else out
            out[col] = df[col].map(lambda v: redact_text(v, secrets) if isinstance(v, str) else v)
    return out


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    clean = _redact_strings(df)
    _atomic_write(Path(path), lambda f: clean.to_parquet(f, index=False))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@dataclass
class Packet:
    """A run folder as analysis sees it."""

    root: Path
    manifest: dict[str, Any]
    summary: dict[str, Any]
    requests: pd.DataFrame
    transfers: pd.DataFrame | None
    telemetry: pd.DataFrame | None = None

    @property
    def simulated(self) -> bool:
        return self.manifest.get("mode") == "simulated"


def load_packet(root: Path) -> Packet:
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root} is not a pdbench run folder (no manifest.json)")
    transfers = root / "transfers.parquet"
    req = root / "requests.parquet"
    tel = root / "telemetry.parquet"
    return Packet(
        root=root,
        manifest=read_json(root / "manifest.json"),
        summary=read_json(root / "summary.json") if (root / "summary.json").is_file() else {},
        requests=pd.read_parquet(req) if req.is_file() else pd.DataFrame(),
        transfers=pd.read_parquet(transfers) if transfers.is_file() else None,
        telemetry=pd.read_parquet(tel) if tel.is_file() else None,
    )
