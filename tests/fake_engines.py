"""Sampling for the tests' stand-in rollout engines, honouring what a real engine honours.

A real engine's sample depends on (Sampling.seed, generation step, global prompt index, sample
index) and on the temperature and top-p, and nothing else (`maye_jax.rollout.engine`): the
stand-ins draw the same way, so a caller that passes a wrong seed, step, prompt index or
temperature gets other samples from them too. Each prompt has a small "vocabulary" of choices
with fixed logits (canned answers, fake tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from maye_jax.rollout.engine import Sampling, request_seed


def fake_draw(
    logits: Sequence[float], sampling: Sampling, *, step: int, prompt_index: int, sample_index: int
) -> tuple[int, float]:
    """(choice, its logprob) drawn from `softmax(logits / temperature)` after top-p truncation,
    with one uniform number from `request_seed(seed, step, prompt_index, sample_index)`;
    temperature 0 is greedy (the first largest logit, logprob at temperature 1), as the JAX
    sampler's. The logprob is the temperature-scaled one before truncation, as every engine's."""
    logits = np.asarray(logits, np.float64)
    if sampling.temperature == 0:
        choice = int(np.argmax(logits))
        return choice, float(logits[choice] - np.logaddexp.reduce(logits))
    scaled = logits / sampling.temperature
    logprobs = scaled - np.logaddexp.reduce(scaled)
    probs = np.exp(logprobs)
    order = np.argsort(-probs, kind="stable")
    # top-p: the most likely choices until their mass reaches top_p (the first always kept)
    kept_count = int(np.searchsorted(np.cumsum(probs[order]), sampling.top_p) + 1)
    kept = np.zeros(len(probs), bool)
    kept[order[:kept_count]] = True
    weights = np.where(kept, probs, 0.0)
    uniform = np.random.default_rng(
        request_seed(sampling.seed, step, prompt_index, sample_index)
    ).random()
    cumulative = np.cumsum(weights) / weights.sum()
    choice = int(min(np.searchsorted(cumulative, uniform, side="right"), len(probs) - 1))
    while not kept[choice]:  # rounding at the upper end of the last kept choice
        choice -= 1
    return choice, float(logprobs[choice])
