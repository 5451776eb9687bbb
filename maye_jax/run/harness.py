"""The run harness: everything around a run's steps, written once for RL, SFT (the CLI and the
warm-up before RL) and the experiment's runs.

    with RunHarness(output_dir, kind="rl", settings=s, total_steps=n) as run:
        start, state, meta = run.restore(state, state_shardings)    # resume (or step 0)
        run.evaluate_start(evaluate)                              # epoch 0, when asked
        run.finish_interrupted_evaluation(start, meta, epoch, evaluate)
        for step in run.steps(start):                             # progress bar, signals
            with run.section("update"):                           # named, exclusive timings
                ...
            run.end_step_with_evaluation(step, state, meta, metrics, epoch=epoch,
                                         evaluate=evaluate or None)   # log, checkpoint, stop
        run.finish(export)                                        # final HF export

It owns the output folder's files (the folder itself is prepared and locked by the run's
prologue, run/startup.py), `run.json`, resuming (the newest intact checkpoint; the metric lines
and rollouts written after it, and a torn last metric line, dropped), the metrics writer, the
progress bar, SIGTERM/SIGINT (finish the step, checkpoint, stop), the checkpoint cadence (every
`checkpoint.every_steps`, at the end and on a stop), the evaluations' protocol (a stop request
abandons an evaluation; the step is checkpointed with its metrics and a resume reruns the
evaluation whole), the final export, and the best evaluation's checkpoint and export
(`checkpoint.keep_best`, run/best.py). The loop itself stays in train.py / sft.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

from maye_jax.config.settings import Settings
from maye_jax.errors import EvaluationInterrupted, RunAborted, RunStopped
from maye_jax.run import multihost
from maye_jax.run.best import BEST_MODEL, BEST_RECORD, BestEvaluation, read_best_record
from maye_jax.run.metrics import (
    MetricsWriter,
    drop_rollouts_after,
    mark_run_finished,
    read_metrics,
    truncate_metrics,
    write_run_json,
)
from maye_jax.storage.atomic import atomic_write_text
from maye_jax.storage.train_checkpoints import TrainCheckpointer

log = logging.getLogger("maye_jax")


class SectionTimer:
    """Seconds spent in named sections, each exclusive of the sections nested in it (so
    `sync` inside `rollout` is counted once, under `sync`)."""

    def __init__(self):
        self._totals: dict[str, float] = {}
        self._nested: list[float] = []  # per open section: seconds of its nested sections

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            nested = self._nested.pop()
            self._totals[name] = self._totals.get(name, 0.0) + elapsed - nested
            if self._nested:
                self._nested[-1] += elapsed

    def take(self) -> dict[str, float]:
        """The totals since the last call, and a fresh start."""
        totals, self._totals = self._totals, {}
        return totals


class RunHarness:
    """One run's life around its steps (see the module doc).

    kind: "rl" | "sft" | "sft_warmup" (the warm-up before RL: its own metrics and checkpoints
    under `output_dir`, no run.json, no export). `checkpoints=False` writes none (tests).
    `export`: writes the current policy as an HF folder (every process calls it), for
    `checkpoint.keep_best`'s `best_hf/`. `stop_after_step`: the test hook for early stops (a
    preemption simulated after that step: checkpoint, stop)."""

    def __init__(
        self,
        output_dir,
        *,
        kind: str,
        settings: Settings,
        total_steps: int,
        describe: bool = True,
        checkpoints: bool = True,
        fingerprint: dict | None = None,
        export: Callable[[Path], object] | None = None,
        stop_after_step: int | None = None,
    ):
        self.output_dir = Path(output_dir).absolute()
        self.kind = kind
        self.settings = settings
        self.total_steps = total_steps
        self.describe = describe
        self.fingerprint = fingerprint
        self.timer = SectionTimer()
        self.stop_requested = False  # a signal arrived (in this process)
        self.stop_agreed = False  # every process stops after this step (decided in end_step)
        self.stop_signal: int | None = None  # the signal that asked for the stop
        self.stop_after_step = stop_after_step  # tests: simulate a preemption after this step
        self.last_step = 0  # the last step done (resumed runs: the restored one)
        self.writer: MetricsWriter | None = None
        self.checkpointer = (
            TrainCheckpointer(self.output_dir, keep=settings.checkpoint.keep)
            if checkpoints
            else None
        )
        self.export = export
        keep_best = settings.checkpoint.keep_best
        self.best = (
            BestEvaluation(keep_best) if keep_best and describe and self.checkpointer else None
        )
        self._progress = None
        self._previous_handlers: dict = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> RunHarness:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resuming = self.settings.resume and (self.output_dir / "run.json").is_file()
        # Several processes: process 0 writes every file of the run (run.json, metrics).
        if self.describe and not resuming and multihost.is_leader():
            s = self.settings
            write_run_json(
                self.output_dir,
                name=s.name,
                seed=s.seed,
                kind=self.kind,
                config=s.config_dict(),
                devices=[str(d) for d in jax.devices()],
                fingerprint=self.fingerprint,
                total_steps=self.total_steps,
                processes=multihost.process_count(),
                local_devices=len(jax.local_devices()),
            )
        # Preemption (SIGTERM) or Ctrl-C (SIGINT): finish the step, checkpoint, stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._request_stop)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)

    def _request_stop(self, signum, frame) -> None:
        """The first SIGINT/SIGTERM: finish (or abandon an evaluation in) this step, checkpoint,
        stop. The second: stop at once."""
        del frame
        if self.stop_requested and self.stop_signal is not None:
            raise RunAborted(signum)
        log.warning(
            "signal %d: checkpointing and stopping after this step (again: stop at once)", signum
        )
        self.stop_requested = True
        self.stop_signal = signum

    def should_stop(self) -> bool:
        """For long work inside a step (evaluation): True once a stop was requested (of any
        process: every process calls this at the same points and gets the same answer)."""
        return multihost.any_process(self.stop_requested)

    def stopped_error(self) -> RunStopped:
        """What the CLI reports for a run that stopped before its last step."""
        return RunStopped(
            f"stopped after step {self.last_step} of {self.total_steps} (checkpoint saved in "
            f"{self.output_dir}); continue it with the same command and --config.resume=True",
            self.stop_signal or signal.SIGTERM,
        )

    # -- resume ------------------------------------------------------------------------------
    def restore(self, state, state_shardings) -> tuple[int, object, dict]:
        """(start step, state, checkpoint meta): the newest intact checkpoint's when the run
        resumes (the metric lines and rollouts of later steps dropped), else (0, state, {}).
        Opens the metrics writer."""
        start, meta = 0, {}
        if self.settings.resume and self.checkpointer is not None:
            restored = self.checkpointer.restore_latest(state, state_shardings)
            if restored is not None:
                state, meta = restored
                start = int(meta["generation_step"])
                log.info("%s: resumed from step %d", self.kind, start)
                if multihost.is_leader():
                    truncate_metrics(self.output_dir, start)
                    drop_rollouts_after(self.output_dir, start)
        if self.best is not None and start:
            self._restore_best(start)
        lg = self.settings.logging
        self.last_step = start
        if not multihost.is_leader():
            return start, state, meta  # metrics are written by process 0
        self.writer = MetricsWriter(
            self.output_dir,
            tensorboard=lg.tensorboard,
            wandb=lg.wandb and self.describe,  # one W&B run per described run
            wandb_project=lg.wandb_project,
            run_name=self.settings.name,
            config=self.settings.config_dict(),
            append=bool(start),
        )
        return start, state, meta

    # -- the steps ---------------------------------------------------------------------------
    def steps(self, start: int) -> Iterator[int]:
        """Steps start+1 .. total_steps, with a progress bar; ends after a step that saw a
        stop request (that step is checkpointed by `end_step`)."""
        from tqdm import tqdm

        self._progress = tqdm(
            total=self.total_steps,
            initial=start,
            desc=f"{self.settings.name} {self.kind}",
            unit="step",
            disable=not self.settings.logging.progress_bar or not multihost.is_leader(),
            file=sys.stderr,
        )
        if self.best is not None and self.best.pending:  # a crash cut off its export
            self._write_best()
        for step in range(start + 1, self.total_steps + 1):
            self.timer.take()  # a step's timings start with it
            yield step
            self._progress.update(1)
            if self.stop_agreed:  # not the local flag: a late signal waits for the next step
                log.warning("%s: stopped at step %d; checkpoint saved", self.kind, step)
                return
            if step >= self.total_steps:  # `end_early` during this step
                return

    def end_early(self, last_step: int) -> None:
        """The run has fewer steps than planned (dynamic sampling can use up the epochs'
        prompts sooner): `last_step` is its final step, checkpointed by `end_step` and counted
        as finished (the final export follows), and `steps()` yields no further step. Called
        during that step, or right after `restore` when the run already ended there."""
        if last_step < self.total_steps:
            log.info(
                "%s: the data ends after step %d of at most %d",
                self.kind,
                last_step,
                self.total_steps,
            )
            self.total_steps = last_step
            if self._progress is not None:
                self._progress.total = last_step
                self._progress.refresh()

    def section(self, name: str):
        """A named timing section of this step (`timings()`)."""
        return self.timer.section(name)

    def timings(self) -> dict[str, float]:
        """`time/<section>_seconds` of this step so far."""
        return {f"time/{k}_seconds": v for k, v in self.timer.take().items()}

    def log(self, metrics: dict, *, step: int, epoch: int, progress: dict | None = None) -> dict:
        if self.best is not None:  # every process: the evaluations' metrics are global
            self.best.note(metrics, step=step, epoch=epoch)
        if self.writer is None:  # not process 0: nothing to write
            return dict(metrics, generation_step=step, epoch=epoch)
        line = self.writer.write(metrics, generation_step=step, epoch=epoch)
        if progress and self._progress is not None:
            self._progress.set_postfix(**progress)
        return line

    # -- evaluations -------------------------------------------------------------------------
    def evaluate_start(self, evaluate: Callable[[], dict]) -> None:
        """Epoch 0: the evaluation of the start weights, logged at step 0 (a stop request during
        it ends the run: nothing trained yet, nothing to save)."""
        try:
            metrics = evaluate()
        except EvaluationInterrupted:
            raise self.stopped_error() from None
        self.log(metrics, step=0, epoch=0)
        self.keep_best(0)

    def finish_interrupted_evaluation(
        self, step: int, meta: dict, epoch: int, evaluate: Callable[[], dict]
    ) -> None:
        """A resumed run whose step `step` was stopped during its evaluation (its metrics wait in
        the checkpoint's meta, `end_step_with_evaluation`): the evaluation, rerun whole, then
        the step's line. Nothing to do for any other restored step."""
        if "pending_metrics" not in meta:
            return
        try:
            metrics = dict(meta["pending_metrics"], **evaluate())
        except EvaluationInterrupted:
            raise self.stopped_error() from None
        self.log(metrics, step=step, epoch=epoch)
        self.keep_best(step)

    def end_step_with_evaluation(
        self,
        step: int,
        state,
        meta: dict,
        metrics: dict,
        *,
        epoch: int,
        evaluate: Callable[[], dict] | None = None,
        progress: dict | None = None,
    ) -> None:
        """The end of step `step`: its evaluation when `evaluate` is given, then its metrics
        line and `end_step`. A stop request during the evaluation abandons it
        (EvaluationInterrupted): the step is checkpointed with its metrics in the meta (its
        line waits), and RunStopped is raised; a resume reruns the evaluation whole
        (`finish_interrupted_evaluation`)."""
        if evaluate is not None:
            try:
                metrics.update(evaluate())
            except EvaluationInterrupted:
                self.end_step(step, state, dict(meta, pending_metrics=metrics))
                raise self.stopped_error() from None
        self.log(metrics, step=step, epoch=epoch, progress=progress)
        self.end_step(step, state, meta)

    # -- the end of a step -------------------------------------------------------------------
    def end_step(self, step: int, state, meta: dict) -> None:
        """Checkpoints every `checkpoint.every_steps`, at the last step and when stopping."""
        self.last_step = step
        if self.stop_after_step == step:
            self.stop_requested = True
        # Several processes stop together: a signal one process saw stops every one, at the
        # same step, with one checkpoint.
        self.stop_agreed = multihost.any_process(self.stop_requested)
        new_best = self.best is not None and self.best.pending and self.best.step == step
        due = (
            step % self.settings.checkpoint.every_steps == 0
            or step == self.total_steps
            or self.stop_agreed
            or new_best
        )
        if new_best:  # kept from now on; the previous best is pruned with the save
            self.checkpointer.protected = {step}
        if due and self.checkpointer is not None:
            self.checkpointer.save(step, state, dict(meta, generation_step=step))
        if new_best:
            self._write_best()

    def keep_best(self, step: int) -> None:
        """After an evaluation logged without `end_step` after it (at the start, step 0: the
        start weights; or the evaluation a stop abandoned, rerun on resume, whose step is
        checkpointed already): keeps it if it is the new best."""
        if self.best is None or not self.best.pending or self.best.step != step:
            return
        self.checkpointer.protected = {step} if step else set()
        self.checkpointer.prune()
        self._write_best()

    def _write_best(self) -> None:
        """The best evaluation's export (`best_hf/`, from the current weights), then its record
        (`best.json`): a record names an export that is whole."""
        best = self.best
        if self.export is not None:
            self.export(self.output_dir / BEST_MODEL)
        if multihost.is_leader():
            atomic_write_text(
                self.output_dir / BEST_RECORD, json.dumps(best.record(), indent=1) + "\n"
            )
        best.pending = False
        log.info(
            "%s: best %s = %.4f at step %d: its checkpoint is kept, its weights are in %s",
            self.kind,
            best.metric,
            best.value,
            best.step,
            self.output_dir / BEST_MODEL,
        )

    def _restore_best(self, start: int) -> None:
        """A resumed run's best so far, from its metric lines (the source of truth); its
        checkpoint is protected again. If a crash cut off the export of the best, and the run
        resumes from that step's checkpoint, the export is redone (`steps`)."""
        best = None
        if multihost.is_leader():
            best = BestEvaluation.from_lines(self.best.metric, read_metrics(self.output_dir))
        best = multihost.allgather_objects(best)[0]
        self.best = best
        if best.step:
            self.checkpointer.protected = {best.step}
        if best.step is None or (
            best.matches(read_best_record(self.output_dir))
            and (self.output_dir / BEST_MODEL).is_dir()
        ):
            return
        if best.step == start:
            best.pending = True  # the restored weights are the best's: export them again
        else:
            log.warning(
                "%s: the export of the best evaluation (step %d) is missing and its weights "
                "are not the restored ones; %s is not rewritten",
                self.kind,
                best.step,
                self.output_dir / BEST_MODEL,
            )

    @property
    def finished(self) -> bool:
        """True when every step ran (a stop requested during the last step cut nothing)."""
        return self.last_step == self.total_steps

    def finish(self, export: Callable[[Path], object] | None) -> None:
        """When every step ran: the final HF export into `final_hf/` (if export is on), then
        `finished: true` in run.json (reports mark runs without it as interrupted)."""
        if not self.finished:
            return
        if export is not None and self.settings.checkpoint.export_hf:
            export(self.output_dir / "final_hf")  # every process: the export may gather
        if self.describe and multihost.is_leader():
            mark_run_finished(self.output_dir)
        multihost.barrier("run finished")
