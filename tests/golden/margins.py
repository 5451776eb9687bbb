"""How far each token the JAX sampler returns is from being another token: the margin that a
golden run's sampled tokens must keep so that no CPU's float rounding can flip one.

A sampled token is decided by comparisons of floats computed from the logits:
- greedy (temperature 0): the largest logit against the second: margin = their difference;
- a draw (inverse CDF): the uniform number's place among the cumulative probabilities: margin =
  its distance to the nearer edge of the drawn token's interval, as a fraction of the kept
  mass (the first and last kept tokens' outer edges are no decision: every draw lands inside);
- top-k / top-p truncation: which tokens are kept: margin = the gap between the smallest kept
  and the largest dropped logit, and (top-p) how far the kept mass is from the top-p threshold.

A perturbation of the logits by less than the margin (in logits, or in probability mass, which
moves by at most the same amount) cannot change the token; float summation order changes the
logits by ~1e-6. `MIN_MARGIN` = 1e-3 is the rule for recording a golden (tests/golden/README.md).

    with sampled_token_margins() as margins:
        ... run anything that samples with the JAX sampler ...
    min(margins)  # one value per returned token
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from maye_jax.rollout import jax_sampler
from maye_jax.rollout.sampling_ops import sample_tokens, truncation_mask

MIN_MARGIN = 1e-3


def decision_margin(
    logits, keys, tokens, temperature, top_k, top_p, *, greedy, use_top_k, use_top_p
) -> jax.Array:
    """[B] margins of `tokens` drawn by `sample_tokens` from `logits` [B, V] with `keys`."""
    logits = logits.astype(jnp.float32)
    ids = jnp.arange(logits.shape[-1])[None, :]
    chosen = ids == tokens[:, None]
    if greedy:
        top = jnp.max(jnp.where(chosen, logits, -jnp.inf), axis=-1)
        return top - jnp.max(jnp.where(chosen, -jnp.inf, logits), axis=-1)
    probs = jax.nn.softmax(logits / temperature.astype(jnp.float32), axis=-1)
    margin = jnp.full(tokens.shape, jnp.inf)
    first_kept = jnp.zeros(tokens.shape, jnp.int32)
    last_kept = jnp.full(tokens.shape, logits.shape[-1] - 1)
    weights = probs
    if use_top_k or use_top_p:
        keep = truncation_mask(probs, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p)
        smallest_kept = jnp.min(jnp.where(keep, logits, jnp.inf), axis=-1)
        margin = smallest_kept - jnp.max(jnp.where(keep, -jnp.inf, logits), axis=-1)
        if use_top_p:  # how far the kept mass is from the top-p threshold, either way
            candidates = probs
            if use_top_k:
                top_k_kept = truncation_mask(probs, top_k, top_p, use_top_k=True, use_top_p=False)
                candidates = jnp.where(top_k_kept, probs, 0.0)
            wanted = top_p * jnp.sum(candidates, axis=-1)
            kept_mass = jnp.sum(jnp.where(keep, probs, 0.0), axis=-1)
            smallest = jnp.min(jnp.where(keep, probs, jnp.inf), axis=-1)
            # dropping the smallest kept token: no decision when it is the only one (the most
            # likely token always survives)
            several = jnp.sum(keep, axis=-1) > 1
            without_smallest = jnp.where(several, wanted - (kept_mass - smallest), jnp.inf)
            mass_margin = jnp.minimum(kept_mass - wanted, without_smallest)
            margin = jnp.minimum(margin, mass_margin)
        weights = jnp.where(keep, probs, 0.0)
        first_kept = jnp.argmax(keep, axis=-1)
        last_kept = keep.shape[-1] - 1 - jnp.argmax(keep[:, ::-1], axis=-1)
    total = jnp.sum(weights, axis=-1)
    target = jax.vmap(jax.random.uniform)(keys) * total
    before = jnp.sum(jnp.where(ids < tokens[:, None], weights, 0.0), axis=-1)
    after = before + jnp.sum(jnp.where(chosen, weights, 0.0), axis=-1)
    low = jnp.where(tokens > first_kept, (target - before) / total, jnp.inf)
    high = jnp.where(tokens < last_kept, (after - target) / total, jnp.inf)
    return jnp.minimum(margin, jnp.minimum(low, high))


@contextlib.contextmanager
def sampled_token_margins():
    """Collects the margin of every token the JAX sampler returns inside the block (tokens
    sampled after a row stopped are not returned and not counted)."""
    margins: list[float] = []
    emitted: list[tuple[np.ndarray, np.ndarray]] = []  # per emitted position: (tokens, margins)

    def sample_and_measure(logits, keys, temperature, top_k, top_p, **flags):
        tokens, logprobs = sample_tokens(logits, keys, temperature, top_k, top_p, **flags)
        margin = decision_margin(logits, keys, tokens, temperature, top_k, top_p, **flags)
        jax.debug.callback(
            lambda t, m: emitted.append((np.asarray(t), np.asarray(m))),
            tokens,
            margin,
            ordered=True,
        )
        return tokens, logprobs

    generate_chunk = jax_sampler.JaxSampler._generate_chunk

    def generate_and_collect(self, prompts, first_index, sampling, step):
        emitted.clear()
        out = generate_chunk(self, prompts, first_index, sampling, step)
        for i, completions in enumerate(out):
            for j, completion in enumerate(completions):
                row = i * sampling.n + j
                for index, token in enumerate(completion.token_ids):
                    drawn, margin = emitted[index]
                    assert int(drawn[row]) == token, "margins out of step with the tokens"
                    margins.append(float(margin[row]))
        return out

    original = jax_sampler.sample_tokens
    jax_sampler._generate.clear_cache()  # traced again, with the measurement in it
    jax_sampler.sample_tokens = sample_and_measure
    jax_sampler.JaxSampler._generate_chunk = generate_and_collect
    try:
        yield margins
    finally:
        jax_sampler.sample_tokens = original
        jax_sampler.JaxSampler._generate_chunk = generate_chunk
        jax_sampler._generate.clear_cache()
