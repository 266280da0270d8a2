"""Errors the CLI maps to exit codes; everything else is a runtime failure (exit 1)."""


class UserError(Exception):
    """Bad input from the user (recipe, data, CLI args, paths): exit code 2, no traceback."""

    exit_code = 2


class GateFailed(Exception):
    """A quality gate did not hold: exit code 3."""

    exit_code = 3


class VerificationFailed(Exception):
    """A self-check (e.g. merge equivalence) failed: exit code 1."""

    exit_code = 1
