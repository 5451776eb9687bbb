"""python -m maye_jax.data check FILE.jsonl [FILE.jsonl ...]: validates MAYE jsonl files, printing
every problem as `file:line: ...`; exit status 1 if any."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from maye_jax.data.records import check_files


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] != "check":
        print("usage: python -m maye_jax.data check FILE.jsonl [FILE.jsonl ...]", file=sys.stderr)
        return 2
    return check_files(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
