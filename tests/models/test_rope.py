"""Host-side M-RoPE positions and vision index helpers against transformers 5.23."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from maye_jax.models.rope import (
    get_rope_index,
    prompt_token_types,
    vision_rope_positions,
    vision_window_index,
)
from tests.models.conftest import hf_and_flax, make_batch


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_get_rope_index_matches_transformers(family):
    hf, _, config = hf_and_flax(family, False)
    batch = make_batch(config)
    types = prompt_token_types(batch["input_ids"], batch["prompt_lengths"], config.image_token_id)
    np.testing.assert_array_equal(types, batch["mm_token_type_ids"])
    ours, our_deltas = get_rope_index(
        batch["input_ids"], batch["attention_mask"], types, batch["image_grid_thw"], 2
    )
    theirs, their_deltas = hf.model.get_rope_index(
        torch.tensor(batch["input_ids"]),
        mm_token_type_ids=torch.tensor(types),
        image_grid_thw=torch.tensor(batch["image_grid_thw"]),
        attention_mask=torch.tensor(batch["attention_mask"]),
    )
    np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(our_deltas, their_deltas.numpy().reshape(-1))
    # The image pad generated in row 0's response is positioned as text.
    row0 = ours[:, 0, batch["prompt_lengths"][0] :]
    assert np.all(row0[0] == row0[1]) and np.all(row0[1] == row0[2])
    assert np.all(np.diff(row0[0]) == 1)


def test_generated_token_positions_follow_rope_deltas():
    """Positions of a response computed from the whole sequence equal transformers' decoding
    rule: (number of valid tokens before it) + rope_delta of the prompt."""
    _, _, config = hf_and_flax("qwen2_5_vl", False)
    batch = make_batch(config)
    prompt_len = batch["prompt_lengths"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full_types = prompt_token_types(ids, prompt_len, config.image_token_id)
    full, _ = get_rope_index(ids, mask, full_types, batch["image_grid_thw"], 2)
    for row in range(ids.shape[0]):
        p = prompt_len[row]
        _, delta = get_rope_index(
            ids[row : row + 1, :p],
            mask[row : row + 1, :p],
            full_types[row : row + 1, :p],
            batch["image_grid_thw"][:2]
            if row == 0
            else (batch["image_grid_thw"][2:] if row == 1 else None),
            2,
        )
        valid_index = np.cumsum(mask[row]) - 1
        expected = valid_index[p:] + delta[0]
        for component in range(3):
            np.testing.assert_array_equal(full[component, row, p:], expected)


def test_rope_index_errors_name_the_row():
    ids = np.array([[1, 9, 9, 2]])
    types = np.array([[0, 1, 1, 0]])
    with pytest.raises(ValueError, match="row 0"):
        get_rope_index(ids, None, types, np.array([[1, 4, 4]]), 2)  # needs 4 tokens, has 2
    with pytest.raises(ValueError, match="more images"):
        get_rope_index(ids, None, types, np.array([[1, 2, 4], [1, 2, 2]]), 2)


def test_vision_positions_and_windows_match_transformers():
    grids = np.array([[1, 8, 8], [1, 4, 6], [1, 6, 10], [2, 4, 4]])
    ours = vision_rope_positions(grids, 2)
    theirs = get_vision_position_ids(torch.tensor(grids), 2)
    np.testing.assert_array_equal(ours, theirs.numpy())
    window_index, window_ids = vision_window_index(grids, 2, 56, 14)
    their_index, their_cu = get_vision_window_index(torch.tensor(grids), 2, 56, 14)
    np.testing.assert_array_equal(window_index, their_index.numpy())
    # Window boundaries: our window ids change exactly where transformers' cu_seqlens cut.
    boundaries = np.flatnonzero(np.diff(window_ids)) + 1
    np.testing.assert_array_equal(boundaries * 4, their_cu.numpy()[1:-1])
