"""The exit code of `pdbench run`: a CI job gates on it without parsing summary.json."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # every cell finished and the verdict (where the track has one) passed
    FAILED = 1  # no cell finished
    USAGE = 2  # a bad command line or config: nothing ran
    PARTIAL = 3  # some cells failed; the packet holds the rest
    VERDICT = 4  # every cell finished, but the verdict fails (different tokens, not reproducible, incomplete)


# Verdicts that say the system under test misbehaved. "reproducible, timing unstable" is not one:
# identical tokens reproduced, and the host load beside the timing says why it moved.
FAILING_VERDICTS = frozenset({"not reproducible", "different", "incomplete"})


def exit_code(status: str, verdict: str | None) -> ExitCode:
    """The run's status first (a partial run's verdict judges only what finished), then its verdict."""
    if status == "failed":
        return ExitCode.FAILED
    if status == "partial":
        return ExitCode.PARTIAL
    if verdict in FAILING_VERDICTS:
        return ExitCode.VERDICT
    return ExitCode.OK
