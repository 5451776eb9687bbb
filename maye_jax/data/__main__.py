"""python -m maye_jax.data check FILE.jsonl [FILE.jsonl ...]: validates MAYE jsonl files, printing
every problem as `file:line: ...`; exit status 1 if any (a file without a valid record is one)."""

from __future__ import annotations

from collections.abc import Sequence

from maye_jax.data.records import check_files
from maye_jax.errors import UserError


def main(argv: Sequence[str]) -> int:
    """`argv`: the program name, `check`, then the files."""
    args = list(argv[1:])
    if len(args) < 2 or args[0] != "check":
        raise UserError("usage: python -m maye_jax.data check FILE.jsonl [FILE.jsonl ...]")
    files = args[1:]
    problems = check_files(files)
    if problems:
        raise UserError(f"{problems} problem(s) in {len(files)} file(s), each listed above")
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    run_cli("data check", main)
