"""A run's rollouts: its engine, and which weights version the engine holds.

    rollouts = Rollouts(engine, weights=policy.local_model)   # or OverlappedRollouts (overlap.py)
    completions = rollouts.generate(step, prompts, sampling)  # the current weights first
    rollouts.weights_changed(step)                            # after the update of `step`
    rollouts.sync()                                           # e.g. before an evaluation

`version` is the trainer's: the generation step whose update made the current weights (0: the
start weights; a resumed run's restored step). The engine gets the weights (`load_policy`: in
process no copy, a torch-side worker through shared memory) only when the version it holds
differs, so an evaluation right before a step does not sync twice; this object is the one
record of that version, for the synchronous loop, the overlapped one, SFT's evaluations and
the checkpoints. The JAX sampler and the worker stamp each completion with the version they
were last given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from maye_jax.rollout.engine import Completion, Prompt, Sampling

Ahead = Callable[[], tuple[Sequence[Prompt], Sampling] | None]
"""The next step's (prompts, sampling), or None after the run's last step (overlapped only)."""


class Rollouts:
    """Synchronous rollouts: each step loads the current weights, then samples."""

    def __init__(self, engine, weights: Callable[[], object]):
        self.engine = engine
        self.weights = weights  # -> the current policy as a module (Policy.local_model)
        self.version = 0  # of the trainer's current weights
        self.engine_version: int | None = None  # the version the engine holds (None: its own)
        # Times each sync (the run harness sets its "sync" section); always entered, so every
        # step has a sync time, 0 when the engine held the weights already.
        self.sync_section: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        # overlapped rollouts: the weights version of each response of the last step
        self.weights_versions: list[int] | None = None

    def weights_changed(self, version: int) -> None:
        """The trainer's weights are now those of `version` (an update, or a restore)."""
        self.version = version

    def sync(self) -> None:
        """The engine gets the current weights unless it holds them (after any generation in
        flight); several processes: this host's copy, so no host waits on another to sample."""
        self.wait()
        with self.sync_section():
            if self.engine_version != self.version:
                self.engine.load_policy(self.weights(), self.version)
                self.engine_version = self.version

    def generate(
        self,
        step: int,
        prompts: Sequence[Prompt],
        sampling: Sampling,
        *,
        first_index: int = 0,
        ahead: Ahead | None = None,
    ) -> list[list[Completion]]:
        """Step `step`'s completions of `prompts` with the current weights; prompt i draws with
        the seeds of global prompt index `first_index + i`. `ahead`: used by overlapped
        rollouts only."""
        del ahead
        self.sync()
        return self.engine.generate(prompts, sampling, step=step, first_index=first_index)

    def wait(self) -> None:
        """When an update ends: nothing runs beside it here (overlapped rollouts wait for the
        generation in flight)."""

    def metrics(self, step: int) -> dict[str, float]:
        del step
        return {}

    def checkpoint_fields(self) -> dict:
        """What a checkpoint of the loop holds for the rollouts (nothing here)."""
        return {}

    def restore(self, meta: dict) -> None:
        """After a restore: the checkpoint's `checkpoint_fields`."""
        del meta

    def close(self) -> None:
        self.engine.close()
