"""The errors a user can fix: a CLI prints them as one line each (no traceback) and exits 1.

Everything else is a bug or an environment failure and keeps its traceback. Imports nothing.
"""


class UserError(Exception):
    """Bad input: a config value, a file, a folder. The message says what, where, how to fix."""


class RunStopped(UserError):
    """A run stopped by SIGINT/SIGTERM after checkpointing; `signum` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class RunAborted(BaseException):
    """A second SIGINT/SIGTERM: stop at once, without the step's checkpoint (a BaseException,
    like KeyboardInterrupt, so no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum} received twice: stopped at once")
        self.signum = signum


class EvaluationInterrupted(Exception):
    """A stop was requested during an evaluation: it is abandoned (and rerun whole on resume)."""
