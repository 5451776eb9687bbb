"""Next-token sampling for the JAX sampler: temperature, top-k, top-p, greedy (pure functions).

The order follows transformers and vLLM: scale the logits by 1/temperature, keep the top-k, then
keep the smallest set of the remaining tokens whose probability mass (renormalised after top-k)
reaches top_p, and draw from what is left. The returned log-probability of a drawn token is
SPEC §3's: `log_softmax(logits / temperature)` over the full vocabulary, before any truncation
(greedy: temperature 1).

Nothing here sorts the vocabulary (a sort of [rows, 152k] per token costs more than a small
model's decode step). Truncation finds each row's probability threshold by bisection over the
float bit patterns (32 masked reductions, exact), and a draw is an inverse-CDF search with one
uniform number per row, in two levels (blocks of ids, then ids inside the block). Ties at a
threshold are all kept, as transformers' top-k does.

Greedy decoding takes the argmax in two levels too (the maxima of blocks of ids, then inside the
winning block): XLA's CPU argmax over the 152k vocabulary (a reduction over value-index pairs)
costs about four plain max passes, which made greedy decoding slower than sampling.

Every row has its own random key, so a row's draw does not depend on the other rows of its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_BLOCK = 1024  # ids per block of the two-level inverse-CDF search


def truncation_mask(
    probs: jax.Array, top_k: jax.Array, top_p: jax.Array, *, use_top_k: bool, use_top_p: bool
) -> jax.Array:
    """Which tokens survive top-k (`top_k` > 0) then top-p: bool [B, V].

    probs [B, V] (softmax of the temperature-scaled logits); top_k, top_p scalars. A token is
    kept if its probability is >= the row's threshold: the k-th largest probability for top-k;
    for top-p the largest p_t such that the tokens with probability >= p_t hold at least top_p
    of the top-k mass. The most likely token always survives.
    """
    keep = jnp.ones(probs.shape, bool)
    if use_top_k:
        k = jnp.where(top_k > 0, top_k, probs.shape[-1])
        keep = _at_least(probs, lambda kept: jnp.sum(kept, axis=-1) >= k)
    if use_top_p:
        kept_probs = jnp.where(keep, probs, 0.0)
        wanted = top_p * jnp.sum(kept_probs, axis=-1)
        keep = keep & _at_least(
            kept_probs, lambda kept: jnp.sum(jnp.where(kept, kept_probs, 0.0), axis=-1) >= wanted
        )
    return keep


def _at_least(probs: jax.Array, enough) -> jax.Array:
    """`probs >= t` [B, V] for each row's largest threshold t with `enough(probs >= t)` true.

    `enough` maps a candidate mask [B, V] to bool [B] and must be monotone (true for t = 0).
    Non-negative floats order like their int32 bit patterns, so 31 bisection steps over the
    bits find t exactly.
    """
    bits = jax.lax.bitcast_convert_type(probs.astype(jnp.float32), jnp.int32)
    low = jnp.zeros(probs.shape[:-1], jnp.int32)  # enough(bits >= low) holds
    high = jnp.max(bits, axis=-1) + 1  # enough(bits >= high) fails: nothing is kept

    def halve(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        ok = enough(bits >= middle[:, None])
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

    low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))
    return bits >= low[:, None]


def sample_from_weights(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index i of each row with probability weights[i] / sum(weights): inverse CDF over ids.

    weights [B, V] >= 0 (not all zero); uniform [B] in [0, 1). The search runs over blocks of
    `_BLOCK` ids, then inside the chosen block, so only short cumulative sums are needed.
    """
    batch, vocab = weights.shape
    block = min(_BLOCK, vocab)
    padded = -(-vocab // block) * block
    blocks = jnp.pad(weights, ((0, 0), (0, padded - vocab))).reshape(batch, padded // block, block)
    block_mass = jnp.sum(blocks, axis=-1)  # [B, num_blocks]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = uniform * block_cdf[:, -1]
    chosen = _first_above(block_cdf, target, block_mass > 0)
    in_block = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
    mass_before = jnp.take_along_axis(block_cdf - block_mass, chosen[:, None], axis=1)[:, 0]
    offset = _first_above(jnp.cumsum(in_block, axis=-1), target - mass_before, in_block > 0)
    return chosen * block + offset


def _first_above(cdf: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """First index with cdf > target, clamped to the first..last positive-weight index (float
    rounding can put the target just outside the mass)."""
    size = cdf.shape[-1]
    index = jnp.sum(cdf <= target[:, None], axis=-1)
    first = jnp.argmax(positive, axis=-1)
    last = size - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.clip(index, first, last)


def greedy_tokens(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`jnp.argmax(logits, -1)` (the first index of the row's maximum) and the row maxima, for
    logits [B, V]: the maxima of blocks of ids, then the argmax inside the first block holding
    the maximum. The block is the largest divisor of V up to 2048 (151936 = 128 x 1187), so the
    blocks are a reshape, not a padded copy; a V without one falls back to jnp.argmax."""
    batch, vocab = logits.shape
    block = next((b for b in range(min(2048, vocab), 31, -1) if vocab % b == 0), None)
    if block is None or block == vocab:
        return jnp.argmax(logits, axis=-1), jnp.max(logits, axis=-1)
    blocks = logits.reshape(batch, vocab // block, block)
    block_max = jnp.max(blocks, axis=-1)  # [B, V / block]
    chosen = jnp.argmax(block_max, axis=-1)
    inside = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
    return chosen * block + jnp.argmax(inside, axis=-1), jnp.max(block_max, axis=-1)


def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    greedy: bool,
    use_top_k: bool = False,
    use_top_p: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-probability.

    logits [B, V] (any float dtype; computed in fp32); keys [B] typed PRNG keys (one uniform
    number per row is drawn). `greedy` takes the argmax; `use_top_k` / `use_top_p` switch the
    truncations on (static: with both off no threshold is searched). Returns tokens [B] int32
    and logprobs [B] fp32.
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        tokens, row_max = greedy_tokens(logits)
        tokens = tokens.astype(jnp.int32)
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
        # jax.nn.logsumexp's arithmetic, with the row maxima found already
        shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
        log_norm = jnp.log(jnp.sum(jnp.exp(logits - shift[:, None]), axis=-1)) + shift
        return tokens, chosen - log_norm
    scaled = logits / temperature.astype(jnp.float32)
    probs = jax.nn.softmax(scaled, axis=-1)
    if use_top_k or use_top_p:
        keep = truncation_mask(probs, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p)
        probs = jnp.where(keep, probs, 0.0)
    tokens = sample_from_weights(probs, jax.vmap(jax.random.uniform)(keys))
    tokens = tokens.astype(jnp.int32)
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - jax.nn.logsumexp(scaled, axis=-1)
