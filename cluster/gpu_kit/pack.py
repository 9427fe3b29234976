"""Cut a folder of wheels into per-call batches for the lent GPU machine.

Each call to the machine carries the tracked tree plus at most 64 MiB, so the wheels travel in
batches (`.whl/batch-NN/`), each with the same MANIFEST, and install-on-device.sh puts them
together in a stash that outlives the calls while the machine stays warm.

mode raw: the published wheels themselves; a wheel over the batch size is cut into parts, and
          files are grouped first-fit-decreasing into batches. Hashes are checked there.
mode xz:  every wheel is rewritten with stored (uncompressed) zip members (same files, same RECORD
          hashes), all are put in one tar and compressed with xz, and the .tar.xz is cut into
          parts: about 25% fewer bytes (and calls), at ~5 min of xz on 2 cores.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "MANIFEST"
MANIFEST_ROOM = 64 * 1024


CALL_LIMIT_MIB = 64.0  # what one call to the machine carries: the travelling tree plus its carried batch
MARGIN_MIB = 2.0


def travelling_bytes(repo: Path) -> int:
    """Bytes of what travels with every call: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True
    ).stdout
    return sum((repo / name).stat().st_size for name in out.decode().split("\0") if name and (repo / name).is_file())


def batch_budget_mib(tree_bytes: int) -> float:
    """The largest batch that still fits one call beside a tree of `tree_bytes` (docs/evidence grows
    the tree: a fixed batch size stopped fitting once it passed 12 MiB)."""
    room = CALL_LIMIT_MIB - MARGIN_MIB - tree_bytes / 2**20
    if room < 8:
        raise ValueError(f"the tree that travels with every call is {tree_bytes / 2**20:.1f} MiB: too little room is left for wheels")
    return float(int(room))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 22), b""):
            h.update(blk)
    return h.hexdigest()


def _restore_stored(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            ni = zipfile.ZipInfo(info.filename, info.date_time)
            ni.external_attr, ni.create_system, ni.compress_type = info.external_attr, info.create_system, zipfile.ZIP_STORED
            zo.writestr(ni, zi.read(info))


def _split(path: Path, part_bytes: int, out_dir: Path, base: str) -> list[Path]:
    parts = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(part_bytes), b""), 1):
            p = out_dir / f"{base}.part-{i:03d}"
            p.write_bytes(chunk)
            parts.append(p)
    return parts


def first_fit_decreasing(sizes: dict[str, int], capacity: int) -> list[list[str]]:
    """Names grouped into bins of at most `capacity` bytes, biggest first."""
    bins: list[tuple[int, list[str]]] = []
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        if sizes[name] > capacity:
            raise ValueError(f"{name} ({sizes[name]} B) is bigger than a batch ({capacity} B)")
        for i, (free, names) in enumerate(bins):
            if free >= sizes[name]:
                bins[i] = (free - sizes[name], [*names, name])
                break
        else:
            bins.append((capacity - sizes[name], [name]))
    return [names for _, names in bins]


@dataclass(frozen=True)
class Packed:
    batches: list[Path]
    wheels: int
    total_bytes: int


def pack(whl_dir: Path, mode: str = "raw", batch_mib: float = 52.0, xz_preset: int = 6) -> Packed:
    """Read `whl_dir/dl/*.whl`, write `whl_dir/batch-NN/` and `whl_dir/MANIFEST`."""
    dl = whl_dir / "dl"
    wheels = sorted(dl.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {dl}")
    capacity = int(batch_mib * 1024 * 1024) - MANIFEST_ROOM
    for old in whl_dir.glob("batch-*"):
        shutil.rmtree(old)
    work = whl_dir / "pack-tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    lines = ["#device-kit-manifest v1", f"mode {mode}"]
    wheel_lines = [f"wheel {sha256(w)} {w.stat().st_size} {w.name}" for w in wheels]
    if mode == "xz":
        tar_path = work / "bundle.tar"
        with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as t:
            for w in wheels:
                stored = work / w.name
                _restore_stored(w, stored)
                ti = t.gettarinfo(stored, arcname=w.name)
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                ti.mtime = 0
                with open(stored, "rb") as f:
                    t.addfile(ti, f)
                stored.unlink()
        bundle = work / "bundle.tar.xz"
        if shutil.which("xz"):
            subprocess.run(["xz", f"-{xz_preset}", "-T0", "-f", str(tar_path)], check=True)
        else:
            with open(tar_path, "rb") as fi, lzma.open(bundle, "wb", preset=xz_preset) as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)
        pieces = _split(bundle, capacity, work / "parts", "bundle.tar.xz")
    else:
        pieces = []
        for w in wheels:
            pieces += _split(w, capacity, work / "parts", w.name) if w.stat().st_size > capacity else [w]
    groups = first_fit_decreasing({p.name: p.stat().st_size for p in pieces}, capacity)
    by_name = {p.name: p for p in pieces}
    batches = []
    for i, names in enumerate(groups, 1):
        b = whl_dir / f"batch-{i:02d}"
        b.mkdir()
        for n in names:
            (shutil.copy2 if by_name[n].parent == dl else shutil.move)(by_name[n], b / n)
        batches.append(b)
    parts = sorted((p for b in batches for p in b.iterdir()), key=lambda p: p.name)
    lines.append(f"parts {len(parts)}")
    lines += [f"part {sha256(p)} {p.stat().st_size} {p.name}" for p in parts]
    text = "\n".join(lines + wheel_lines) + "\n"
    for b in batches:
        (b / MANIFEST).write_text(text)
    (whl_dir / MANIFEST).write_text(text)
    shutil.rmtree(work)
    return Packed(batches, len(wheels), sum(p.stat().st_size for p in parts))
