"""The two kinds of failure mg reports to a user, and the exit code each one maps to."""

from __future__ import annotations


class MgError(Exception):
    """Bad input: a recipe typo, a missing file, a corrupt or wrong-stage checkpoint. Exit 2."""

    exit_code = 2


class RunError(MgError):
    """A run that started but failed (the loss became NaN, the disk filled up). Exit 1."""

    exit_code = 1


class Interrupted(RunError):
    """SIGINT/SIGTERM arrived; a resumable checkpoint was written before stopping."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
