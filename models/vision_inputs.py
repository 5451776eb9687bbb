"""Host-side packing of a batch's images into static-shape arrays for the jitted vision tower.

The processor gives `pixel_values` [P, 1176] (all patches of all images, concatenated) and
`image_grid_thw` [N, 3]. Images have different sizes, and a jitted function needs static
shapes, so the patches are packed into `rows` of `row_len` slots (images placed whole, in order,
next-fit), padded, and every slot carries:
- its (row, col) rotary coordinates,
- a full-attention segment id (one per image frame; -1 for padding): attention never crosses
  images,
- a window segment id (Qwen2.5-VL window attention; equal to the full id for Qwen2-VL and
  Qwen3-VL),
- the (height, width) of its image's patch grid (Qwen3-VL resamples its position table to it).
For Qwen2.5-VL the merged units of each image are laid out in window order (windows
contiguous, as transformers does); `feature_index` undoes that reordering: it lists, for every
image token of the batch in LLM order, the flat index of its merged feature in the tower output
`[rows * row_len / merge**2, D]`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from maye_jax.models.configs import VisionConfig
from maye_jax.models.rope import vision_rope_positions, vision_window_index
from maye_jax.models.shapes import bucket


@dataclasses.dataclass
class PackedImages:
    patches: np.ndarray  # [rows, row_len, patch_dim] float32
    rope_hw: np.ndarray  # [rows, row_len, 2] int32
    full_segment_ids: np.ndarray  # [rows, row_len] int32, -1 = padding
    window_segment_ids: np.ndarray  # [rows, row_len] int32, -1 = padding
    grid_hw: np.ndarray  # [rows, row_len, 2] int32, (0, 0) on padding
    feature_index: np.ndarray  # [num_image_tokens] int32, image tokens in LLM order

    def arrays(self) -> dict[str, np.ndarray]:
        """The tower's inputs by name (`model.encode_images(**arrays)`)."""
        return {
            "patches": self.patches,
            "rope_hw": self.rope_hw,
            "full_segment_ids": self.full_segment_ids,
            "window_segment_ids": self.window_segment_ids,
            "grid_hw": self.grid_hw,
        }


def empty_vision_arrays(num_rows: int, row_len: int, patch_dim: int, leading=()) -> dict:
    """`PackedImages.arrays()` of rows with no image at all (every slot padding)."""
    shape = (*leading, num_rows, row_len)
    return {
        "patches": np.zeros((*shape, patch_dim), np.float32),
        "rope_hw": np.zeros((*shape, 2), np.int32),
        "full_segment_ids": np.full(shape, -1, np.int32),
        "window_segment_ids": np.full(shape, -1, np.int32),
        "grid_hw": np.zeros((*shape, 2), np.int32),
    }


def pack_images(
    pixel_values: np.ndarray,
    image_grid_thw: np.ndarray,
    config: VisionConfig,
    *,
    row_len: int | None = None,
    num_rows: int | None = None,
) -> PackedImages:
    """Packs the patches of a batch of images into [rows, row_len] slots (see module doc)."""
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    merge_unit = config.spatial_merge_size**2
    sizes = grids.prod(axis=1)
    if pixel_values.ndim != 2 or pixel_values.shape[1] != config.patch_dim:
        raise ValueError(
            f"pixel_values: expected [patches, {config.patch_dim}], got {pixel_values.shape}"
        )
    if int(sizes.sum()) != pixel_values.shape[0]:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
            f"{grids.tolist()} needs {int(sizes.sum())}"
        )
    if np.any(grids[:, 1:] % config.spatial_merge_size):
        raise ValueError(
            f"image_grid_thw {grids.tolist()}: h and w must be multiples of the merge size"
        )
    largest = int(sizes.max()) if len(sizes) else merge_unit
    row_len = row_len or bucket(largest)
    if row_len % merge_unit or row_len < largest:
        raise ValueError(f"row_len {row_len} must be a multiple of {merge_unit} and >= {largest}")

    # Next-fit placement of whole images into rows.
    placements, row, used = [], 0, 0
    for size in sizes.tolist():
        if used + size > row_len:
            row, used = row + 1, 0
        placements.append((row, used))
        used += size
    needed_rows = row + 1 if len(sizes) else 1
    num_rows = num_rows or needed_rows
    if num_rows < needed_rows:
        raise ValueError(f"num_rows {num_rows} < {needed_rows} rows needed for these images")

    rope_hw_all = vision_rope_positions(grids, config.spatial_merge_size)
    arrays = empty_vision_arrays(num_rows, row_len, config.patch_dim)
    patches, rope_hw, grid_hw = arrays["patches"], arrays["rope_hw"], arrays["grid_hw"]
    full_ids, window_ids = arrays["full_segment_ids"], arrays["window_segment_ids"]
    feature_index = []
    patch_start, segment_base, window_base = 0, 0, 0
    for (t, h, w), (row, start) in zip(grids.tolist(), placements):
        size = t * h * w
        units = size // merge_unit
        if config.window_size is not None:
            order, unit_windows = vision_window_index(
                np.array([[t, h, w]]),
                config.spatial_merge_size,
                config.window_size,
                config.patch_size,
            )
        else:
            order = np.arange(units)
            unit_windows = np.repeat(np.arange(t), units // t)
        # Slot k of this image holds patch slot_patch[k] (merged units moved as blocks of 4).
        slot_patch = (order[:, None] * merge_unit + np.arange(merge_unit)[None, :]).reshape(-1)
        frame_of_patch = np.repeat(np.arange(t), h * w)
        span = slice(start, start + size)
        patches[row, span] = pixel_values[patch_start + slot_patch]
        rope_hw[row, span] = rope_hw_all[patch_start + slot_patch]
        full_ids[row, span] = segment_base + frame_of_patch[slot_patch]
        window_ids[row, span] = window_base + np.repeat(unit_windows, merge_unit)
        grid_hw[row, span] = (h, w)
        # The inverse permutation: merged unit u sits at window-order position inverse[u].
        inverse = np.argsort(order)
        feature_index.append(row * (row_len // merge_unit) + start // merge_unit + inverse)
        patch_start += size
        segment_base += t
        window_base += int(unit_windows.max()) + 1 if units else 0
    return PackedImages(
        patches=patches,
        rope_hw=rope_hw,
        full_segment_ids=full_ids,
        window_segment_ids=window_ids,
        grid_hw=grid_hw,
        feature_index=(
            np.concatenate(feature_index) if feature_index else np.zeros((0,), np.int64)
        ).astype(np.int32),
    )


def pad_rows(packed: PackedImages, num_rows: int) -> PackedImages:
    """`packed` with padding rows appended up to `num_rows` (the feature indices are unchanged:
    they count row-major, and the new rows come last)."""
    extra = num_rows - len(packed.patches)
    if extra < 0:
        raise ValueError(f"num_rows {num_rows} < the {len(packed.patches)} rows already packed")

    empty = empty_vision_arrays(extra, packed.patches.shape[1], packed.patches.shape[2])
    grown = {name: np.concatenate([array, empty[name]]) for name, array in packed.arrays().items()}
    return dataclasses.replace(packed, **grown)


def image_feature_index(mm_token_type_ids: np.ndarray, feature_index: np.ndarray) -> np.ndarray:
    """Per-token index [B, L] into the flattened tower output; -1 where the token is not an image token.

    Image tokens are numbered row-major over the batch, matching the order of `image_grid_thw`.
    """
    mm_token_type_ids = np.asarray(mm_token_type_ids)
    is_image = mm_token_type_ids == 1
    count = int(is_image.sum())
    if count != len(feature_index):
        raise ValueError(
            f"the prompts hold {count} image tokens but the images give {len(feature_index)} features"
        )
    index = np.full(mm_token_type_ids.shape, -1, np.int32)
    index[is_image] = feature_index
    return index
