"""Log-probabilities of given tokens without materialising [batch, seq, vocab] logits.

With a 152k vocabulary, fp32 logits for one 4k-token sequence take 2.4 GB. We walk the sequence
in chunks: each chunk's logits [B, C, V] exist only inside one step of a `lax.map`, and the step
is rematerialised in the backward pass, so peak memory is one chunk's logits either way. A
sequence that fits one chunk is not rematerialised: its logits are the peak already, and keeping
them for the backward pass saves recomputing the vocabulary product (a third more work on the
head, which at a 152k vocabulary and few layers is most of the update).

Log-probabilities are `log_softmax(logits / temperature)` over the full vocabulary (SPEC §3),
accumulated in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from maye_jax.models.layers import matmul_precision


def token_logprobs(
    hidden: jax.Array,
    output_embedding: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    with_entropy: bool = False,
):
    """logprob of `targets[b, t]` under the distribution that `hidden[b, t]` predicts.

    hidden [B, L, D]; output_embedding [V, D] (lm_head or tied embedding); targets [B, L] int.
    Returns logprobs [B, L] fp32, and the entropy [B, L] fp32 of each predicted distribution
    when `with_entropy`.
    """
    batch, length, dim = hidden.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    padded = num_chunks * chunk
    if padded != length:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - length)))
    # [num_chunks, B, C, ...] so lax.map walks the sequence.
    hidden_chunks = rearrange(hidden, "b (n c) d -> n b c d", c=chunk)
    target_chunks = rearrange(targets, "b (n c) -> n b c", c=chunk)
    weight = output_embedding.astype(hidden.dtype)

    def one_chunk(args):
        hidden_chunk, target_chunk = args
        # One [B * C, D] @ [D, V] product (not "bcd,vd->bcv"): XLA:CPU transposes the
        # gradient of a product that contracts over two dimensions (see layers.Linear).
        logits = jnp.einsum(
            "nd,vd->nv",
            hidden_chunk.reshape(-1, dim),
            weight,
            precision=matmul_precision(hidden.dtype),
            preferred_element_type=jnp.float32,
        ).reshape(*hidden_chunk.shape[:-1], -1)
        logits = logits / jnp.float32(temperature)
        log_normalizer = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, target_chunk[..., None], axis=-1)[..., 0]
        logprob = target_logit - log_normalizer
        if not with_entropy:
            return logprob, jnp.zeros_like(logprob)
        # -sum p log p on normalised log-probs: no cancellation between two large terms.
        token_logp = logits - log_normalizer[..., None]
        entropy = -jnp.sum(jnp.exp(token_logp) * token_logp, axis=-1)
        return logprob, entropy

    if num_chunks == 1:
        logprobs, entropy = jax.tree.map(lambda x: x[None], one_chunk((hidden, targets)))
    else:
        remat_chunk = jax.checkpoint(one_chunk, prevent_cse=False)
        logprobs, entropy = jax.lax.map(remat_chunk, (hidden_chunks, target_chunks))
    logprobs = rearrange(logprobs, "n b c -> b (n c)")[:, :length]
    if not with_entropy:
        return logprobs
    return logprobs, rearrange(entropy, "n b c -> b (n c)")[:, :length]


def next_token_logprobs(hidden, output_embedding, input_ids, **kwargs):
    """logprob of input_ids[:, t + 1] given the prefix up to t: [B, L - 1] (and entropy)."""
    return token_logprobs(hidden[:, :-1], output_embedding, input_ids[:, 1:], **kwargs)
