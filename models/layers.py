"""Building blocks shared by the vision tower and the text decoder.

Parameters are stored in `param_dtype` (fp32 master weights by default) and cast to the
compute `dtype` at use. Normalisations compute in fp32 and cast back, as transformers does,
so bf16 runs see the same rounding points as the PyTorch reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_NEG_INF = -1e30


def matmul_precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """fp32 compute means true fp32 (no TF32 on GPUs); bf16 uses the default MXU/tensor-core path."""
    return (
        jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT
    )


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out] (the transpose of torch's weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.matmul(
            x, self.kernel[...].astype(self.dtype), precision=matmul_precision(self.dtype)
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table, `weight` [vocab, hidden] (same layout as torch)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.weight = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))
        self.dtype = dtype

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], token_ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_pytorch"):
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_pytorch_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., seq, heads, head_dim]; cos/sin [..., seq, head_dim] broadcast over heads."""
    cos = cos[..., None, :]
    sin = sin[..., None, :]
    return x * cos + rotate_half(x) * sin


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with grouped KV heads; scores and softmax in fp32.

    query [B, Q, H, D], key/value [B, K, KV, D] with H a multiple of KV, mask [B, Q, K] bool
    (True: may attend). Returns [B, Q, H, D] in the query dtype.
    """
    batch, q_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    group = num_heads // num_kv_heads
    precision = matmul_precision(query.dtype)
    query = query.reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum(
        "bqkgd,bskd->bkgqs", query, key, precision=precision, preferred_element_type=jnp.float32
    )  # [B, KV, G, Q, K]
    scores = scores * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, value, precision=precision)
    return out.reshape(batch, q_len, num_heads, head_dim)
