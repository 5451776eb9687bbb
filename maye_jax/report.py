"""python -m maye_jax.report RUN_DIR [RUN_DIR ...] --out=DIR: the multi-seed report (curves with
std bands as PNG, the paper's Table 3 in Markdown); maye_jax/evaluation/report.py builds it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from absl import app, flags

from maye_jax.evaluation.report import ReportError, build_report

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("out", None, "Report folder: plots, table.md and summary.json.")
    flags.DEFINE_bool("plots", True, "Write the PNG plots (--noplots: the table only).")


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_paths = list(argv[1:])
    if not run_paths or not FLAGS.out:
        print("usage: python -m maye_jax.report RUN_DIR [RUN_DIR ...] --out=DIR", file=sys.stderr)
        return 2
    try:
        report = build_report(run_paths, FLAGS.out, plots=FLAGS.plots)
    except ReportError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 1
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
