"""What `pdbench run` shows on the terminal: progress while it runs, numbers when it ends.

On a terminal the progress is a live Rich display; anywhere else (`ray job logs -f`, CI, `| tee`)
it is a plain line every few seconds and one per cell as it starts and ends, so a log never sits
silent for minutes. Ray's own log records go through the same console (above the live bars
instead of through them), and Ray's advice to turn token authentication off is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from analysis.headline import cell_rows, headlines

if TYPE_CHECKING:  # the round loop imports Ray; the display needs only its dataclasses' shape
    from cluster.rounds import CellState, RunProgress

PLAIN_INTERVAL_S = 10.0
_TERMINAL_COLUMNS = (
    "req/s",
    "out tok/s",
    "TTFT p50 (ms)",
    "TTFT p99 (ms)",
    "TPOT p50 (ms)",
    "TPOT p99 (ms)",
    "ITL p50 (ms)",
    "ITL p99 (ms)",
    "SLO attainment",
)


class _RayLogHandler(RichHandler):
    """Ray's records on our console. `ray.init` sets its own format on the handlers of the `ray`
    logger (timestamp, file, line); the console already says when and where, so it is ignored."""

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        return None


def _not_auth_advice(record: logging.LogRecord) -> bool:
    # "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out": advice that
    # would weaken the cluster, printed on every connection. Auth stays on; the line goes.
    return "RAY_AUTH_MODE=disabled" not in record.getMessage()


@contextmanager
def ray_logs_on(console: Console) -> Iterator[None]:
    """Route the `ray` logger's warnings and errors through `console` while the block runs."""
    logger = logging.getLogger("ray")
    saved = (list(logger.handlers), logger.propagate)
    handler = _RayLogHandler(console=console, show_time=False, show_path=False, markup=False, level=logging.WARNING)
    handler.addFilter(_not_auth_advice)
    logger.handlers = [handler]
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved


def _cell_line(c: CellState) -> str:
    if c.state == "running" and c.requests_done == 0:
        return f"{c.cell_id}: starting engines"
    return f"{c.cell_id}: {c.state} {c.requests_done}/{c.requests_total}"


class RunDisplay:
    """Progress of one run: `phase` says what happens before requests flow, `update` takes the
    driver's RunProgress."""

    def __init__(self, console: Console, cells: int, requests: int, live: bool | None = None, interval_s: float = PLAIN_INTERVAL_S):
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.interval_s = interval_s
        self._t0 = time.monotonic()
        self._last_line = -interval_s
        self._states: dict[str, str] = {}
        self._bar: Progress | None = None
        if self.live:
            self._bar = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
                transient=False,
            )
            self._cells = self._bar.add_task("cells", total=cells, status="")
            self._requests = self._bar.add_task("requests", total=requests, status="")

    def __enter__(self) -> RunDisplay:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            if exc[0] is None:
                for task in self._bar.tasks:
                    self._bar.update(task.id, completed=task.total, status="")
            self._bar.stop()

    def _plain(self, text: str) -> None:
        self.console.print(f"[{time.monotonic() - self._t0:5.0f} s] {escape(text)}", highlight=False, soft_wrap=True)

    def phase(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._cells, status=text)
        else:
            self._plain(text)

    def update(self, p: RunProgress) -> None:
        running = [c for c in p.cells if c.state == "running"]
        status = ", ".join(_cell_line(c) for c in running[:3]) + (" …" if len(running) > 3 else "")
        if self._bar is not None:
            self._bar.update(self._cells, completed=p.cells_done, total=p.cells_total, status=status)
            self._bar.update(self._requests, completed=p.requests_done, total=p.requests_total)
            return
        for c in p.cells:  # a line as each cell starts and ends
            if self._states.get(c.cell_id) != c.state and c.state != "waiting":
                self._plain(f"cell {c.cell_id} {'started' if c.state == 'running' else c.state}")
            self._states[c.cell_id] = c.state
        now = time.monotonic() - self._t0
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            self._plain(
                f"cells {p.cells_done}/{p.cells_total}, requests {p.requests_done}/{p.requests_total}" + (f"; {status}" if status else "")
            )


def print_summary(console: Console, summary: dict[str, Any], manifest: dict[str, Any]) -> None:
    """The closing summary; off a terminal (a log file) at full width rather than Rich's 80 columns."""
    out = console if console.is_terminal else Console(file=console.file, width=max(console.width, 200))
    for table in summary_tables(summary, manifest):
        out.print(table)


def summary_tables(summary: dict[str, Any], manifest: dict[str, Any]) -> list[Table]:
    """The closing summary: the track's headline numbers, then one row per cell."""
    head = Table(title=f"{str(manifest.get('track', '')).upper()} {manifest.get('run_id', '')}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    for h in headlines(summary, manifest):
        head.add_row(escape(h.label), escape(h.value))
    rows = cell_rows(summary)
    cells = Table(title="per cell (measured requests; warm-up excluded)", title_justify="left")
    if rows.empty:
        return [head]
    cols = ["cell", "requests ok/all", *(c for c in _TERMINAL_COLUMNS if c in rows.columns)]
    for c in cols:
        cells.add_column(c, justify="left" if c == "cell" else "right")
    for r in rows.to_dict(orient="records"):
        cells.add_row(*(escape(str(r[c])) for c in cols))
    return [head, cells]
