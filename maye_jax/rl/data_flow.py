"""Step 1 of MAYE: the training prompts of an RL run, step by step.

    prompts = TrainPrompts(data["train"], processor, instruction, settings)
    records, encoded = prompts.take(count)       # the next records of the epoch -> model inputs

The epoch order and the place the next step reads from are the data cursor's
(maye_jax/data/cursor.py, saved in every checkpoint: `state`, `restore`); several processes
each take their contiguous share of a step's prompts (all samples of a prompt stay on one host,
so GRPO/RLOO groups stay local). The model inputs are the processor's encoding of the record's
images and question under the run's instruction (the pixels decoded here, when a step needs
them). Host-side; imports no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from maye_jax.data.cursor import EpochCursor
from maye_jax.data.records import Record
from maye_jax.rollout.engine import Prompt, Sampling


class TrainPrompts:
    """The training records read step by step (see the module doc)."""

    def __init__(self, records: Sequence[Record], processor, instruction: str, settings):
        from maye_jax.run import multihost

        self.records = records
        self.processor = processor
        self.instruction = instruction
        self.seed = settings.seed
        self.num_epochs = settings.rl.num_epochs
        self.prompts_per_step = settings.rl.batch_size // settings.rollout.num_samples
        self.share: slice | None = None  # several processes: this one's part of each step's
        if multihost.multiprocess():
            self.share = multihost.share(self.prompts_per_step, "config.rl.batch_size's prompts")
        self.cursor = EpochCursor(len(records), self.seed)

    @property
    def epoch(self) -> int:
        """The epoch the next step reads (0-based)."""
        return self.cursor.epoch

    def encode(self, record: Record) -> dict:
        return self.processor.encode_record(record, self.instruction)

    def take(self, count: int) -> tuple[list[Record], list[dict]]:
        """The next `count` records of the epoch order (fewer if the epoch has fewer left; this
        process's share of them) and their model inputs; the cursor moves past them."""
        picked = self.cursor.take(count)
        if self.share is not None:
            picked = picked[self.share]
        records = [self.records[i] for i in picked]
        return records, [self.encode(r) for r in records]

    def next_step(self) -> list[Prompt] | None:
        """The prompts the next step will read (the cursor does not move), or None when the
        epochs are over: what overlapped rollouts generate ahead (one process)."""
        cursor = dataclasses.replace(self.cursor)
        cursor.end_epoch_if_short(self.prompts_per_step)
        if cursor.epoch >= self.num_epochs:
            return None
        picked = cursor.take(self.prompts_per_step)
        return [Prompt.of(self.encode(self.records[i])) for i in picked]

    def end_epoch_if_short(self) -> bool:
        """After a step: True when fewer than a step's prompts are left, and the next epoch
        begins (the rest is skipped, as a drop-last loader does)."""
        return self.cursor.end_epoch_if_short(self.prompts_per_step)

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> list[int]:
        return self.cursor.state()

    def restore(self, state: list[int] | None, *, step: int, steps_per_epoch: int) -> None:
        """The cursor of a checkpoint's meta (`state`), written after step `step`."""
        self.cursor = EpochCursor.restore(
            len(self.records),
            self.seed,
            state,
            step=step,
            steps_per_epoch=steps_per_epoch,
            prompts_per_step=self.prompts_per_step,
        )


def step_sampling(rollout, seed: int, step: int, round_index: int = 0) -> Sampling:
    """How generation step `step` samples (`rollout`: the run's RolloutSettings): round 0 with
    the run's seed, a dynamic-sampling top-up round with its own (`top_up_seed`)."""
    from maye_jax.qwen_ids import STOP_TOKEN_IDS
    from maye_jax.rl.dynamic_sampling import top_up_seed

    return Sampling(
        n=rollout.num_samples,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=-1 if rollout.top_k is None else rollout.top_k,
        max_tokens=rollout.max_tokens,
        seed=seed if round_index == 0 else top_up_seed(seed, step, round_index),
        stop_token_ids=STOP_TOKEN_IDS,
    )
