"""The one interface every rollout engine implements (JAX sampler, hf worker, vLLM worker).

This module imports no JAX (the torch-side worker imports it in its own environment).

Log-probabilities follow SPEC §3: `log_softmax(logits / temperature)` over the full vocabulary,
before any top-k / top-p truncation, of each sampled token. A completion ends at its first stop
token (included in `token_ids`, finish_reason "stop") or after `max_tokens` ("length").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from maye_jax.qwen_ids import STOP_TOKEN_IDS as DEFAULT_STOP_TOKEN_IDS


@dataclasses.dataclass(frozen=True)
class Prompt:
    prompt_token_ids: np.ndarray  # [L] int, the chat-formatted prompt, image pads expanded
    pixel_values: np.ndarray | None = None  # [P, 1176] float32, exactly what the trainer uses
    image_grid_thw: np.ndarray | None = None  # [N, 3] int

    @classmethod
    def of(cls, encoded: Mapping[str, np.ndarray | None]) -> Prompt:
        """The prompt of a processor output (`Processor.encode`)."""
        return cls(encoded["input_ids"], encoded["pixel_values"], encoded["image_grid_thw"])


@dataclasses.dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    max_tokens: int = 2048
    seed: int = 0
    stop_token_ids: tuple[int, ...] = DEFAULT_STOP_TOKEN_IDS

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclasses.dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length"
    # The weights version (the trainer's generation step whose update made them) that sampled
    # it; None where the engine was never told one.
    weights_version: int | None = dataclasses.field(default=None, compare=False)


def request_seed(seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """A per-request seed derived from (run seed, generation step, prompt, sample), so that every
    engine draws reproducibly and independently of batching."""
    mixed = np.random.SeedSequence([seed, step, prompt_index, sample_index]).generate_state(1)
    return int(mixed[0] & 0x7FFFFFFF)


class RolloutEngine(Protocol):
    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, *, step: int = 0, first_index: int = 0
    ) -> list[list[Completion]]:
        """Per prompt, `sampling.n` completions; prompt i draws with the seeds of global prompt
        index `first_index + i` (`request_seed`), so results do not depend on how the prompts
        are split into calls (evaluation batches, hosts)."""

    def load_policy(self, model, version: int) -> None:
        """Samples from `model` (a Flax module) from now on; its completions record `version`."""

    def sync_weights(self, named_hf_arrays: Mapping[str, np.ndarray], version: int) -> str:
        """Loads new weights (HF names and layouts); returns the checksum the engine verified."""

    def close(self) -> None: ...
