"""The vision towers of Qwen2-VL and Qwen2.5-VL, over packed patches (see vision_inputs.py).

Qwen2-VL:   LayerNorm, QuickGELU MLP (fc1/fc2), full attention in every block, LayerNorm merger.
Qwen2.5-VL: RMSNorm, SwiGLU MLP with biases, window attention except in `fullatt_block_indexes`,
            RMSNorm merger.
Both: 3-D patch convolution (2 x 14 x 14, stride = kernel) done as one matmul, 2-D rotary
embedding over (row, col), and a merger that concatenates each 2x2 block of patches and maps it
to the text width with a GELU MLP. The blocks also serve Qwen3-VL (LayerNorm, GELU-tanh MLP
`linear_fc1`/`linear_fc2`, full attention), whose tower is models/qwen3_vision.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from maye_jax.models.configs import FAMILY_QWEN2_5_VL, FAMILY_QWEN3_VL, VisionConfig
from maye_jax.models.layers import LayerNorm, Linear, RMSNorm, activation, apply_rotary, attention
from maye_jax.models.rope import vision_rotary_tables


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.qkv = Linear(
            cfg.embed_dim,
            3 * cfg.embed_dim,
            use_bias=True,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.proj = Linear(
            cfg.embed_dim,
            cfg.embed_dim,
            use_bias=True,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x, cos, sin, mask):
        query, key, value = rearrange(
            self.qkv(x), "r s (qkv heads d) -> qkv r s heads d", qkv=3, d=self.head_dim
        )
        # transformers rotates vision q/k in fp32 and casts back.
        query = apply_rotary(query.astype(jnp.float32), cos, sin).astype(x.dtype)
        key = apply_rotary(key.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = attention(query, key, value, mask)
        return self.proj(rearrange(out, "r s heads d -> r s (heads d)"))


class VisionMLP(nnx.Module):
    """Qwen2-VL: fc2(act(fc1 x)); Qwen2.5-VL: down(act(gate x) * up x), all with biases."""

    def __init__(self, cfg: VisionConfig, gated: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gated = gated
        if gated:
            self.gate_proj = Linear(cfg.embed_dim, cfg.mlp_hidden_dim, **kw)
            self.up_proj = Linear(cfg.embed_dim, cfg.mlp_hidden_dim, **kw)
            self.down_proj = Linear(cfg.mlp_hidden_dim, cfg.embed_dim, **kw)
        else:
            self.fc1 = Linear(cfg.embed_dim, cfg.mlp_hidden_dim, **kw)
            self.fc2 = Linear(cfg.mlp_hidden_dim, cfg.embed_dim, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class Qwen3VisionMLP(nnx.Module):
    """Qwen3-VL: linear_fc2(act(linear_fc1 x)), with biases (transformers' parameter names)."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = Linear(cfg.embed_dim, cfg.mlp_hidden_dim, **kw)
        self.linear_fc2 = Linear(cfg.mlp_hidden_dim, cfg.embed_dim, **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, family: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = _norm_factory(family, dtype, param_dtype)
        self.norm1 = norm(cfg.embed_dim)
        self.norm2 = norm(cfg.embed_dim)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if family == FAMILY_QWEN3_VL:
            self.mlp = Qwen3VisionMLP(cfg, **kw)
        else:
            self.mlp = VisionMLP(cfg, gated=family == FAMILY_QWEN2_5_VL, **kw)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    def __init__(self, cfg: VisionConfig, family: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        merged_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = _norm_factory(family, dtype, param_dtype)(cfg.embed_dim)
        self.fc1 = Linear(
            merged_dim, merged_dim, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.fc2 = Linear(
            merged_dim, cfg.out_dim, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.merge_unit = cfg.spatial_merge_size**2

    def __call__(self, x):
        # each run of merge_unit consecutive patches becomes one token of the LLM
        x = rearrange(self.ln_q(x), "r (tokens unit) d -> r tokens (unit d)", unit=self.merge_unit)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(
        self,
        cfg: VisionConfig,
        family: str,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.family = family
        self.dtype = dtype
        # The 3-D convolution with stride == kernel is a matmul over flattened patches.
        self.patch_embed = Linear(
            cfg.patch_dim,
            cfg.embed_dim,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.blocks = nnx.List(
            [
                VisionBlock(cfg, family, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.depth)
            ]
        )
        self.merger = PatchMerger(cfg, family, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, patches, rope_hw, full_segment_ids, window_segment_ids, grid_hw=None):
        """patches [R, S, patch_dim] -> merged features [R * S / merge**2, out_dim] (`grid_hw`,
        each slot's image grid, is for Qwen3-VL's position table; unused here).

        Slots attend only to slots of the same segment (image frame, or window); padding slots
        attend to themselves only, so they stay finite and never leak into real patches.
        """
        x = self.patch_embed(patches.astype(self.dtype))
        cos, sin = vision_rotary_tables(rope_hw, self.cfg.head_dim, self.cfg.rope_theta)
        full_mask = _segment_mask(full_segment_ids)
        window_mask = _segment_mask(window_segment_ids)
        for index, block in enumerate(self.blocks):
            uses_windows = (
                self.cfg.window_size is not None and index not in self.cfg.fullatt_block_indexes
            )
            x = block(x, cos, sin, window_mask if uses_windows else full_mask)
        merged = self.merger(x)
        return merged.reshape(-1, merged.shape[-1])


def _segment_mask(segment_ids: jax.Array) -> jax.Array:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids >= 0)[:, :, None] & (segment_ids >= 0)[:, None, :]
    diagonal = jnp.eye(segment_ids.shape[1], dtype=bool)[None]
    return (same & real) | diagonal


def _norm_factory(family: str, dtype, param_dtype):
    if family == FAMILY_QWEN2_5_VL:
        return lambda dim: RMSNorm(dim, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    return lambda dim: LayerNorm(dim, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
