"""Qwen3-VL's own pieces against independent references: the position table's resampling
(torch's bilinear interpolation with aligned corners), interleaved M-RoPE (transformers' rotary
embedding), and the configs refused at start."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from einops import rearrange

from maye_jax.models.configs import ModelConfig
from maye_jax.models.qwen3_vision import resampled_position_table
from maye_jax.models.rope import mrope_components, text_rotary_tables, vision_rope_positions
from maye_jax.tiny import tiny_hf_config
from tests.models.conftest import hf_and_flax


def test_position_table_is_resampled_bilinearly_with_aligned_corners():
    """Grids larger and smaller than the 4 x 4 table (in one call, as packed slots), against
    torch's own interpolation of the table as an image, read in the processor's 2 x 2
    merge-block patch order."""
    side, dim = 4, 3
    table = np.random.default_rng(0).standard_normal((side * side, dim)).astype(np.float32)
    grids = [(8, 8), (2, 6), (10, 4), (48, 2)]
    expected = []
    for height, width in grids:
        image = torch.tensor(table).T.reshape(1, dim, side, side)
        resized = torch.nn.functional.interpolate(
            image, size=(height, width), mode="bilinear", align_corners=True
        )[0].numpy()  # [dim, height, width]
        expected.append(rearrange(resized, "d (bh mh) (bw mw) -> (bh bw mh mw) d", mh=2, mw=2))
    rope_hw = vision_rope_positions(np.array([(1, h, w) for h, w in grids]), 2)
    grid = np.concatenate([np.tile([h, w], (h * w, 1)) for h, w in grids]).astype(np.int32)
    ours = np.asarray(resampled_position_table(jnp.asarray(table), rope_hw, jnp.asarray(grid)))
    np.testing.assert_allclose(ours, np.concatenate(expected), atol=1e-6)


def test_interleaved_mrope_layout():
    """[24, 20, 20] over 64 frequencies: h on 1, 4, ..., 58, w on 2, 5, ..., 59, t elsewhere."""
    component = mrope_components((24, 20, 20), interleaved=True)
    np.testing.assert_array_equal(np.flatnonzero(component == 1), np.arange(1, 60, 3))
    np.testing.assert_array_equal(np.flatnonzero(component == 2), np.arange(2, 60, 3))
    assert (component == 0).sum() == 24 and list(component[60:]) == [0, 0, 0, 0]
    chunked = mrope_components((16, 24, 24), interleaved=False)
    np.testing.assert_array_equal(chunked, np.repeat([0, 1, 2], [16, 24, 24]))


def test_interleaved_mrope_tables_match_transformers():
    hf, _, config = hf_and_flax("qwen3_vl", False)
    positions = np.random.default_rng(1).integers(0, 3000, size=(3, 2, 7))
    with torch.no_grad():
        cos, sin = hf.model.language_model.rotary_emb(torch.zeros(1), torch.tensor(positions))
    text = config.text
    our_cos, our_sin = text_rotary_tables(
        jnp.asarray(positions),
        text.head_dim,
        text.rope_theta,
        text.mrope_section,
        jnp.float32,
        interleaved=text.mrope_interleaved,
    )
    assert text.mrope_interleaved and text.head_dim == 48
    # cos/sin of angles up to 3000 rad differ in their last float32 bits between XLA and torch
    np.testing.assert_allclose(np.asarray(our_cos), cos.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(our_sin), sin.numpy(), atol=1e-4)


def _hub_config(tmp_path, edit) -> object:
    """A Qwen3-VL config.json written as the hub's 4.57-era files are, edited, read back."""
    from transformers import AutoConfig

    config = tiny_hf_config("qwen3_vl", tied=True).to_dict()
    text = config["text_config"]
    text["rope_scaling"] = text.pop("rope_parameters")
    text["rope_theta"] = text["rope_scaling"].pop("rope_theta")
    config.pop("tie_word_embeddings")  # only the text-level flag, as in the 2B/4B hub files
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return AutoConfig.from_pretrained(str(tmp_path), local_files_only=True)


def test_hub_config_layout_is_read(tmp_path):
    config = ModelConfig.from_hf(_hub_config(tmp_path, lambda c: None))
    assert config.family == "qwen3_vl" and config.tie_word_embeddings
    assert config.text.mrope_interleaved and config.text.rope_theta == 5e6
    assert config.text.mrope_section == (10, 7, 7) and config.text.head_dim == 48
    assert config.vision.deepstack_visual_indexes == (0, 1)


def test_unsupported_configs_are_refused_in_one_line(tmp_path):
    def moe(config):
        config["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]

    def deepstack_beyond_depth(config):
        config["vision_config"]["deepstack_visual_indexes"] = [0, 2]  # depth 2

    for edit, message in (
        (moe, "unsupported model family qwen3_vl_moe"),
        (deepstack_beyond_depth, r"deepstack_visual_indexes \[0, 2\]: every index"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            ModelConfig.from_hf(_hub_config(tmp_path, edit))
        assert "\n" not in str(error.value)
