"""The one error type of maest-cli. Every project error derives from MaestError and carries the
exit code the CLI ends with, so the CLI maps errors in one place and never shows a traceback for
a user's mistake."""

from __future__ import annotations


class MaestError(Exception):
    """A failure the user can act on; the message names the file or option and the reason."""

    exit_code = 1  # some inputs failed, or the run did


class UsageError(MaestError, ValueError):
    """A bad option value, config, model name or input file kind: nothing was done (exit code 2)."""

    exit_code = 2


def exit_code_of(e: BaseException) -> int | None:
    """The exit code of an error the CLI reports in one line; None for a bug (let it raise).
    OSErrors from the system (a missing file, a full disk) count as failed inputs."""
    if isinstance(e, MaestError):
        return e.exit_code
    if isinstance(e, OSError):
        return 1
    return None
