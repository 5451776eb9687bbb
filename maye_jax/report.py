"""python -m maye_jax.report RUN_DIR [RUN_DIR ...] --out=DIR: the multi-seed report (curves with
std bands as PNG, the paper's Table 3 in Markdown); maye_jax/evaluation/report.py builds it."""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from maye_jax.errors import UserError

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """CLI flags, defined only when run as a script so importing this module defines none."""
    flags.DEFINE_string("out", None, "Report folder: plots, table.md and summary.json.")
    flags.DEFINE_bool("plots", True, "Write the PNG plots (--noplots: the table only).")


def main(argv: Sequence[str]) -> int:
    from maye_jax.evaluation.report import ReportError, build_report
    from maye_jax.storage.atomic import cannot_write

    run_paths = list(argv[1:])
    if not run_paths or not FLAGS.out:
        raise UserError("usage: python -m maye_jax.report RUN_DIR [RUN_DIR ...] --out=DIR")
    problem = cannot_write(FLAGS.out)
    if problem:
        raise UserError(f"--out: {FLAGS.out}: {problem}")
    try:
        report = build_report(run_paths, FLAGS.out, plots=FLAGS.plots)
    except ReportError as error:
        raise UserError(str(error)) from None
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    _define_flags()
    run_cli("report", main)
