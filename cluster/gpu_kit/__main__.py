"""`python -m cluster.gpu_kit`: the wheels an air-gapped GPU node needs, here and there.

Here (pip reaches PyPI), from the repository root:
  fetch     download the pinned wheels (wheels.txt, sha256-checked) into .whl/dl and cut them into
            .whl/batch-NN/ folders of at most --batch-mib MiB, one per call to the machine
  pin       add or replace pins: download NAME[==VERSION] for the machine and record its sha256
  requires  record the Requires-Dist of every wheel in .whl/dl (requires.txt)
  closure   list requirements that neither the image nor the kit meets (exit 1 if any)
There (the tree is on PYTHONPATH):
  check     import Ray Serve, vLLM's engine and CLI, and pdbench; print what is missing
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
WHEELS = KIT_DIR / "wheels.txt"
# The lent machine: CPython 3.12 on manylinux x86_64; the newest tags first.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (35, 34, 31, 28, 27, 26, 24, 17)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
    "any",
]


def pip_download(dest: Path, *args: str) -> None:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *plat,
        "-d",
        str(dest),
        *args,
    ]
    subprocess.run(cmd, check=True)


def _repo_root() -> Path:
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip())
    if root.resolve() != Path.cwd().resolve():
        sys.exit(f"gpu_kit: run from the repository root ({root}), where the device tool picks up .whl/")
    return root


def cmd_fetch(a: argparse.Namespace) -> None:
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    from cluster.gpu_kit.closure import carried, wheel_metadata
    from cluster.gpu_kit.pack import batch_budget_mib, pack, travelling_bytes

    whl = _repo_root() / ".whl"
    dl = whl / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    pip_download(dl, "--require-hashes", "-r", str(WHEELS))
    # Only the pinned files: a wheel of an older pin would be installed beside the new one.
    pins = carried()
    for w in dl.glob("*.whl"):
        name, version, _ = wheel_metadata(w)
        if pins.get(canonicalize_name(name)) != Version(version):
            w.unlink()
    batch_mib = a.batch_mib or batch_budget_mib(travelling_bytes(_repo_root()))
    p = pack(whl, a.pack, batch_mib)
    print(f"gpu_kit: {p.wheels} wheels, {p.total_bytes / 2**20:.0f} MiB in {len(p.batches)} batches of <= {batch_mib} MiB:")
    for i, b in enumerate(p.batches, 1):
        last = " --need-complete" if i == len(p.batches) else ""
        print(f'  call {i}: carry ["{b.relative_to(whl.parent)}"]  command: bash cluster/gpu_kit/install-on-device.sh{last}')


def cmd_pin(a: argparse.Namespace) -> None:
    from packaging.utils import canonicalize_name

    from cluster.gpu_kit.closure import wheel_metadata
    from cluster.gpu_kit.pack import sha256

    dl = Path(".whl/dl")
    dl.mkdir(parents=True, exist_ok=True)
    before = set(dl.glob("*.whl"))
    pip_download(dl, *a.specs)
    new = sorted(set(dl.glob("*.whl")) - before) or sorted(dl.glob("*.whl"))
    lines = WHEELS.read_text().splitlines()
    for w in new:
        name, version, _ = wheel_metadata(w)
        key = canonicalize_name(name)
        if not any(canonicalize_name(s.split("==")[0].split("[")[0]) == key for s in a.specs):
            continue
        lines = [ln for ln in lines if not (ln and not ln.startswith("#") and canonicalize_name(ln.split("==")[0]) == key)]
        lines.append(f"{key}=={version} --hash=sha256:{sha256(w)}")
        print(f"gpu_kit: pinned {key}=={version} ({w.stat().st_size / 2**20:.1f} MiB)")
    head = [ln for ln in lines if ln.startswith("#")]
    pins = sorted((ln for ln in lines if ln and not ln.startswith("#")), key=str.lower)
    WHEELS.write_text("\n".join(head + pins) + "\n")


def cmd_requires(a: argparse.Namespace) -> None:
    from cluster.gpu_kit.closure import write_requires

    print(write_requires(Path(a.wheel_dir)))


def cmd_closure(a: argparse.Namespace) -> None:
    from cluster.gpu_kit.closure import gaps

    found = gaps()
    for g in found:
        print(g)
    print(f"gpu_kit closure: {len(found)} unmet requirement(s)")
    sys.exit(1 if found else 0)


def cmd_check(a: argparse.Namespace) -> None:
    from cluster.gpu_kit.check import report, run_checks

    results = run_checks(cli=not a.no_cli)
    print(report(results), flush=True)
    sys.exit(0 if all(r.ok for r in results) else 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m cluster.gpu_kit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the pinned wheels and cut them into per-call batches")
    f.add_argument(
        "--pack", choices=["raw", "xz"], default="raw", help="raw: wheels as published (seconds); xz: ~25%% fewer bytes (minutes)"
    )
    f.add_argument(
        "--batch-mib",
        type=float,
        default=None,
        help="batch size; default: what one call (64 MiB) leaves beside the tree that travels with it, less 2 MiB",
    )
    f.set_defaults(fn=cmd_fetch)
    p = sub.add_parser("pin", help="download NAME[==VERSION] for the machine and pin it with its sha256")
    p.add_argument("specs", nargs="+")
    p.set_defaults(fn=cmd_pin)
    r = sub.add_parser("requires", help="record the Requires-Dist of the downloaded wheels")
    r.add_argument("--wheel-dir", default=".whl/dl")
    r.set_defaults(fn=cmd_requires)
    sub.add_parser("closure", help="requirements neither the image nor the kit meets").set_defaults(fn=cmd_closure)
    c = sub.add_parser("check", help="on the GPU node: import everything the runs need")
    c.add_argument("--no-cli", action="store_true", help="skip `vllm serve --help` and `vllm bench serve --help`")
    c.set_defaults(fn=cmd_check)
    a = ap.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
