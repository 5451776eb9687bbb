"""Chunked log-probabilities against the naive full-logits computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maye_jax.models.logprobs import next_token_logprobs, token_logprobs


def _naive(hidden, weight, targets, temperature):
    """The straightforward fp32 computation: full logits, log_softmax, gather."""
    logits = jnp.einsum("bld,vd->blv", hidden, weight, precision=jax.lax.Precision.HIGHEST)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    entropy = -(jnp.exp(logp) * logp).sum(-1)
    return np.asarray(
        jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0]
    ), np.asarray(entropy)


def test_naive_reference_agrees_with_float64():
    """The fp32 reference itself is checked against float64 NumPy (relative tolerance)."""
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((2, 7, 24)).astype(np.float32)
    weight = rng.standard_normal((300, 24)).astype(np.float32)
    targets = rng.integers(0, 300, size=(2, 7))
    logits = np.einsum("bld,vd->blv", hidden.astype(np.float64), weight.astype(np.float64))
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    got, _ = _naive(hidden, weight, targets, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_logprobs_equal_naive(chunk_size, temperature):
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 13, 24)).astype(np.float32)
    weight = rng.standard_normal((300, 24)).astype(np.float32)
    targets = rng.integers(0, 300, size=(3, 13))
    logprobs, entropy = token_logprobs(
        jnp.asarray(hidden),
        jnp.asarray(weight),
        jnp.asarray(targets),
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=True,
    )
    ref_logprobs, ref_entropy = _naive(hidden, weight, targets, temperature)
    np.testing.assert_allclose(np.asarray(logprobs), ref_logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(entropy), ref_entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [4, 11])
def test_chunked_logprob_gradients_equal_naive(chunk_size):
    """Several rematerialised chunks (4), or one chunk kept for the backward pass (11)."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 11, 16)).astype(np.float32))
    weight = jnp.asarray(rng.standard_normal((100, 16)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, 100, size=(2, 11)))

    def chunked(h, w):
        return token_logprobs(h, w, targets, chunk_size=chunk_size).sum()

    # vocabulary products: forward, (recomputed forward,) two gradient products
    jaxpr = jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(hidden, weight)
    assert str(jaxpr).count("dot_general[") == (4 if chunk_size < 11 else 3)

    def naive(h, w):
        logits = jnp.einsum("bld,vd->blv", h, w, precision=jax.lax.Precision.HIGHEST)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).sum()

    got = jax.grad(chunked, argnums=(0, 1))(hidden, weight)
    want = jax.grad(naive, argnums=(0, 1))(hidden, weight)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


def test_next_token_alignment():
    rng = np.random.default_rng(2)
    hidden = rng.standard_normal((1, 6, 8)).astype(np.float32)
    weight = rng.standard_normal((20, 8)).astype(np.float32)
    ids = rng.integers(0, 20, size=(1, 6))
    got = np.asarray(
        next_token_logprobs(jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(ids))
    )
    ref, _ = _naive(hidden[:, :-1], weight, ids[:, 1:], 1.0)
    assert got.shape == (1, 5)
    np.testing.assert_allclose(got, ref, atol=1e-5)
