"""A resumed RL run with one fault injected, as its own process (tests/maye_jax/test_faults.py):

    python -m tests.maye_jax.faulty_run ROOT FAULT

ROOT holds the run (ROOT/run, ROOT/data; config `fault_config(ROOT)`), FAULT is one of
- `kill_before_digest`: SIGKILL right after Orbax finished writing checkpoint 3, before its
  digest is recorded (the only moment a checkpoint folder exists without being complete);
- `disk_full`: nothing injected here (ROOT is a small tmpfs that fills up);
- `simulated_disk_full`: Orbax's write of checkpoint 3 leaves part of its files and fails with
  ENOSPC (where no tmpfs can be mounted).
The run's log goes to stderr as the CLI's does, so a test can read its last lines.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

from maye_jax.run.cli import setup_cli_logging
from maye_jax.storage import train_checkpoints
from maye_jax.train import run_rl
from tests.maye_jax.test_faults import fault_config


def inject(fault: str) -> None:
    if fault == "kill_before_digest":
        write_digest = train_checkpoints.TrainCheckpointer._write_digest

        def killed_at_step_3(self, step_dir, arrays, meta):
            if step_dir.name == "3":
                os.kill(os.getpid(), signal.SIGKILL)
            return write_digest(self, step_dir, arrays, meta)

        train_checkpoints.TrainCheckpointer._write_digest = killed_at_step_3
    elif fault == "simulated_disk_full":
        import orbax.checkpoint as ocp

        save = ocp.CheckpointManager.save

        def full_at_step_3(self, step, *args, **kwargs):
            if step == 3:
                partial = Path(self.directory) / "3.orbax-checkpoint-tmp"
                partial.mkdir()
                (partial / "half_written").write_bytes(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device", str(partial))
            return save(self, step, *args, **kwargs)

        ocp.CheckpointManager.save = full_at_step_3
    elif fault != "disk_full":
        raise ValueError(f"unknown fault {fault!r}")


def main(root: str, fault: str) -> None:
    setup_cli_logging()
    inject(fault)
    config = fault_config(Path(root))
    config.resume = True
    run_rl(config)


if __name__ == "__main__":
    main(*sys.argv[1:])
