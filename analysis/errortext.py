"""Errors as a packet shows them: one line in tables and statuses, the whole story in a log.

A cell that fails inside a Ray actor raises an exception whose text is the remote traceback
(kilobytes, with terminal colour codes); put whole into the manifest it breaks the report's
table and buries the reason. The one line is the root cause's type and first line; the
traceback goes to the packet's errors.log.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
MAX_LINE = 300


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _root(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError keeps it as `cause`)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return exc


def first_line(text: str) -> str:
    """The first non-empty line of a text, colour codes stripped, at most MAX_LINE characters."""
    lines = [ln.strip() for ln in strip_ansi(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…"


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, colour codes stripped, at most MAX_LINE characters."""
    root = _root(exc)
    lines = [ln.strip() for ln in strip_ansi(str(root)).splitlines() if ln.strip()]
    if root is exc and len(lines) > 1 and lines[0].startswith("ray::"):
        # A Ray error without a kept cause: its text is a traceback; the last line is the reason.
        lines = [lines[-1]]
    text = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"
