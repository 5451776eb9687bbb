"""Rotary position embeddings: host-side position ids (NumPy) and device-side rotation tables.

M-RoPE positions are data-dependent (they follow the image grids), so they are computed on the
host, once per batch, and passed to the jitted model as an int32 array `[3, batch, seq]`.
The contract is the position ids themselves, equal to transformers' `get_rope_index`
(5.x semantics): text tokens advance all three components together; the tokens of an image
with merged grid (t, h, w) get (start + t_i, start + h_i, start + w_i); after the image the
text position resumes at start + max(h, w) (for t == 1). Padding positions are 0.

Image token types come from the prompt only (`mm_token_type_ids`): an image-pad id that a model
generates in its response is ordinary text there.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1


def prompt_token_types(
    input_ids: np.ndarray, prompt_lengths: np.ndarray | None, image_token_id: int
) -> np.ndarray:
    """mm_token_type_ids [B, L]: 1 where an image-pad token sits inside the prompt, else 0.

    `prompt_lengths[b]` counts the tokens (padding included) of row b that belong to the prompt;
    with left padding and right-appended responses the prompt is `input_ids[b, :prompt_len]`.
    None means the whole row is prompt.
    """
    input_ids = np.asarray(input_ids)
    types = (input_ids == image_token_id).astype(np.int32)
    if prompt_lengths is not None:
        columns = np.arange(input_ids.shape[1])[None, :]
        types = np.where(columns < np.asarray(prompt_lengths)[:, None], types, TEXT_TOKEN_TYPE)
    return types


def _vision_positions(start: int, grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    t, h, w = (
        int(grid_thw[0]),
        int(grid_thw[1]) // spatial_merge_size,
        int(grid_thw[2]) // spatial_merge_size,
    )
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    mm_token_type_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE position ids [3, B, L] (int32) and rope deltas [B] (int32).

    `image_grid_thw` lists the images of the whole batch in order of appearance (row-major).
    `rope_deltas[b]` = max position + 1 - number of valid tokens: a token appended at valid
    index i (e.g. during sampling) gets position i + rope_deltas[b] in all three components.
    """
    input_ids = np.asarray(input_ids)
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask).astype(bool)
    mm_token_type_ids = np.asarray(mm_token_type_ids)
    grids = (
        iter(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else iter(())
    )
    positions = np.zeros((3, batch, seq_len), dtype=np.int64)
    deltas = np.zeros((batch,), dtype=np.int64)
    for row in range(batch):
        valid = attention_mask[row]
        types = mm_token_type_ids[row][valid]
        pieces = []
        current = 0
        offset = 0
        for token_type, group in itertools.groupby(types.tolist()):
            length = len(list(group))
            if token_type == TEXT_TOKEN_TYPE:
                pieces.append(np.broadcast_to(np.arange(length) + current, (3, length)))
                current += length
            elif token_type == IMAGE_TOKEN_TYPE:
                try:
                    grid = next(grids)
                except StopIteration:
                    raise ValueError(
                        f"row {row}: more image token runs than entries in image_grid_thw"
                    ) from None
                vision = _vision_positions(current, grid, spatial_merge_size)
                if vision.shape[1] != length:
                    raise ValueError(
                        f"row {row}: image at token {offset} has {length} image tokens but its "
                        f"grid {grid.tolist()} needs {vision.shape[1]}"
                    )
                pieces.append(vision)
                current += max(int(grid[1]), int(grid[2])) // spatial_merge_size
            else:
                raise ValueError(
                    f"row {row}: unsupported token type {token_type} (videos are not supported)"
                )
            offset += length
        if pieces:
            row_positions = np.concatenate(pieces, axis=1)
            positions[:, row, valid] = row_positions
            deltas[row] = row_positions.max() + 1 - row_positions.shape[1]
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more images than the input ids contain")
    return positions.astype(np.int32), deltas.astype(np.int32)


def mrope_components(mrope_section: tuple[int, int, int], interleaved: bool) -> np.ndarray:
    """Which position component (0 t, 1 h, 2 w) rotates each of the head_dim/2 frequencies.

    Chunked (Qwen2-VL, Qwen2.5-VL): the first `mrope_section[0]` frequencies follow t, the next
    `mrope_section[1]` h, the last w. Interleaved (Qwen3-VL, [24, 20, 20]): t, h, w, t, h, w, ...
    (h on slots 1, 4, ... below 3 * mrope_section[1], w on 2, 5, ... below 3 * mrope_section[2],
    t everywhere else), so every component spans low to high frequencies.
    """
    if not interleaved:
        return np.repeat(np.arange(3), mrope_section)
    component = np.zeros(sum(mrope_section), np.int64)
    component[1 : 3 * mrope_section[1] : 3] = 1
    component[2 : 3 * mrope_section[2] : 3] = 2
    return component


def text_rotary_tables(
    positions: jax.Array,
    head_dim: int,
    rope_theta: float,
    mrope_section: tuple[int, int, int],
    dtype,
    interleaved: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, L, head_dim] for M-RoPE positions [3, B, L].

    Frequency j of the first half of the head rotates with the position component
    `mrope_components(...)[j]`; the second half repeats the first (rotate-half convention).
    """
    inv_freq = 1.0 / (rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, head_dim/2]
    component = mrope_components(mrope_section, interleaved)
    # Advanced indexing on axes 0 and 3 puts the frequency axis first: [F, B, L].
    freqs = jnp.moveaxis(freqs[component, :, :, np.arange(len(component))], 0, -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_rope_positions(image_grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """(row, col) patch coordinates [P, 2] in the processor's patch order.

    The processor emits patches block-major over merge_size x merge_size blocks, so that each
    run of merge_size**2 consecutive patches is one merged (LLM) token.
    """
    out = []
    m = spatial_merge_size
    for t, h, w in np.asarray(image_grid_thw).reshape(-1, 3).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        # block-major: each m x m block of the grid (one merged token) is contiguous
        block_major = "(blocks_h m_h) (blocks_w m_w) -> (blocks_h blocks_w m_h m_w)"
        rows = rearrange(rows, block_major, m_h=m, m_w=m)
        cols = rearrange(cols, block_major, m_h=m, m_w=m)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int32)


def vision_rotary_tables(rope_hw: jax.Array, head_dim: int, rope_theta: float):
    """cos/sin [..., head_dim] (fp32) for patch coordinates rope_hw [..., 2].

    A quarter of the head's frequencies rotate with the row, a quarter with the column, and
    the second half repeats the first (rotate-half convention).
    """
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (
        rope_theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim)
    )
    freqs = rope_hw.astype(jnp.float32)[..., None] * inv_freq  # [..., 2, head_dim/4]
    freqs = freqs.reshape(*freqs.shape[:-2], -1)  # [h freqs, w freqs]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_window_index(
    image_grid_thw: np.ndarray, spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL window order of merged units, and the window id of each unit in that order.

    Returns `window_index` [U] (position k in window order holds merged unit window_index[k],
    units numbered across the whole batch of images) and `window_ids` [U] (a window number,
    unique across images, of the unit at each window-order position).
    """
    window_index, window_ids = [], []
    unit_offset = 0
    window_offset = 0
    units_per_side = window_size // spatial_merge_size // patch_size
    for t, h, w in np.asarray(image_grid_thw).reshape(-1, 3).tolist():
        grid_h, grid_w = h // spatial_merge_size, w // spatial_merge_size
        num_win_h = -(-grid_h // units_per_side)
        num_win_w = -(-grid_w // units_per_side)
        units = np.arange(t * grid_h * grid_w).reshape(t, grid_h, grid_w)
        win_row = np.arange(grid_h) // units_per_side
        win_col = np.arange(grid_w) // units_per_side
        win = (
            np.arange(t)[:, None, None] * num_win_h * num_win_w
            + win_row[None, :, None] * num_win_w
            + win_col[None, None, :]
        )
        # Stable sort by window id keeps row-major order inside each window.
        order = np.argsort(win.reshape(-1), kind="stable")
        window_index.append(units.reshape(-1)[order] + unit_offset)
        window_ids.append(win.reshape(-1)[order] + window_offset)
        unit_offset += t * grid_h * grid_w
        window_offset += t * num_win_h * num_win_w
    return np.concatenate(window_index), np.concatenate(window_ids)
