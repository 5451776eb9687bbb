"""python -m maye_jax.data check PATH [PATH ...] [--layout=... --format=... --question_key=...]:
validates data files of any format (MAYE jsonl, parquet, a `save_to_disk` folder) under a
layout, decoding every image; prints every problem as `where: ...` (`file:line`, `file:row N`),
exit status 1 if any."""

from __future__ import annotations

from collections.abc import Sequence

from maye_jax.data.data_flags import data_settings_from_flags, define_data_flags
from maye_jax.errors import UserError

USAGE = (
    "usage: python -m maye_jax.data check PATH [PATH ...] [--layout=maye|geo3k_easyr1|geo3k_verl]"
)


def main(argv: Sequence[str]) -> int:
    """`argv`: the program name, `check`, then the files (flags already parsed)."""
    from maye_jax.data.layouts import resolve_layout
    from maye_jax.data.records import check_files

    args = list(argv[1:])
    if len(args) < 2 or args[0] != "check":
        raise UserError(USAGE)
    files = args[1:]
    data = data_settings_from_flags()
    problems = check_files(files, resolve_layout(data), fmt=data.format)
    if problems:
        raise UserError(f"{problems} problem(s) in {len(files)} file(s), each listed above")
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    define_data_flags()
    run_cli("data check", main)
