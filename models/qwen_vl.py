"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense) for conditional generation, in Flax NNX.

The text decoder is shared by the three families: token embeddings (image features scattered
into the prompt's image-pad positions), pre-norm decoder layers with GQA attention, 3-D M-RoPE,
SwiGLU MLP, final RMSNorm and a tied or untied lm_head. Qwen2/2.5: q/k/v biases, chunked
M-RoPE. Qwen3: no biases, RMSNorm of each query and key head before the rotation, interleaved
M-RoPE, and DeepStack: the vision tower's extra feature levels are added to the hidden states of
the image tokens after decoder layers 0, 1, ... (models/qwen3_vision.py).

Inputs are arrays with static shapes; everything data-dependent (M-RoPE positions, where each
image feature goes) is computed on the host (models/rope.py, models/vision_inputs.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from maye_jax.models.configs import FAMILY_QWEN3_VL, ModelConfig, TextConfig
from maye_jax.models.decode_cache import SharedPrefixCache, shared_prefix_attention
from maye_jax.models.layers import (
    ATTENTION_IMPLEMENTATIONS,
    REMAT_POLICIES,
    Embed,
    Linear,
    RMSNorm,
    activation,
    apply_rotary,
    attention,
    logical,
    matmul_precision,
    remat_name,
)
from maye_jax.models.qwen3_vision import Qwen3VisionTower
from maye_jax.models.rope import text_rotary_tables
from maye_jax.models.vision import VisionTower


class TextAttention(nnx.Module):
    def __init__(
        self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation: str = "xla"
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention {implementation!r}: expected one of {list(ATTENTION_IMPLEMENTATIONS)}"
            )
        if implementation == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                f"attention 'cudnn' needs a bf16/fp16 compute dtype (config.model.dtype), "
                f"not {jnp.dtype(dtype).name}"
            )
        self.implementation = implementation
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, q_dim, use_bias=bias, **kw)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, use_bias=bias, **kw)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, use_bias=bias, **kw)
        # Qwen2's output projection has no bias; Qwen3's `attention_bias` covers all four
        self.o_proj = Linear(q_dim, cfg.hidden_size, use_bias=bias and cfg.qk_norm, **kw)
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.q_norm = RMSNorm(cfg.head_dim, **norm)
            self.k_norm = RMSNorm(cfg.head_dim, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None, queries_from=0):
        """x [B, L, D]; mask [B, L, K] (K = L, or the cache length when a cache is given).

        With `kv_cache` = (keys, values) [B, K, KV, head_dim], this step's keys/values are
        written at `cache_index` and attention runs over the whole cache; the updated cache is
        returned. With a `SharedPrefixCache` (one new position per row; decode_cache.py) they
        go to response slot `cache_index` and mask [B, 1, R] covers the response slots.
        `queries_from` (static): only positions [queries_from, L) attend and are returned
        ([B, L - queries_from, D]); every position still gives its key and value.
        """
        split_heads = "b l (heads d) -> b l heads d"
        query = rearrange(self.q_proj(x[:, queries_from:]), split_heads, d=self.head_dim)
        key = rearrange(self.k_proj(x), split_heads, d=self.head_dim)
        value = rearrange(self.v_proj(x), split_heads, d=self.head_dim)
        if self.q_norm is not None:  # per head, over head_dim
            query, key = self.q_norm(query), self.k_norm(key)
        query = apply_rotary(query, cos[:, queries_from:], sin[:, queries_from:])
        key = apply_rotary(key, cos, sin)
        mask = mask[:, queries_from:]
        if isinstance(kv_cache, SharedPrefixCache):  # a decode step of the sampler
            kv_cache = kv_cache.write(key, value, cache_index)
            out = shared_prefix_attention(query, kv_cache, mask)
            return self.o_proj(rearrange(out, "b l heads d -> b l (heads d)")), kv_cache
        if kv_cache is not None:
            cached_keys, cached_values = kv_cache
            key = jax.lax.dynamic_update_slice_in_dim(
                cached_keys, key.astype(cached_keys.dtype), cache_index, axis=1
            )
            value = jax.lax.dynamic_update_slice_in_dim(
                cached_values, value.astype(cached_values.dtype), cache_index, axis=1
            )
            kv_cache = (key, value)
        out = attention(
            query,
            key.astype(query.dtype),
            value.astype(query.dtype),
            mask,
            # decoding with a cache attends from one position: the plain einsum serves it
            implementation="xla" if kv_cache is not None else self.implementation,
            causal=kv_cache is None,
        )
        return self.o_proj(rearrange(out, "b l heads d -> b l (heads d)")), kv_cache


class TextMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(
        self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention: str = "xla"
    ):
        self.input_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.self_attn = TextAttention(
            cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, implementation=attention
        )
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.mlp = TextMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None, queries_from=0):
        """`queries_from`: see TextAttention; the output is [B, L - queries_from, D]."""
        attn_out, kv_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, kv_cache, cache_index, queries_from
        )
        x = x[:, queries_from:] + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv_cache


class TextDecoder(nnx.Module):
    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        remat: bool | str = False,
        attention: str = "xla",
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat_name(remat)  # None, or a key of layers.REMAT_POLICIES
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [
                DecoderLayer(
                    cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention
                )
                for _ in range(cfg.num_layers)
            ]
        )
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )

    def rotary_tables(self, positions):
        """cos/sin [B, L, head_dim] of M-RoPE positions [3, B, L]."""
        cfg = self.cfg
        return text_rotary_tables(
            positions,
            cfg.head_dim,
            cfg.rope_theta,
            cfg.mrope_section,
            self.dtype,
            interleaved=cfg.mrope_interleaved,
        )

    def __call__(
        self,
        embeds,
        positions,
        mask,
        kv_caches=None,
        cache_index=None,
        *,
        deepstack=None,
        outputs_from=0,
    ):
        """embeds [B, L, D], positions [3, B, L] -> final-normed hidden states [B, L, D].

        `deepstack` [K, B, L, D] (Qwen3-VL; zero on text tokens): level k is added to the
        output of layer k.

        `outputs_from` (static): only the hidden states of positions [outputs_from, L) are
        wanted ([B, L - outputs_from, D] is returned). The earlier positions still run through
        every layer but the last, whose queries, attention output and MLP they skip: they
        only give it keys and values (and cache them). A prefill that samples from the last
        position saves one layer in num_layers this way."""
        cos, sin = self.rotary_tables(positions)
        x = embeds
        new_caches = []
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            cache = None if kv_caches is None else kv_caches[index]
            queries_from = outputs_from if index == last else 0
            if self.remat and kv_caches is None:
                x = _remat_layer(layer, x, cos, sin, mask, queries_from, self.remat)
            else:
                x, cache = layer(x, cos, sin, mask, cache, cache_index, queries_from)
            if deepstack is not None and index < deepstack.shape[0]:
                x = x + deepstack[index, :, queries_from:].astype(x.dtype)
            new_caches.append(cache)
        return self.norm(x), (new_caches if kv_caches is not None else None)


def _remat_layer(layer, x, cos, sin, mask, queries_from: int, policy: str):
    """`layer` on x, rematerialised in the backward pass under `REMAT_POLICIES[policy]`."""
    return nnx.remat(
        lambda lyr, h: lyr(h, cos, sin, mask, queries_from=queries_from)[0],
        policy=REMAT_POLICIES[policy],
    )(layer, x)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, L] validity -> [B, L, L] mask: causal, keys must be valid; every query sees itself."""
    length = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    valid_keys = attention_mask.astype(bool)[:, None, :]
    return (causal[None] & valid_keys) | jnp.eye(length, dtype=bool)[None]


class QwenVLForConditionalGeneration(nnx.Module):
    """Every family; `config.family` selects the vision tower (and config.text the decoder's
    variant)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
        remat: bool | str = False,
        attention: str = "xla",
    ):
        """remat: per decoder layer in training (False, True/"full", "dots": layers.py);
        attention: the text decoder's attention implementation (layers.py)."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        if config.family == FAMILY_QWEN3_VL:
            self.visual = Qwen3VisionTower(
                config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.visual = VisionTower(
                config.vision, config.family, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        self.language_model = TextDecoder(
            config.text,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            remat=remat,
            attention=attention,
        )
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            init = nnx.initializers.normal(0.02)
            self.lm_head = nnx.Param(
                init(rngs.params(), (config.text.vocab_size, config.text.hidden_size), param_dtype)
            )

    # -- pieces ---------------------------------------------------------------------------
    def encode_images(
        self, patches, rope_hw, full_segment_ids, window_segment_ids, grid_hw=None
    ) -> jax.Array:
        """Packed images (vision_inputs.PackedImages.arrays()) -> image features
        [num_slots / 4, (1 + K) * hidden]: each merged token's feature, then its K DeepStack
        levels (Qwen3-VL; K = 0 otherwise)."""
        return self.visual(patches, rope_hw, full_segment_ids, window_segment_ids, grid_hw=grid_hw)

    def place_image_features(self, embeds, features, is_image):
        """Token embeddings [B, L, D] with `features` [B, L, (1 + K) * D] (each token's image
        feature, gathered) in place where `is_image` [B, L]; and the DeepStack levels
        [K, B, L, D], zero on text tokens (None when K = 0)."""
        hidden = embeds.shape[-1]
        features = features.astype(embeds.dtype)
        embeds = jnp.where(is_image[..., None], features[..., :hidden], embeds)
        levels = self.config.num_deepstack_levels
        if levels == 0:
            return embeds, None
        deepstack = rearrange(features[..., hidden:], "b l (k d) -> k b l d", k=levels)
        return embeds, jnp.where(is_image[None, ..., None], deepstack, 0)

    def embed(self, input_ids, image_features=None, image_feature_index=None):
        """(token embeddings [B, L, D], DeepStack levels [K, B, L, D] or None): where
        image_feature_index >= 0 the image feature of that index is used."""
        embeds = self.language_model.embed_tokens(input_ids)
        if image_features is None:
            return embeds, None
        gathered = jnp.take(image_features, jnp.maximum(image_feature_index, 0), axis=0)
        return self.place_image_features(embeds, gathered, image_feature_index >= 0)

    def output_embedding(self) -> jax.Array:
        """The [vocab, hidden] matrix that maps hidden states to logits."""
        if self.lm_head is None:
            return self.language_model.embed_tokens.table()
        text = self.config.text
        return logical(self.lm_head[...], (text.vocab_size, text.hidden_size))

    # -- whole model ----------------------------------------------------------------------
    def hidden_states(
        self, input_ids, positions, attention_mask, image_features=None, image_feature_index=None
    ):
        """Final hidden states [B, L, D] (after the last RMSNorm)."""
        embeds, deepstack = self.embed(input_ids, image_features, image_feature_index)
        hidden, _ = self.language_model(
            embeds, positions, causal_padding_mask(attention_mask), deepstack=deepstack
        )
        return hidden

    def logits(self, hidden):
        """Full logits [B, L, V] in fp32. Only for tests and small inputs: training and sampling
        use models/logprobs.py, which never materialises [B, L, V]."""
        weight = self.output_embedding().astype(self.dtype)
        return jnp.einsum(
            "bld,vd->blv",
            hidden.astype(self.dtype),
            weight,
            precision=matmul_precision(self.dtype),
            preferred_element_type=jnp.float32,
        )

    def __call__(
        self, input_ids, positions, attention_mask, image_features=None, image_feature_index=None
    ):
        return self.logits(
            self.hidden_states(
                input_ids, positions, attention_mask, image_features, image_feature_index
            )
        )


class _ShapeOnlyRngs:
    """The key stream of an abstract build: every draw the same key, no counter. Only shapes
    leave `nnx.eval_shape`, and tracing nnx.Rngs' counter makes the build quadratic in the
    number of parameters (JAX walks the counter's whole history each time nnx checks its
    sharding: 9 s for an 8B model, against 0.5 s without)."""

    def params(self):
        return jax.random.key(0)


def build_model(
    config: ModelConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
    remat: bool | str = False,
    attention: str = "xla",
    abstract: bool = False,
):
    """A randomly initialised model, or with `abstract=True` its shapes only (no memory used)."""

    def make():
        return QwenVLForConditionalGeneration(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=_ShapeOnlyRngs() if abstract else nnx.Rngs(seed),
            remat=remat,
            attention=attention,
        )

    return nnx.eval_shape(make) if abstract else make()
