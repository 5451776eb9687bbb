"""The sampler's decode pieces: attention over a prompt cache shared by n rows equals attention
over each row's own copy (models/decode_cache.py); a decoder run for its last positions only
(`outputs_from`) equals the tail of the full run; prompt lengths round up geometrically."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maye_jax.models.configs import ModelConfig
from maye_jax.models.decode_cache import SharedPrefixCache, shared_prefix_attention
from maye_jax.models.layers import attention
from maye_jax.models.qwen_vl import build_model, causal_padding_mask
from maye_jax.models.shapes import round_up, round_up_geometric
from maye_jax.tiny import tiny_hf_config


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_shared_prompt_cache_equals_attention_over_copied_rows(dtype, tolerance):
    """3 prompts (left-padded by 0, 2 and 4 slots) x 2 samples, GQA 4 over 2 KV heads, after 3
    response tokens of 5 slots: the same output as `layers.attention` over [prompt copy,
    responses] per row, with the unwritten response slots masked out."""
    rng = np.random.default_rng(0)
    prompts, samples, prompt_len, response_len, heads, kv_heads, dim = 3, 2, 6, 5, 4, 2, 32
    rows, written = prompts * samples, 3
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    prompt_keys, prompt_values = (normal(prompts, prompt_len, kv_heads, dim) for _ in range(2))
    keys, values = (normal(rows, response_len, kv_heads, dim) for _ in range(2))
    query = normal(rows, 1, heads, dim)
    prompt_mask = np.ones((prompts, prompt_len), bool)
    for prompt, padding in enumerate((0, 2, 4)):
        prompt_mask[prompt, :padding] = False
    response_mask = np.broadcast_to(np.arange(response_len) < written, (rows, 1, response_len))
    cache = SharedPrefixCache(prompt_keys, prompt_values, jnp.asarray(prompt_mask), keys, values)
    ours = shared_prefix_attention(query, cache, jnp.asarray(response_mask))

    copy = lambda prompt_part, own: jnp.concatenate(  # noqa: E731
        [jnp.repeat(prompt_part, samples, axis=0), own], axis=1
    )
    mask = np.concatenate([np.repeat(prompt_mask, samples, axis=0)[:, None], response_mask], -1)
    expected = attention(
        query, copy(prompt_keys, keys), copy(prompt_values, values), jnp.asarray(mask)
    )
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(expected, np.float32), atol=tolerance
    )
    # the unwritten response slots are really ignored: garbage there changes nothing
    garbage = SharedPrefixCache(
        prompt_keys,
        prompt_values,
        jnp.asarray(prompt_mask),
        keys.at[:, written:].set(1e3),
        values.at[:, written:].set(1e3),
    )
    np.testing.assert_array_equal(
        np.asarray(shared_prefix_attention(query, garbage, jnp.asarray(response_mask))),
        np.asarray(ours),
    )


def test_cache_write_fills_one_response_slot():
    cache = SharedPrefixCache(*(jnp.zeros((1, 2, 1, 4)),) * 2, jnp.ones((1, 2), bool),
                              *(jnp.zeros((2, 3, 1, 4)),) * 2)  # fmt: skip
    new = cache.write(jnp.ones((2, 1, 1, 4)), 2 * jnp.ones((2, 1, 1, 4)), 1)
    assert np.asarray(new.keys)[:, :, 0, 0].tolist() == [[0, 1, 0], [0, 1, 0]]
    assert np.asarray(new.values)[:, 1].max() == 2 and np.asarray(new.values)[:, 0].max() == 0
    assert new.prompt_keys is cache.prompt_keys


def test_outputs_from_equals_the_tail_of_the_full_decoder():
    """The last layer run for positions [5, 12) only (queries, attention output, MLP), with
    and without a KV cache, gives the full run's hidden states there and the same cache."""
    config = ModelConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256, num_layers=2))
    model = build_model(config, seed=3)
    rng = np.random.default_rng(1)
    batch, length, start = 2, 12, 5
    embeds = jnp.asarray(rng.standard_normal((batch, length, config.text.hidden_size)) * 0.5)
    embeds = embeds.astype(jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(length), (3, batch, length))
    valid = np.ones((batch, length), np.int32)
    valid[1, :3] = 0  # left padding
    mask = causal_padding_mask(jnp.asarray(valid))
    run = nnx.jit(
        lambda model, caches, outputs_from, cache_index: model.language_model(
            embeds, positions, mask, caches, cache_index, outputs_from=outputs_from
        ),
        static_argnames=("outputs_from", "cache_index"),
    )
    full, _ = run(model, None, 0, None)
    tail, _ = run(model, None, start, None)
    assert tail.shape == (batch, length - start, config.text.hidden_size)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, start:]), atol=2e-6)
    text = config.text
    empty = jnp.zeros((batch, length, text.num_kv_heads, text.head_dim))
    caches = [(empty, empty)] * text.num_layers
    full_cached, full_caches = run(model, caches, 0, 0)
    last, last_caches = run(model, caches, 11, 0)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full_cached[:, 11:]), atol=2e-6)
    for ours, theirs in zip(jax.tree.leaves(last_caches), jax.tree.leaves(full_caches)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_round_up_geometric_bounds_padding_and_shapes():
    sizes = range(1, 5000)
    rounded = [round_up_geometric(n, 16) for n in sizes]
    assert all(r >= n and r % 16 == 0 for n, r in zip(sizes, rounded))
    assert all(r - n < max(16, n / 8) for n, r in zip(sizes, rounded))
    assert [round_up_geometric(n, 16) for n in (1, 16, 17, 110, 129, 300, 1000)] == [
        16, 16, 32, 112, 144, 320, 1024,
    ]  # fmt: skip
    assert len({round_up_geometric(n, 16) for n in range(100, 1501)}) == 30
    assert len({round_up(n, 16) for n in range(100, 1501)}) == 88
