"""The sampler's KV cache: each prompt's keys/values once, shared by its n sample rows.

GRPO draws n samples per prompt. A cache of [rows, P + R] slots per layer would hold n copies
of every prompt's keys and values, made once after the prefill and then read n times at every
decode step. Here a layer's cache keeps them once, [prompts, P, ...], beside each row's own
response slots, [prompts * n, R, ...] (rows of one prompt adjacent: row = prompt * n + sample).
At a decode step the n rows of a prompt are n queries against the prompt's keys, one product
per prompt, and each row also attends to its own response keys; both score sets share one
softmax, so the result is attention over the row's whole sequence.

    prompt slots:    prompt i      [pad..pad prompt_i]          (P slots, left-padded)
    response slots:  row i*n + j   [token 0, token 1, ... unused] (R slots)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from maye_jax.models.layers import matmul_precision

_NEG_INF = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedPrefixCache:
    """One layer's cache (see the module doc)."""

    prompt_keys: jax.Array  # [Bp, P, KV, head_dim]
    prompt_values: jax.Array  # [Bp, P, KV, head_dim]
    prompt_mask: jax.Array  # [Bp, P] bool, False = left padding
    keys: jax.Array  # [B, R, KV, head_dim], B = Bp * n
    values: jax.Array  # [B, R, KV, head_dim]

    def write(self, key: jax.Array, value: jax.Array, index) -> SharedPrefixCache:
        """This step's key/value [B, 1, KV, head_dim] in response slot `index` of every row."""
        put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            cache, new.astype(cache.dtype), index, axis=1
        )
        return dataclasses.replace(self, keys=put(self.keys, key), values=put(self.values, value))


def empty_response_slots(prompt_keys: jax.Array, samples: int, response_len: int) -> jax.Array:
    """Zeros [Bp * samples, response_len, KV, head_dim] in the prompt cache's dtype."""
    prompts, _, kv_heads, head_dim = prompt_keys.shape
    return jnp.zeros((prompts * samples, response_len, kv_heads, head_dim), prompt_keys.dtype)


def shared_prefix_attention(
    query: jax.Array, cache: SharedPrefixCache, response_mask: jax.Array
) -> jax.Array:
    """Attention of one new position per row over its prompt (shared) and its own responses.

    query [B, 1, H, D]; response_mask [B, 1, R] bool (True: the row may attend to that
    response slot). Scores and softmax in fp32, as `layers.attention`. Returns [B, 1, H, D].
    """
    rows, _, num_heads, head_dim = query.shape
    prompts, prompt_len, kv_heads, _ = cache.prompt_keys.shape
    samples, group = rows // prompts, num_heads // kv_heads
    precision = matmul_precision(query.dtype)
    scale = head_dim**-0.5
    # Prompt part: a prompt's n rows x G heads per KV head are the rows of one product.
    by_prompt = query.reshape(prompts, samples, kv_heads, group, head_dim)
    by_prompt = by_prompt.transpose(0, 2, 1, 3, 4).reshape(prompts, kv_heads, -1, head_dim)
    prompt_keys = cache.prompt_keys.astype(query.dtype).transpose(0, 2, 1, 3)  # [Bp, KV, P, D]
    prompt_scores = jnp.einsum(
        "bkmd,bksd->bkms",
        by_prompt,
        prompt_keys,
        precision=precision,
        preferred_element_type=jnp.float32,
    )  # [Bp, KV, n * G, P]
    prompt_scores = prompt_scores.reshape(prompts, kv_heads, samples, group, prompt_len)
    prompt_scores = prompt_scores.transpose(0, 2, 1, 3, 4).reshape(rows, kv_heads, group, -1)
    prompt_valid = jnp.repeat(cache.prompt_mask, samples, axis=0)[:, None, None, :]  # [B,1,1,P]
    # Response part: each row against its own slots.
    own = query.reshape(rows, kv_heads, group, head_dim)
    own_keys = cache.keys.astype(query.dtype).transpose(0, 2, 1, 3)  # [B, KV, R, D]
    own_scores = jnp.einsum(
        "bkgd,bkrd->bkgr", own, own_keys, precision=precision, preferred_element_type=jnp.float32
    )
    scores = jnp.concatenate(
        [
            jnp.where(prompt_valid, prompt_scores * scale, _NEG_INF),
            jnp.where(response_mask[:, :, None, :], own_scores * scale, _NEG_INF),
        ],
        axis=-1,
    )  # [B, KV, G, P + R]
    probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    prompt_probs, own_probs = probs[..., :prompt_len], probs[..., prompt_len:]
    prompt_probs = prompt_probs.reshape(prompts, samples, kv_heads, group, prompt_len)
    prompt_probs = prompt_probs.transpose(0, 2, 1, 3, 4).reshape(prompts, kv_heads, -1, prompt_len)
    prompt_values = cache.prompt_values.astype(query.dtype).transpose(0, 2, 1, 3)
    from_prompt = jnp.einsum("bkms,bksd->bkmd", prompt_probs, prompt_values, precision=precision)
    from_prompt = from_prompt.reshape(prompts, kv_heads, samples, group, head_dim)
    from_prompt = from_prompt.transpose(0, 2, 1, 3, 4).reshape(rows, kv_heads, group, head_dim)
    own_values = cache.values.astype(query.dtype).transpose(0, 2, 1, 3)  # [B, KV, R, D]
    from_own = jnp.einsum("bkgr,bkrd->bkgd", own_probs, own_values, precision=precision)
    return (from_prompt + from_own).reshape(rows, 1, num_heads, head_dim)
