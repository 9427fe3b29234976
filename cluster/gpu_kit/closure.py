"""Which requirements of the carried wheels neither the GPU image nor the kit satisfies.

The GPU machine has no network, so every package that Ray Serve, vLLM's CLI and pdbench import
must already be in its image (image-packages.txt) or be carried (wheels.txt). This walks the
declared requirements (`Requires-Dist`, markers evaluated for the machine: CPython 3.12, Linux
x86_64) from the roots down, through the carried wheels' own requirements (requires.txt, read
from the wheels by `python -m cluster.gpu_kit requires`), and reports each one that is met by
nothing, or by a version outside its range. A package the runs never import is left out on
purpose, with the reason, in left-out.txt. The image's own packages are taken as installed
consistently (their requirements are not on record here).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

KIT_DIR = Path(__file__).resolve().parent
# The lent machine's interpreter and platform, for environment markers.
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# What has to import there: Ray Serve, vLLM (engine and CLI: `vllm serve`, `vllm bench serve`),
# and pdbench's own runtime imports.
ROOTS = (
    "ray[serve]==2.60.0",
    "vllm==0.26.0",
    "torch",
    "transformers",
    "tokenizers",
    "nvidia-ml-py",
    "pandas",
    "pyarrow",
    "plotly",
    "pydantic",
    "pyyaml",
    "typer",
    "rich",
    "httpx",
    "httpx-sse",
    "psutil",
    "aiohttp",
    "nixl==1.5.1",  # the nixl-vllm KV backend (vLLM's NixlConnector imports nixl._api); UCX is bundled in nixl-cu13
)


def _pins(path: Path) -> dict[str, Version]:
    """`name==version` lines (comments, hashes and blank lines ignored)."""
    out: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            out[canonicalize_name(m[1])] = Version(m[2])
    return out


def carried(path: Path = KIT_DIR / "wheels.txt") -> dict[str, Version]:
    return _pins(path)


def image(path: Path = KIT_DIR / "image-packages.txt") -> dict[str, Version]:
    return _pins(path)


def left_out(path: Path = KIT_DIR / "left-out.txt") -> dict[str, str]:
    """name → why it is not carried."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.partition(":")
            out[canonicalize_name(name.strip())] = why.strip()
    return out


def requires(path: Path = KIT_DIR / "requires.txt") -> dict[str, tuple[Version, list[str]]]:
    """name → (the version they were read from, its Requires-Dist lines), as recorded from the carried wheels."""
    out: dict[str, tuple[Version, list[str]]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin, _, req = line.partition("\t")
            name, _, version = pin.partition("==")
            entry = out.setdefault(canonicalize_name(name), (Version(version), []))
            if req.strip():
                entry[1].append(req.strip())
    return out


def wheel_metadata(whl: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a wheel file."""
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        text = z.read(meta).decode()
    head = text.split("\n\n", 1)[0]
    field = lambda k: [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith(f"{k}:")]  # noqa: E731
    return field("Name")[0], field("Version")[0], field("Requires-Dist")


def write_requires(wheel_dir: Path, out: Path = KIT_DIR / "requires.txt") -> Path:
    lines = ["# Requires-Dist of each carried wheel (name==version<TAB>requirement), written by `python -m cluster.gpu_kit requires`."]
    for whl in sorted(wheel_dir.glob("*.whl")):
        name, version, reqs = wheel_metadata(whl)
        lines += [f"{canonicalize_name(name)}=={version}\t{r}" for r in reqs] or [f"{canonicalize_name(name)}=={version}\t"]
    out.write_text("\n".join(lines) + "\n")
    return out


@dataclass(frozen=True)
class Gap:
    requirement: str
    wanted_by: str
    problem: str

    def __str__(self) -> str:
        return f"{self.requirement} (wanted by {self.wanted_by}): {self.problem}"


def _applies(req: Requirement, extras: frozenset[str]) -> bool:
    if req.marker is None:
        return True
    return any(Marker(str(req.marker)).evaluate({**TARGET_ENV, "extra": e}) for e in (extras or frozenset({""})))


def gaps(
    roots: tuple[str, ...] = ROOTS,
    kit: dict[str, Version] | None = None,
    img: dict[str, Version] | None = None,
    reqs: dict[str, tuple[Version, list[str]]] | None = None,
    skip: dict[str, str] | None = None,
) -> list[Gap]:
    """Every requirement reachable from `roots` that is not met (carried wheels win over the image)."""
    kit = carried() if kit is None else kit
    img = image() if img is None else img
    reqs = requires() if reqs is None else reqs
    skip = left_out() if skip is None else skip
    found: list[Gap] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), "the GPU runs") for r in roots]
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        if name in skip:
            continue
        have = kit.get(name) or img.get(name)
        if have is None:
            found.append(Gap(str(req), parent, "in neither the image nor the kit"))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            where = "kit" if name in kit else "image"
            found.append(Gap(str(req), parent, f"the {where} has {have}"))
        key = (name, frozenset(req.extras))
        if name not in kit or key in seen:
            continue
        seen.add(key)
        if name not in reqs or reqs[name][0] != have:
            seen_as = f"recorded for {reqs[name][0]}" if name in reqs else "not recorded"
            found.append(Gap(str(req), parent, f"carried as {have}, but its requirements are {seen_as} in requires.txt (run `requires`)"))
            continue
        for line in reqs[name][1]:
            r = Requirement(line)
            if _applies(r, frozenset(req.extras)):
                todo.append((r, f"{name}=={have}"))
    return sorted(set(found), key=str)
