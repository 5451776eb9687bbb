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


def logical(value: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A parameter's value at the model's shape: a trainer may store it padded with zeros
    (`sharding/rules.storage_shape`) so that a dimension with no factor of the device count
    shards; the padding is cut off here, where the parameter is used."""
    if tuple(value.shape) == tuple(shape):
        return value
    return value[tuple(slice(0, size) for size in shape)]


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
        self.shape = (in_features, out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        # The leading dimensions are merged into one before the product: the weight gradient is
        # then one [in, rows] @ [rows, out] product; with [b, L, in] activations XLA:CPU
        # contracts over two dimensions and first copies the [b, L, out] gradient into a
        # transposed [out, b * L] buffer, which took half of the update's time at hidden 512.
        leading = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, x.shape[-1])
        kernel = logical(self.kernel[...], self.shape)
        y = jnp.matmul(x, kernel.astype(self.dtype), precision=matmul_precision(self.dtype))
        if self.bias is not None:
            y = y + logical(self.bias[...], self.shape[1:]).astype(self.dtype)
        return y.reshape(*leading, y.shape[-1])


class Embed(nnx.Module):
    """Token embedding table, `weight` [vocab, hidden] (same layout as torch)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.weight = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))
        self.dtype = dtype
        self.shape = (num_embeddings, features)

    def table(self) -> jax.Array:
        """The [vocab, hidden] table in the parameter dtype."""
        return logical(self.weight[...], self.shape)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.table(), token_ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype
        self.shape = (dim,)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return logical(self.weight[...], self.shape).astype(self.dtype) * normed


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype
        self.shape = (dim,)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        weight = logical(self.weight[...], self.shape).astype(jnp.float32)
        out = normed * weight + logical(self.bias[...], self.shape).astype(jnp.float32)
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


# How attention is computed (`build_model(attention=...)`):
#   "xla"     the einsum below (the default; fp32 scores and softmax);
#   "cudnn"   jax.nn.dot_product_attention's cuDNN flash attention (GPU, bf16/fp16 only): no
#             [B, H, Q, K] scores in memory, and causal blocks above the diagonal skipped;
#   "jax_xla" the same jax.nn call with JAX's XLA implementation (so the argument conversion
#             the cuDNN path uses is tested on any backend).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "jax_xla")

# Rematerialisation of each decoder layer in the backward pass (`build_model(remat=...)`):
# "full" keeps only the layer's input (True means "full"); "dots" also keeps the outputs of the
# projections (matmuls without batch dimensions), trading memory for less recomputation.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_name(remat: bool | str | None) -> str | None:
    """False/None/"none" -> None (no remat); True -> "full"; or a key of REMAT_POLICIES."""
    if remat in (False, None, "none"):
        return None
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(
            f"remat {remat!r}: expected a bool, 'none' or one of {list(REMAT_POLICIES)}"
        )
    return name


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    implementation: str = "xla",
    causal: bool = False,
) -> jax.Array:
    """Softmax attention with grouped KV heads; scores and softmax in fp32.

    query [B, Q, H, D], key/value [B, K, KV, D] with H a multiple of KV, mask [B, Q, K] bool
    (True: may attend). Returns [B, Q, H, D] in the query dtype. `causal` says that `mask`
    already holds the causal triangle, so an implementation may skip the blocks above it.
    """
    if implementation in ("cudnn", "jax_xla"):
        # The mask becomes a large negative (finite) bias, so a row with every key masked (a
        # left-padding query) averages the values instead of producing NaN, as below.
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            mask=mask[:, None],  # [B, 1, Q, K], broadcast over heads
            is_causal=causal,
            implementation="cudnn" if implementation == "cudnn" else "xla",
        )
    if implementation != "xla":
        raise ValueError(
            f"attention implementation {implementation!r}: expected one of "
            f"{list(ATTENTION_IMPLEMENTATIONS)}"
        )
    batch, q_len, num_heads, head_dim = query.shape
    k_len, num_kv_heads = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    precision = matmul_precision(query.dtype)
    # Head-major operands, and the G query heads that share a KV head stacked as one [G * Q]
    # row block: both products are then plain batched [M, D] @ [D, K] over (B, KV). Written as
    # one einsum over the [B, Q, KV, G, D] layout, XLA:CPU transposes the [B, Q, H * K]
    # gradients in the backward pass (1.6x this function's time at 16 heads of 32).
    query = query.reshape(batch, q_len, num_kv_heads, group, head_dim)
    query = query.transpose(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, group * q_len, head_dim)
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [B, KV, K, D]
    scores = jnp.einsum(
        "bkmd,bksd->bkms", query, key, precision=precision, preferred_element_type=jnp.float32
    )
    scores = scores.reshape(batch, num_kv_heads, group, q_len, k_len) * (head_dim**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    probs = probs.reshape(batch, num_kv_heads, group * q_len, k_len)
    out = jnp.einsum("bkms,bksd->bkmd", probs, value, precision=precision)
    out = out.reshape(batch, num_kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim)
