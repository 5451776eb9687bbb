"""The Qwen3-VL vision tower over packed patches (vision_inputs.py), with DeepStack outputs.

Against Qwen2-VL's tower (models/vision.py, whose blocks and attention it reuses): a 16-pixel
patch embedding with a bias; a learned (side x side) position table, resampled bilinearly (with
aligned corners) to each image's patch grid and added after the patch embedding; GELU-tanh MLPs
(`linear_fc1`/`linear_fc2`); full attention within each image frame in every block; a merger
that normalises each patch before the 2x2 shuffle (`merger`), and one merger per DeepStack level
that normalises the shuffled 4 x hidden vector (`deepstack_merger_list`), fed by the outputs of
the blocks in `deepstack_visual_indexes`.

The tower returns one array [tokens, (1 + K) * out_dim]: the main features, then the K DeepStack
levels, side by side (as vLLM lays them out). Every consumer that moves image features by token
(per-row tables, the sampler's prompt, sharding) moves all levels at once; the model splits them
where it places them (`QwenVLForConditionalGeneration.place_image_features`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from maye_jax.models.configs import FAMILY_QWEN3_VL, VisionConfig
from maye_jax.models.layers import Embed, LayerNorm, Linear
from maye_jax.models.rope import vision_rotary_tables
from maye_jax.models.vision import VisionBlock, _segment_mask


class Qwen3PatchMerger(nnx.Module):
    """LayerNorm (per patch, or per shuffled 2x2 block with `postshuffle_norm`) -> 2x2 shuffle
    -> linear_fc1 -> exact GELU -> linear_fc2 (to the text width)."""

    def __init__(
        self, cfg: VisionConfig, *, postshuffle_norm: bool, dtype, param_dtype, rngs: nnx.Rngs
    ):
        self.merge_unit = cfg.spatial_merge_size**2
        merged_dim = cfg.embed_dim * self.merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(
            merged_dim if postshuffle_norm else cfg.embed_dim,
            eps=1e-6,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = Linear(merged_dim, merged_dim, **kw)
        self.linear_fc2 = Linear(merged_dim, cfg.out_dim, **kw)

    def __call__(self, x):  # [R, S, D] -> [R, S / merge_unit, out_dim]
        shuffle = "r (tokens unit) d -> r tokens (unit d)"
        if self.postshuffle_norm:
            x = self.norm(rearrange(x, shuffle, unit=self.merge_unit))
        else:
            x = rearrange(self.norm(x), shuffle, unit=self.merge_unit)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


def resampled_position_table(
    table: jax.Array,  # [side * side, D]
    rope_hw: jax.Array,  # [..., 2] each slot's (row, col) in its image's patch grid
    grid_hw: jax.Array,  # [..., 2] the (height, width) of that grid, in patches
) -> jax.Array:  # [..., D]
    """The position table resampled to each slot's image grid: bilinear interpolation with
    aligned corners (grid row i of h reads table row i * (side - 1) / (h - 1)), the four taps
    clamped to the table. Computed per slot, so the slot order (2x2 merge blocks) is kept."""
    side = round(table.shape[0] ** 0.5)
    # The same float32 operations, in the same order, as transformers' interpolation weights.
    source = (
        rope_hw.astype(jnp.float32) * (side - 1) / jnp.maximum(grid_hw - 1, 1).astype(jnp.float32)
    )  # [..., 2] fractional (row, col) in the table
    floor = jnp.floor(source)
    offsets = jnp.arange(2)  # the taps at floor and floor + 1 along each axis
    taps = jnp.clip(floor.astype(jnp.int32)[..., None] + offsets, 0, side - 1)  # [..., 2, 2]
    weights = jnp.clip(1 - jnp.abs(source[..., None] - floor[..., None] - offsets), 0)
    index = taps[..., 0, :, None] * side + taps[..., 1, None, :]  # [..., 2 rows, 2 cols]
    weight = weights[..., 0, :, None] * weights[..., 1, None, :]
    gathered = jnp.take(table, index.reshape(*index.shape[:-2], 4), axis=0)  # [..., 4, D]
    return jnp.sum(gathered * weight.reshape(*weight.shape[:-2], 4, 1), axis=-2)


class Qwen3VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The 3-D convolution with stride == kernel is a matmul over flattened patches.
        self.patch_embed = Linear(cfg.patch_dim, cfg.embed_dim, use_bias=True, **kw)
        self.pos_embed = Embed(cfg.num_position_embeddings, cfg.embed_dim, **kw)
        self.blocks = nnx.List([VisionBlock(cfg, FAMILY_QWEN3_VL, **kw) for _ in range(cfg.depth)])
        self.merger = Qwen3PatchMerger(cfg, postshuffle_norm=False, **kw)
        self.deepstack_merger_list = nnx.List(
            [
                Qwen3PatchMerger(cfg, postshuffle_norm=True, **kw)
                for _ in cfg.deepstack_visual_indexes
            ]
        )

    def __call__(self, patches, rope_hw, full_segment_ids, window_segment_ids=None, grid_hw=None):
        """patches [R, S, patch_dim] -> [R * S / merge**2, (1 + K) * out_dim]: the merged
        features, then each DeepStack level's. Slots attend to the slots of their own image
        frame (`full_segment_ids`; Qwen3-VL has no windows); padding slots only to themselves."""
        x = self.patch_embed(patches.astype(self.dtype))
        positions = resampled_position_table(self.pos_embed.table(), rope_hw, grid_hw)
        x = x + positions.astype(x.dtype)
        cos, sin = vision_rotary_tables(rope_hw, self.cfg.head_dim, self.cfg.rope_theta)
        mask = _segment_mask(full_segment_ids)
        levels = []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask)
            if index in self.cfg.deepstack_visual_indexes:
                level = self.cfg.deepstack_visual_indexes.index(index)
                levels.append(self.deepstack_merger_list[level](x))
        merged = jnp.concatenate([self.merger(x), *levels], axis=-1)
        return merged.reshape(-1, merged.shape[-1])
