"""DAPO's dynamic sampling (Yu et al. 2025): an update batch of informative prompt groups only.

A prompt group (the `rollout.num_samples` responses of one prompt) whose scores are all equal
(max == min: all correct, all wrong, all penalised) has no signal under a group baseline: its
grpo / rloo advantage is exactly 0 (maye_jax/rl/advantages.py). With `rl.dynamic_sampling` such groups are
dropped, and the step tops its batch up with the next prompts of the epoch order, so the update
batch keeps its size:

    batch, metrics, sampled = fill_batch(
        first, wanted=prompts_per_step, sample_more=..., max_rounds=rl.dynamic_sampling_max_rounds
    )

`sample_more(count, round)` pulls `count` more prompts (the number of groups still missing)
from the data, samples and scores them; it returns None when the epoch has no prompt left.
After `max_rounds` top-ups, or when the epoch runs out, the missing places are filled with the
dropped groups (earliest first): the batch keeps its size (under grpo and rloo those groups
have advantage 0 and add only their KL term). Host-side Python; imports no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass
class PromptGroups:
    """Prompts with their samples and rewards, kept together so groups move as units.

    records / encoded: per prompt; completions: per prompt, its `num_samples` samples;
    rewards: reward name (and "total") -> one value per response, rows prompt-major."""

    records: list
    encoded: list
    completions: list[list]
    rewards: dict[str, list[float]]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_samples(self) -> int:
        return len(self.completions[0]) if self.completions else 0

    def correct(self) -> list[bool]:
        """Per response: the accuracy reward is 1 (all False without an accuracy reward)."""
        accuracy = self.rewards.get("accuracy")
        if accuracy is None:
            return [False] * sum(len(samples) for samples in self.completions)
        return [score >= 1.0 for score in accuracy]

    def informative(self) -> np.ndarray:  # [prompts] bool
        """True for a group whose total scores are not all equal (exact comparison)."""
        if not len(self):
            return np.zeros(0, bool)
        scores = np.asarray(self.rewards["total"], np.float32).reshape(len(self), -1)
        return scores.max(axis=1) != scores.min(axis=1)

    def select(self, prompt_indices: Sequence[int]) -> PromptGroups:
        n = self.num_samples
        rows = [i * n + j for i in prompt_indices for j in range(n)]
        return PromptGroups(
            records=[self.records[i] for i in prompt_indices],
            encoded=[self.encoded[i] for i in prompt_indices],
            completions=[self.completions[i] for i in prompt_indices],
            rewards={name: [values[r] for r in rows] for name, values in self.rewards.items()},
        )

    def __add__(self, other: PromptGroups) -> PromptGroups:
        if not len(self):
            return other
        if not len(other):
            return self
        if other.rewards.keys() != self.rewards.keys():
            raise ValueError(
                f"reward names differ: {sorted(self.rewards)} vs {sorted(other.rewards)}"
            )
        return PromptGroups(
            records=self.records + other.records,
            encoded=self.encoded + other.encoded,
            completions=self.completions + other.completions,
            rewards={name: values + other.rewards[name] for name, values in self.rewards.items()},
        )


def empty_groups() -> PromptGroups:
    return PromptGroups([], [], [], {})


def fill_batch(
    first: PromptGroups,
    *,
    wanted: int,
    sample_more: Callable[[int, int], PromptGroups | None],
    max_rounds: int,
) -> tuple[PromptGroups, dict[str, float], PromptGroups]:
    """(the update batch of exactly `wanted` groups, metrics, every group sampled this step).

    `first` holds `wanted` groups. Informative groups are kept in the order they were sampled;
    `sample_more(count, round)` (round 1, 2, ...) is asked for the `count` groups still missing
    until the batch is full, `max_rounds` rounds were used, or it returns None (no prompt left).
    Metrics: dynamic_sampling/{groups_dropped (left out of the batch), groups_refilled (put
    back to keep its size), extra_prompts (pulled beyond `wanted`), rounds}.
    """
    if len(first) != wanted:
        raise ValueError(
            f"dynamic sampling: the first round holds {len(first)} groups, not {wanted}"
        )
    sampled = first
    kept = first.select(np.flatnonzero(first.informative()).tolist())
    rounds = 0
    while len(kept) < wanted and rounds < max_rounds:
        more = sample_more(wanted - len(kept), rounds + 1)
        if more is None or not len(more):
            break
        rounds += 1
        sampled = sampled + more
        kept = kept + more.select(np.flatnonzero(more.informative()).tolist())
    kept = kept.select(range(min(len(kept), wanted)))
    dropped = np.flatnonzero(~sampled.informative()).tolist()
    refill = dropped[: wanted - len(kept)]
    batch = kept + sampled.select(refill)
    metrics = {
        "dynamic_sampling/groups_dropped": float(len(dropped) - len(refill)),
        "dynamic_sampling/groups_refilled": float(len(refill)),
        "dynamic_sampling/extra_prompts": float(len(sampled) - wanted),
        "dynamic_sampling/rounds": float(rounds),
    }
    return batch, metrics, sampled


def top_up_seed(seed: int, step: int, round_index: int) -> int:
    """The rollout seed of top-up round `round_index` (>= 1) of generation step `step`: its
    samples are independent of the first round's (whose seed is the run's own)."""
    mixed = np.random.SeedSequence([seed, step, round_index, 0x5EED]).generate_state(1)
    return int(mixed[0] & 0x7FFFFFFF)
