"""How the command-line tools end: user errors as one line each and exit 1 (no traceback, no
work started), a stopped run's resume hint and 128 + signal, maye_jax's INFO lines visible
under absl."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from maye_jax.errors import RunAborted, RunStopped, UserError
from maye_jax.run.cli import report_errors

REPO = Path(__file__).resolve().parents[3]


def test_report_errors_statuses(capsys):
    def raising(error):
        def main(argv):
            raise error

        return main

    assert report_errors("train", lambda argv: 0, []) == 0
    assert report_errors("train", raising(UserError("config.a: bad\nconfig.b: worse")), []) == 1
    assert capsys.readouterr().err.splitlines() == [
        "train: error: config.a: bad",
        "train: error: config.b: worse",
    ]
    stopped = RunStopped("stopped after step 3 of 9; continue with --config.resume=True", 2)
    assert report_errors("sft", raising(stopped), []) == 130
    assert "--config.resume=True" in capsys.readouterr().err
    assert report_errors("sft", raising(RunAborted(signal.SIGTERM)), []) == 143
    assert "--config.resume=True" in capsys.readouterr().err


def run(args, cwd):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_train_refuses_bad_input_in_one_line_before_any_work(tmp_path):
    missing = run(["-m", "maye_jax.train"], tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        "train: error: config: none given; pass --config=configs/<name>.py"
    )
    demo = str(REPO / "configs" / "demo.py")
    bad = run(
        [
            "-m",
            "maye_jax.train",
            f"--config={demo}",
            "--config.rl.batch_size=-8",
            "--config.rl.rollout_is_cap=0",
        ],
        tmp_path,
    )
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("train: error:")]
    assert "train: error: config.rl.batch_size: -8: must be > 0" in errors
    assert any("config.rl.rollout_is_cap: 0.0 no longer means off" in line for line in errors)
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_cli_logging_shows_maye_jax_info_under_absl(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text(
        "import logging\n"
        "from maye_jax.run.cli import run_cli\n"
        "def main(argv):\n"
        "    logging.getLogger('maye_jax').info('SFT epoch 1: mean loss 0.5')\n"
        "    logging.getLogger('orbax').info('orbax chatter')\n"
        "    return 0\n"
        "run_cli('tool', main)\n"
    )
    out = run([str(script)], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "maye_jax INFO SFT epoch 1: mean loss 0.5" in out.stderr
    assert "orbax chatter" not in out.stderr
