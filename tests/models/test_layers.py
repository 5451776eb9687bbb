"""Attention implementations and remat policies (models/layers.py) compute the same thing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maye_jax.models.configs import ModelConfig
from maye_jax.models.layers import attention, remat_name
from maye_jax.models.qwen_vl import build_model, causal_padding_mask
from maye_jax.tiny import tiny_hf_config


def padded_inputs(dtype):
    """GQA (4 query heads over 2 KV heads); rows left-padded by 0, 3 and 5 positions and
    right-padded like a response, as the trainer lays sequences out."""
    rng = np.random.default_rng(0)
    batch, length, heads, kv_heads, head_dim = 3, 12, 4, 2, 32
    query = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)
    key = jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), dtype)
    value = jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), dtype)
    valid = np.zeros((batch, length), np.int32)
    for row, (start, end) in enumerate([(0, 12), (3, 10), (5, 8)]):
        valid[row, start:end] = 1
    return query, key, value, causal_padding_mask(jnp.asarray(valid)), valid.astype(bool)


# bf16 keeps 8 significant bits (relative rounding 4e-3), and each path rounds its own
# intermediate products: outputs of order 1 differ by a few of those.
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_jax_nn_path_equals_the_einsum(dtype, tolerance):
    """The argument conversion of the cuDNN path (mask -> [B, 1, Q, K], is_causal, GQA layout,
    scale) run through JAX's XLA implementation gives the einsum's output on every position,
    padding included (no NaN anywhere)."""
    query, key, value, mask, _ = padded_inputs(dtype)
    expected = attention(query, key, value, mask)
    ours = attention(query, key, value, mask, implementation="jax_xla", causal=True)
    assert ours.dtype == expected.dtype and bool(jnp.all(jnp.isfinite(ours)))
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(expected, np.float32), atol=tolerance
    )


def test_unknown_implementation_and_remat_are_refused():
    query, key, value, mask, _ = padded_inputs(jnp.float32)
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        attention(query, key, value, mask, implementation="flash")
    config = ModelConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256))
    with pytest.raises(ValueError, match="attention 'flash'"):
        build_model(config, attention="flash", abstract=True)
    with pytest.raises(ValueError, match=r"bf16/fp16 compute dtype \(config.model.dtype\)"):
        build_model(config, attention="cudnn", dtype=jnp.float32, abstract=True)
    assert [remat_name(r) for r in (False, "none", True, "full", "dots")] == [
        None,
        None,
        "full",
        "full",
        "dots",
    ]
    with pytest.raises(ValueError, match="remat 'some'"):
        remat_name("some")


def test_model_logits_do_not_depend_on_the_attention_path():
    config = ModelConfig.from_hf(tiny_hf_config("qwen2_5_vl", vocab_size=256, num_layers=2))
    _, _, _, _, valid = padded_inputs(jnp.float32)
    input_ids = jnp.asarray(np.random.default_rng(1).integers(0, 200, valid.shape), jnp.int32)
    positions = jnp.broadcast_to(
        jnp.cumsum(jnp.asarray(valid, jnp.int32), axis=1), (3,) + valid.shape
    )
    mask = jnp.asarray(valid, jnp.int32)
    logits = {}
    for implementation in ("xla", "jax_xla"):
        model = build_model(config, seed=2, attention=implementation)
        logits[implementation] = np.asarray(jax.jit(lambda m: m(input_ids, positions, mask))(model))
    # 2e-5: the two attention paths sum in different orders, and 2 layers and the head pass the
    # fp32 differences on to logits of order 1.
    np.testing.assert_allclose(logits["jax_xla"][valid], logits["xla"][valid], atol=2e-5, rtol=1e-5)


def test_remat_policies_keep_what_they_say():
    """Values kept for the backward pass (JAX's `saved_residuals`, a private helper: the public
    API only prints them): no remat keeps every intermediate, "full" only each layer's input,
    "dots" also the projections' outputs."""
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals

    config = ModelConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256, num_layers=2))
    input_ids = jnp.zeros((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (3, 2, 16))
    mask = jnp.ones((2, 16), jnp.int32)
    kept = {}
    for remat in (False, "full", "dots"):
        graphdef, state = nnx.split(build_model(config, remat=remat))

        def loss(state, graphdef=graphdef):
            hidden = nnx.merge(graphdef, state).hidden_states(input_ids, positions, mask)
            return jnp.sum(hidden**2)

        kept[remat] = sum(int(np.prod(aval.shape)) for aval, _ in saved_residuals(loss, state))
    assert kept[False] > kept["dots"] > kept["full"], kept
