"""The `pdbench` command line."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # the commands import what they run only when run: `pdbench --help` stays fast
    from cluster.config import ExperimentConfig
    from cluster.driver import Driver
    from cluster.serve import ServeSpec

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: flags without `<bool>` metavars, `[vllm]` kept as typed
    context_settings={"max_content_width": 160},  # click would wrap at 80 columns whatever the terminal
)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from cluster.manifest import pdbench_version

        typer.echo(f"pdbench {pdbench_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="print the version and exit"),
) -> None:
    """pdbench: benchmark aggregated and disaggregated LLM serving on Ray, with auditable evidence packets.

    Exit codes of `pdbench run`: 0 every cell finished and the verdict passed; 1 no cell finished;
    2 bad command line or config (nothing ran); 3 partial (some cells failed); 4 failing verdict
    (E0 not reproducible, E3 different, or incomplete).
    """


class EngineKind(str, Enum):
    reference = "reference"
    vllm = "vllm"


_NO_CLUSTER = "--address {address}: no reachable Ray cluster; start one with `ray start --head`, or leave out --address for an embedded Ray"


def _fail(msg: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False)  # escaped: keeps `[vllm]`
    raise typer.Exit(code)


@app.command(epilog="Exit codes: 0 ok; 1 failed; 2 bad input; 3 partial; 4 failing verdict (see `pdbench --help`).")
def run(
    track: str = typer.Argument(..., help="track to run: e0 … e6 (see `pdbench tracks`)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="experiment YAML; overrides the track's quick profile"),
    engine: EngineKind | None = typer.Option(None, help="engine to use; overrides engine.kind of the config"),
    simulate: bool = typer.Option(
        False, "--simulate", help="use the analytic simulated engine instead of a real one; every artifact is stamped simulated"
    ),
    address: str | None = typer.Option(
        None, help="Ray address to join ('auto' inside `ray job submit`); default: start an embedded local Ray"
    ),
    out: str | None = typer.Option(
        None,
        "--out",
        "-o",
        help="folder or pyarrow.fs URI (s3://, gs://, file://...) that receives <run-id>/; default $PDBENCH_OUT, "
        "else ~/pdbench-runs inside `ray job submit`, else ./runs",
    ),
    seed: int | None = typer.Option(None, help="seed of prompts, lengths and arrivals; overrides the config's seed"),
    progress: bool = typer.Option(True, help="show a progress display"),
    fresh_engines: bool = typer.Option(
        False, "--fresh-engines", help="start a fresh engine per cell instead of reusing a warm one of the same engine configuration"
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        help="continue the run in this runs/<run-id>/ folder: cells already finished with the same cell config "
        "hash are kept, failed and unfinished ones run again, the run-level files are rebuilt. Without --config, "
        "the run's own config.yaml is used",
    ),
) -> None:
    """Run one track and write its evidence packet (manifest, records, summary, reports)."""
    from cluster.driver import Driver, RunOptions
    from cluster.storage import default_out

    if engine is not None and simulate:
        _fail("--engine and --simulate exclude each other: --simulate replaces the engine")
    if out is not None and resume is not None:
        _fail(f"--out and --resume exclude each other: a resumed run stays in its own folder ({resume}); leave out --out")
    try:
        cfg = _run_config(track, config, engine, simulate, seed, resume, fresh_engines)
        driver = Driver(cfg, RunOptions(out_dir=out or default_out(), address=address, progress=progress, resume=resume))
    except ValueError as e:  # ConfigError, or an --out that pyarrow.fs cannot open
        _fail(str(e))
    what = "resuming" if resume is not None else "run"
    engine_desc = f"external server {cfg.target.base_url}" if cfg.target else cfg.engine.kind
    console.print(f"{what} [bold]{driver.run_id}[/] — track {cfg.track}, engine {engine_desc}, {len(driver.plans)} cell(s) planned")
    _finish_run(driver, _drive(driver, address, progress))


def _run_config(
    track: str,
    config: Path | None,
    engine: EngineKind | None,
    simulate: bool,
    seed: int | None,
    resume: Path | None,
    fresh_engines: bool = False,
) -> ExperimentConfig:
    """The run's config: the track's quick profile ← the file (a resumed run's own) ← the flags."""
    from cluster.config import ConfigError, load_yaml, resolve

    overrides: dict = {}
    if engine is not None:
        overrides.setdefault("engine", {})["kind"] = engine.value
    if simulate:
        overrides.setdefault("engine", {})["kind"] = "simulated"
    if seed is not None:
        overrides["seed"] = seed
    if fresh_engines:
        overrides["fresh_engines"] = True
    if config is None and resume is not None and (resume / "config.yaml").is_file():
        config = resume / "config.yaml"
    cfg = resolve(track, load_yaml(config) if config else {}, overrides)
    if cfg.simulated and not simulate:
        raise ConfigError("invalid config:\n  engine.kind: 'simulated' runs only with --simulate (real engines are the default)")
    return cfg


def _drive(driver: Driver, address: str | None, progress: bool) -> Path:
    """Run the cells, under the progress display if asked; a user's mistake ends in one line."""
    from analysis.packet import PacketError
    from cluster.config import ConfigError
    from cluster.console import RunDisplay, ray_logs_on
    from cluster.ray_env import EmbeddedRayError

    try:
        with ray_logs_on(console):
            if not progress:
                return driver.run()
            with RunDisplay(console, len(driver.plans), sum(p.num_requests for p in driver.plans)) as display:
                display.phase(f"joining Ray at {address}" if address else "starting an embedded Ray (a few seconds)")
                return driver.run(display.update)
    except (ConfigError, PacketError) as e:
        _fail(str(e))
    except ConnectionError:  # --address with no reachable cluster
        _fail(_NO_CLUSTER.format(address=address))
    except EmbeddedRayError as e:
        _fail(str(e))


def _finish_run(driver: Driver, run_dir: Path) -> None:
    """The summary and where the packet is, on stderr; its location alone on stdout; the exit code."""
    from cluster.console import print_summary
    from cluster.outcome import exit_code

    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    print_summary(console, summary, manifest)  # on stderr: stdout stays the packet's location alone
    if driver.dest.remote:
        console.print(f"packet: {driver.location}  (get it with `pdbench runs pull {driver.location}`)\nstaging copy: {run_dir}")
    else:
        console.print(f"report: {run_dir / 'report.md'}\n        {run_dir / 'report.html'}  (open in a browser; works offline)")
    typer.echo(driver.location)
    code = exit_code(manifest["status"], (summary.get("verdicts") or {}).get("verdict"))
    if code:
        console.print(f"exit code {int(code)}: {code.name.lower()} (see `pdbench --help`)", highlight=False)
        raise typer.Exit(int(code))


@app.command()
def serve(
    mode: str = typer.Option(
        "aggregated", help="aggregated (one engine) or disaggregated (prefill and decode engines, KV through the object store)"
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML with engine:, placement: (an experiment config works), served_model_name:, tokenizer:"
    ),
    engine: EngineKind | None = typer.Option(None, help="engine to use; overrides engine.kind of the config"),
    model: str | None = typer.Option(None, help="engine.model (tiny-qwen3, a configs/models/ name, a path, a hub name)"),
    tokenizer: str | None = typer.Option(
        None, help="Hugging Face tokenizer (folder or hub name) so text prompts work; without it prompts are token ids"
    ),
    host: str = typer.Option(
        "127.0.0.1", help="address the HTTP proxy listens on; the endpoint has no authentication, so loopback by default"
    ),
    port: int = typer.Option(8000, help="HTTP port"),
    replicas: int = typer.Option(1, min=1, help="data-parallel replicas, each with its own engine"),
    name: str = typer.Option("pdbench", help="Serve application name"),
    route_prefix: str = typer.Option("/", help="URL path the app is served under (several apps can share one port)"),
    address: str | None = typer.Option(None, help="Ray address to join ('auto' on a cluster node); default: embedded local Ray"),
    detach: bool = typer.Option(False, help="with --address: leave the app running on the cluster and return"),
) -> None:
    """Serve pdbench's engine actors behind OpenAI-compatible /v1/completions and /v1/chat/completions (streaming SSE).

    Prompts are token-id lists unless --tokenizer is given (chat needs one; `pdbench tokenizer build` makes one offline).
    Stop with Ctrl-C (the app is deleted); with --address and --detach it keeps running until `serve shutdown` or `ray down`.
    """
    from cluster import ray_env
    from cluster.config import load_yaml
    from cluster.serve import check_listen, direct_ingress_env, is_loopback, serve_spec

    if detach and not address:
        _fail("--detach needs --address: an embedded Ray ends with this command")
    overrides: dict = {"mode": mode, "app_name": name, "replicas": replicas, "route_prefix": route_prefix}
    if engine is not None:
        overrides.setdefault("engine", {})["kind"] = engine.value
    if model is not None:
        overrides.setdefault("engine", {})["model"] = model
    if tokenizer is not None:
        overrides["tokenizer"] = tokenizer
    try:
        spec = serve_spec(load_yaml(config) if config else {}, overrides)
        check_listen(host, port, here=address is None)
    except ValueError as e:  # ConfigError, or a --host/--port nothing could listen on
        _fail(str(e))
    if not is_loopback(host):
        console.print(f"[bold yellow]warning:[/] listening on {host}: anyone who reaches it can use the engines (no authentication)")
    if address is None:  # the Ray started here gets Serve's direct ingress; a cluster has its own setting
        os.environ.update(direct_ingress_env(port))
    try:
        ray_env.connect(address)
    except ConnectionError:
        _fail(_NO_CLUSTER.format(address=address))
    _serve_until_stopped(spec, host, port, detach)


def _serve_until_stopped(spec: ServeSpec, host: str, port: int, detach: bool) -> None:
    """Deploy, then wait. Ctrl-C, and `kill` or a supervisor's SIGTERM alike, remove the app (a
    shell may have left SIGINT ignored for a background process)."""
    import signal
    import time

    from cluster.serve import deploy, replica_urls, undeploy

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        try:
            url = deploy(spec, host, port)
        except RuntimeError as e:
            _fail(str(e))
        where = f"{url}/v1/completions and /v1/chat/completions"
        console.print(f"serving {spec.model_name!r} ({spec.mode}, engine {spec.engine.kind}) at {where} (Serve's proxy, all replicas)")
        try:
            direct = replica_urls(spec, host, port)
        except RuntimeError as e:
            direct, why = [], str(e)
        else:
            why = "Serve on this cluster runs without RAY_SERVE_ENABLE_DIRECT_INGRESS=1"
        for u in direct:
            console.print(f"  one replica, without the proxy's hop: {u}")
        if not direct:
            console.print(f"  only the proxy serves: {why}")
        typer.echo(url)
        for u in direct:
            typer.echo(u)
        if detach:
            return
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # at any point, deploying included: leave nothing behind
        undeploy(spec)
        console.print("stopped")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a runs/<run-id>/ folder"),
    plotly_js: str = typer.Option(
        "inline",
        help="'inline' embeds plotly.js (self-contained, opens offline); a relative URL such as "
        "../plotly.min.js loads one shared copy instead (how docs/evidence/ keeps packets small)",
    ),
) -> None:
    """Rebuild report.md and report.html from a run's files alone (no Ray, no engine)."""
    from analysis.packet import load_packet
    from analysis.report import write_reports

    try:
        packet = load_packet(run_dir)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:  # ValueError: PacketError, a damaged file
        _fail(str(e))
    try:
        write_reports(packet, plotly_js)
    except OSError as e:
        _fail(f"report: cannot write report.md/report.html into {run_dir} ({e.strerror or e}); copy the run somewhere writable")
    typer.echo(str(run_dir / "report.html"))


runs_app = typer.Typer(help="Evidence packets kept elsewhere: list them, copy them here.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def runs_list(
    src: str | None = typer.Argument(
        None, help="a runs folder or pyarrow.fs URI (s3://bucket/pdbench-runs, ...); default $PDBENCH_OUT, else ./runs"
    ),
) -> None:
    """List the runs under SRC: id, track, status, verdict, real or simulated, start time."""
    from cluster.storage import default_out, describe_runs

    src = src or default_out()
    try:
        entries = describe_runs(src)
    except ValueError as e:
        _fail(str(e))
    if not entries:
        console.print(f"no runs under {escape(src)}", highlight=False)
        return
    t = Table("run id", "track", "status", "verdict", "evidence", "engine", "started (UTC)", title=escape(src), title_justify="left")
    for r in entries:
        started = r.started_at.replace("T", " ")[:19]
        t.add_row(*(escape(x) for x in (r.run_id, r.track, r.status, r.verdict or "–", r.evidence, r.engine, started)))
    Console(width=max(Console().width, 160)).print(t)


@runs_app.command("pull")
def runs_pull(
    src: str = typer.Argument(..., help="one run folder: a URI (s3://bucket/pdbench-runs/<run-id>) or a path"),
    to: Path = typer.Option(Path("runs"), "--to", help="local folder that receives <run-id>/"),
) -> None:
    """Copy a run's packet here; `pdbench report` then works on it offline."""
    from cluster.storage import pull

    try:
        target = pull(src, to)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(str(target))


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="two or more runs/<run-id>/ folders; the first is the baseline (A)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="folder for compare.md/.html/.json; default runs/compare-<time>"),
    allow_simulated: bool = typer.Option(
        False, "--allow-simulated", help="compare simulated runs with real ones anyway (each is labelled SIMULATED)"
    ),
) -> None:
    """Side-by-side report across runs (e.g. one track on 1, 2 and 4 nodes), from their files alone."""
    from datetime import datetime, timezone

    from analysis.compare import MixedModes
    from analysis.compare import compare as do_compare

    target = out or Path("runs") / f"compare-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    try:
        done = do_compare(run_dirs, target, allow_simulated=allow_simulated)
    except (FileNotFoundError, MixedModes, ValueError) as e:
        _fail(str(e))
    typer.echo(str(done / "compare.html"))


tokenizer_app = typer.Typer(help="Tokenizers made offline, for text clients of dummy-weight models.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("build")
def tokenizer_build(
    out: Path = typer.Option(..., "--out", help="folder to write (created if missing)"),
    vocab_size: int | None = typer.Option(None, help="vocabulary size: the words t0 … t<N-1>"),
    model: str | None = typer.Option(
        None,
        help="take the vocabulary size from this model (tiny-qwen3, a configs/models/ name, a config path) and write its config.json too",
    ),
) -> None:
    """A WordLevel tokenizer (one word `t<i>` = token id i) saved with save_pretrained: exact lengths, nothing to download.

    With --model the folder is also a dummy-weight model folder that `vllm serve DIR --load-format dummy` and
    `pdbench serve --model DIR --tokenizer DIR` share.
    """
    from workloads.word_tokenizer import save_word_tokenizer

    try:
        done = save_word_tokenizer(out, vocab_size=vocab_size, model=model)
    except ValueError as e:
        _fail(str(e))
    typer.echo(str(done))


@app.command()
def tracks() -> None:
    """List the experiment tracks and the question each answers."""
    from workloads.tracks import list_tracks

    t = Table("track", "question", "parameters")
    for tr in list_tracks():
        t.add_row(tr.name, tr.question, ", ".join(tr.params_model.model_fields) or "—")
    Console().print(t)


@app.command()
def doctor() -> None:
    """What Ray, torch, vllm and GPUs this machine has, and which engines can run here."""
    from cluster.doctor import report as doctor_report

    r = doctor_report()
    t = Table("component", "value")
    for k in ("python", "ray", "torch", "cuda", "transformers", "vllm", "pdbench_git_sha"):
        t.add_row(k, str(r["versions"].get(k)))
    t.add_row("GPUs (NVML)", ", ".join(d["name"] for d in r["gpus"]["devices"]) or "none")
    t.add_row("torch sees CUDA", str(r["torch_cuda"]))
    for k, v in r["engines"].items():
        t.add_row(f"engine {k}", escape(v))  # keeps `[vllm]` of the install hint
    Console().print(t)


if __name__ == "__main__":
    app()
