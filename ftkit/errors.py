"""Errors the CLI maps to exit codes; everything else is a runtime failure (exit 1).

Every known error derives from FtkitError, which carries its exit code and the label the CLI
prints before the message; `exit_code_of` is the one place an exception becomes an exit code.
"""

from __future__ import annotations


class FtkitError(Exception):
    """A failure ftkit explains in one message (no traceback): its exit code, and the label printed first."""

    exit_code, label = 1, "error"


class UserError(FtkitError):
    """Bad input from the user (recipe, data, CLI args, paths): exit code 2, no traceback."""

    exit_code, label = 2, "error"


class GateFailed(FtkitError):
    """A quality gate did not hold: exit code 3."""

    exit_code, label = 3, "gate failed"


class VerificationFailed(FtkitError):
    """A self-check (e.g. merge equivalence) failed: exit code 1."""

    exit_code, label = 1, "verification failed"


INTERRUPTED = 130  # the shell's code for SIGINT, used for Ctrl-C and for a run stopped by a signal


def exit_code_of(exc: BaseException) -> int:
    """The exit code for any exception: a known error's own, 130 for an interruption, else 1."""
    if isinstance(exc, FtkitError):
        return exc.exit_code
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    return 1
