"""How every command-line tool ends: a user error is one line per problem (no traceback) and
exit status 1; a run stopped by a signal says how to resume and exits 128 + the signal (130 for
Ctrl-C, 143 for SIGTERM), never printing a summary that looks finished.

    if __name__ == "__main__":
        run_cli("train", main, config_flag=True)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from maye_jax.errors import RunAborted, RunStopped, UserError


def report_errors(name: str, main: Callable[[list[str]], int], argv: list[str]) -> int:
    """`main(argv)`'s exit status, or the status of the error it raised (printed first)."""
    try:
        return main(argv)
    except RunStopped as stopped:
        print(f"{name}: {stopped}", file=sys.stderr)
        return 128 + int(stopped.signum)
    except RunAborted as aborted:
        print(
            f"{name}: {aborted}; continue from the last checkpoint with --config.resume=True",
            file=sys.stderr,
        )
        return 128 + int(aborted.signum)
    except UserError as error:
        for line in str(error).splitlines():
            print(f"{name}: error: {line}", file=sys.stderr)
        return 1


def run_cli(name: str, main: Callable[[list[str]], int], *, config_flag: bool = False) -> None:
    """absl's app.run of `main`, with logging set up and errors reported as above."""
    from absl import app

    from maye_jax.run.startup import setup_cli_logging

    if config_flag:
        from maye_jax.config.flags import define_config_flag

        define_config_flag()

    def entry(argv):
        setup_cli_logging()
        sys.exit(report_errors(name, main, argv))

    app.run(entry)
