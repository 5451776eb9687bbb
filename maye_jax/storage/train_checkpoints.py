"""Training checkpoints for exact resume: the train state plus where the run stands.

`OUTPUT_DIR/checkpoints/<step>/` holds the sharded train state (trainable params in fp32,
AdamW moments, the update counter; Orbax) and `meta` (JSON): always `generation_step` (the
step it was written after), plus what the loop adds (RL: `seed`, `weights_version`,
`epoch_correct`, the current epoch's per-response correctness so far, and `data_cursor`, the
[epoch, position] the next step reads its prompts from; SFT: `seed`, `kind`). Every random
draw derives from (seed, step), so this is all a resumed run needs to continue exactly where it
stopped. The reference model is the run's start model
(`OUTPUT_DIR/start_model`), reloaded on resume.

Integrity. Each checkpoint gets a digest as it is written (storage/digest.py; nothing is
re-read): `digest.process_<i>.json`, one per process, lists the files that process wrote with
their sizes (process i owns `*/ocdbt.process_<i>/` and `*/process_<i>`, process 0 also every
other file), and
process 0's also holds the content digest of every state array, computed on the devices from
the arrays being saved, and a SHA-256 of `meta`. Before a checkpoint is trusted its listing is
checked (a missing or truncated file), then it is restored (a file that does not parse fails
the restore) and the digest of what came back is compared (bytes that changed but load). One
that fails is skipped with a warning naming what was wrong, the newest intact one is restored,
and the damaged newer ones are deleted; none intact is an error (`CheckpointError`). With
several processes, process i checks the listings of processes i, i + P, ... and all agree on
the step they restore.

Retention: Orbax keeps everything (its own `max_to_keep` deletes before the new checkpoint is
written); once a new checkpoint is complete and its listing checked, the ones beyond `keep`
are deleted, so even with keep=1 the previous checkpoint remains until its successor is whole.
Steps in `protected` (the best evaluation's, `checkpoint.keep_best`) are kept besides them.
A write that fails (a full disk) removes its partial files and raises `CheckpointWriteError`
naming the real error and the last good checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import jax

from maye_jax.errors import UserError
from maye_jax.run import multihost
from maye_jax.run.multihost import barrier, process_count, process_index
from maye_jax.storage.atomic import atomic_write_text
from maye_jax.storage.digest import content_digests, file_sizes, json_digest, listing_problems

log = logging.getLogger("maye_jax")

DIGEST_FORMAT = 1
_OWNER = re.compile(r"(?:^|/)(?:ocdbt\.)?process_(\d+)(?:/|$)")  # files one process wrote


class CheckpointError(UserError):
    """No checkpoint of the run can be trusted (a CLI prints it as one line and exits 1)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the previous ones are intact)."""


def digest_name(process: int) -> str:
    return f"digest.process_{process}.json"


class TrainCheckpointer:
    def __init__(self, output_dir, *, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.keep = keep
        self.protected: set[int] = set()  # kept whatever their age (the best evaluation's)
        self.directory = Path(output_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # pruned here, after the new checkpoint is whole
            create=True,
            cleanup_tmp_directories=True,  # what a killed write left
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        _OrbaxLateErrors.install()

    # -- listing ------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Every step with a folder, newest first (complete or not: the digest decides)."""
        found = [int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(_same_on_every_process(found), reverse=True)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[0] if steps else None

    # -- writing ------------------------------------------------------------------------------
    def save(self, generation_step: int, state, meta: dict) -> None:
        """Writes step `generation_step` with its digest, checks it, then prunes old ones."""
        ocp = self._ocp
        step_dir = self.directory / str(generation_step)
        if step_dir.exists():
            raise CheckpointWriteError(
                f"{step_dir} exists already (an earlier run in this folder): resume it "
                "(--config.resume=True) or choose another output_dir"
            )
        try:
            arrays = content_digests(state)  # on the devices, from the values being written
            self._manager.save(
                generation_step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self._manager.wait_until_finished()
            self._write_digest(step_dir, arrays, meta)
            barrier(f"checkpoint:{generation_step}:digests")
            problem = _agreed(self._listing_problem(generation_step))
            if problem:
                raise CheckpointWriteError(f"{step_dir} does not match its listing: {problem}")
        except Exception as error:
            self._abandon(generation_step)
            previous = [s for s in self.steps() if s < generation_step]
            last_good = (
                f"step {previous[0]} ({self.directory / str(previous[0])})"
                if previous
                else "none yet"
            )
            raise CheckpointWriteError(
                f"checkpoint of step {generation_step} not written: {_describe(error)}; "
                f"the last good checkpoint is {last_good}"
            ) from error
        self.prune()

    def _write_digest(self, step_dir: Path, arrays: dict[str, str], meta: dict) -> None:
        me, count = process_index(), process_count()

        def owned(relative: str) -> bool:
            match = _OWNER.search(relative)
            owner = int(match.group(1)) if match else 0
            # digest files (and their temporary names) are being written by the others now
            return owner == me and "digest.process_" not in relative

        record = dict(
            format=DIGEST_FORMAT,
            process=me,
            num_processes=count,
            files=file_sizes(step_dir, owned),
        )
        if me == 0:
            record.update(arrays=arrays, meta_sha256=json_digest(meta))
        atomic_write_text(step_dir / digest_name(me), json.dumps(record, indent=1) + "\n")

    def _abandon(self, generation_step: int) -> None:
        """After a failed write: quiet Orbax's late reports (the real error is raised) and
        remove the step's partial files, so the last good checkpoint is the newest."""
        _OrbaxLateErrors.after_failure = True
        if multihost.is_leader():
            # Orbax's other writes may still be in flight and recreate folders: remove until
            # nothing comes back for a while (bounded; the next start removes what is left).
            deadline, quiet_since = time.monotonic() + 10.0, None
            while time.monotonic() < deadline:
                partial = [
                    path
                    for path in self.directory.glob(f"{generation_step}*")
                    if path.name == str(generation_step)
                    or path.name.startswith(f"{generation_step}.orbax-checkpoint-tmp")
                ]
                for path in partial:
                    shutil.rmtree(path, ignore_errors=True)
                if partial:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 0.5:
                    break
                time.sleep(0.05)
        self._reload()

    def prune(self) -> None:
        for step in self.steps()[self.keep :]:
            if step not in self.protected:
                self._delete(step)

    def _delete(self, step: int) -> None:
        self._reload()
        if step in self._manager.all_steps():
            self._manager.delete(step)
        elif multihost.is_leader():  # a folder Orbax does not list (damaged)
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
        barrier(f"checkpoint:{step}:deleted")
        self._reload()

    def _reload(self) -> None:
        try:
            self._manager.reload()
        except Exception as error:  # noqa: BLE001 - a damaged folder must not stop the listing
            log.debug("reloading the checkpoint list: %r", error)

    # -- reading ------------------------------------------------------------------------------
    def restore(self, generation_step: int, abstract_state):
        """(state, meta) of one step, unchecked; `abstract_state` has ShapeDtypeStructs with the
        target shardings, so each device reads only its own shards."""
        ocp = self._ocp
        self._reload()
        restored = self._manager.restore(
            generation_step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, state, state_shardings):
        """(state, meta) of the newest intact checkpoint, read onto `state`'s shapes and
        `state_shardings`; None when there is none at all. Damaged ones are skipped (with a
        warning) and deleted once an older one is restored; CheckpointError when none is
        intact."""
        steps = self.steps()
        if not steps:
            return None
        abstract = abstract_like(state, state_shardings)
        skipped = []
        for step in steps:
            restored, problem = self._restore_checked(step, abstract)
            if problem is None:
                for newer, _ in skipped:
                    self._delete(newer)
                return restored
            path = self.directory / str(step)
            log.warning("checkpoint %s cannot be trusted: %s; trying the one before", path, problem)
            skipped.append((step, problem))
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {step}: {problem}" for step, problem in skipped)
            + ". Delete the folder to start over, or restore a copy."
        )

    def _restore_checked(self, step: int, abstract):
        """((state, meta), None) when step `step` is intact on every process, else
        (None, what is wrong)."""
        problem = _agreed(self._listing_problem(step))
        if problem:
            return None, problem
        restored, problem = None, None
        try:
            restored = self.restore(step, abstract)
        except Exception as error:  # noqa: BLE001 - any unreadable file means: not intact
            problem = f"it does not restore: {_describe(error)}"
        problem = _agreed(problem)
        if problem:
            return None, problem
        problem = _agreed(self._content_problem(step, *restored))
        return (None, problem) if problem else (restored, None)

    def _listing_problem(self, step: int) -> str | None:
        """What is wrong with the files of the processes this one checks, or None."""
        step_dir = self.directory / str(step)
        first = _read_digest(step_dir, 0)
        if isinstance(first, str):
            return first
        count = int(first.get("num_processes", 1))
        me, processes = process_index(), process_count()
        for writer in range(me, count, processes):
            record = first if writer == 0 else _read_digest(step_dir, writer)
            if isinstance(record, str):
                return record
            problems = listing_problems(step_dir, record.get("files", {}))
            if problems:
                return "; ".join(problems)
        return None

    def _content_problem(self, step: int, state, meta: dict) -> str | None:
        record = _read_digest(self.directory / str(step), 0)
        if isinstance(record, str):
            return record
        if json_digest(meta) != record.get("meta_sha256"):
            return "meta differs from what was written"
        found, written = content_digests(state), record.get("arrays", {})
        changed = [name for name in written if found.get(name) != written[name]]
        missing = sorted(set(found) - set(written))
        if changed or missing:
            names = ", ".join((changed + missing)[:3])
            return (
                f"{len(changed) + len(missing)} state arrays differ from what was written "
                f"(e.g. {names}): a data file was changed"
            )
        return None

    def close(self) -> None:
        try:
            self._manager.close()
        except Exception as error:  # noqa: BLE001 - after a failed write, it re-raises that
            log.debug("closing the checkpoint manager: %r", error)


def _read_digest(step_dir: Path, process: int) -> dict | str:
    """Process `process`'s digest record of a step folder, or what is wrong with it."""
    path = step_dir / digest_name(process)
    if not path.is_file():
        return f"{path.name} is missing (the write did not complete)"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{path.name} is unreadable ({error})"
    if record.get("format") != DIGEST_FORMAT:
        return f"{path.name} has format {record.get('format')}, expected {DIGEST_FORMAT}"
    return record


def _agreed(problem: str | None) -> str | None:
    """`problem` when this or any other process found one (every process gets a non-None)."""
    first = multihost.first_flagged(problem is not None)
    if problem is None and first is not None:
        return f"damaged on process {first}"
    return problem


def _same_on_every_process(steps: list[int]) -> list[int]:
    """Process 0's list, so all processes walk the same steps (a shared file system)."""
    return multihost.leader_value(steps)


def _describe(error: BaseException) -> str:
    """The error's type and the first line of its message (Orbax's are very long)."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left on device" in str(error)
    ):
        message = f"the disk is full (No space left on device): {message}"
    return f"{type(error).__name__}: {message[:500]}"


class _OrbaxLateErrors:
    """When one of Orbax's writes fails (a full disk), its other writes still in flight report
    "Event loop is closed" through sys.unraisablehook (hundreds of tracebacks, before and after
    the real error reaches us), and at exit the coroutines that never finished report too.
    None of them says anything the real error does not; this filter drops the first kind
    always and, after a failed write, anything raised inside Orbax's coroutines."""

    installed = False
    after_failure = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        cls.installed = True
        previous = sys.unraisablehook

        def hook(unraisable):
            value = unraisable.exc_value
            if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
                return
            if cls.after_failure and (
                "orbax" in repr(unraisable.object) or "shutting down" in str(value)
            ):
                return
            previous(unraisable)

        sys.unraisablehook = hook


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` placed with `shardings` (a tree of the same structure)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )


def start_model_dir(output_dir) -> Path:
    return Path(output_dir).absolute() / "start_model"


def has_start_model(output_dir) -> bool:
    return os.path.isfile(start_model_dir(output_dir) / "maye_jax.json")
