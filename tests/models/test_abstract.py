"""Real-size models build abstractly (no memory) with transformers' parameter counts."""

from __future__ import annotations

import dataclasses

import jax
import pytest
import torch
import transformers

from maye_jax.models.configs import ModelConfig
from maye_jax.models.hf_mapping import flax_param_paths, hf_name_for, parameter_count
from maye_jax.models.qwen_vl import build_model
from maye_jax.tiny import preset_hf_config

# transformers' own counts (tied weights once), so a preset that drifts from the published
# shapes fails here even if transformers and we agree on it
PARAMETER_COUNTS = {
    "qwen2_vl_2b": 2_208_985_600,
    "qwen2_vl_7b": 8_291_375_616,
    "qwen2_5_vl_7b": 8_292_166_656,
    "qwen2_5_vl_3b": 3_754_622_976,
    "qwen3_vl_2b": 2_127_532_032,
    "qwen3_vl_4b": 4_437_815_808,
    "qwen3_vl_8b": 8_767_123_696,
    "qwen3_vl_32b": 33_357_390_064,
}


@pytest.mark.parametrize("preset", sorted(PARAMETER_COUNTS))
def test_real_size_abstract_build_matches_transformers(preset):
    hf_config = preset_hf_config(preset)
    with torch.device("meta"):
        hf_model = getattr(transformers, hf_config.architectures[0])(hf_config)
    hf_count = sum(p.numel() for p in hf_model.parameters())  # tied weights counted once
    assert hf_count == PARAMETER_COUNTS[preset]
    model = build_model(ModelConfig.from_hf(hf_config), abstract=True)
    leaves = jax.tree_util.tree_leaves(model)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves if hasattr(leaf, "shape"))
    assert parameter_count(model) == hf_count
    # Every HF tensor has exactly one Flax counterpart.
    hf_names = {
        n.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        for n, _ in hf_model.named_parameters()
    }
    ours = {hf_name_for(name) for name in flax_param_paths(model)}
    assert ours == hf_names


def test_preset_with_fewer_layers_keeps_the_widths():
    """The benchmarks' cut of a preset (`num_layers`, `vision_depth`): the same widths, only
    that many decoder layers and vision blocks."""
    full = ModelConfig.from_hf(preset_hf_config("qwen2_vl_2b"))
    cut = ModelConfig.from_hf(preset_hf_config("qwen2_vl_2b", num_layers=2, vision_depth=3))
    assert (full.text.num_layers, full.vision.depth) == (28, 32)
    assert (cut.text.num_layers, cut.vision.depth) == (2, 3)
    assert cut.text == dataclasses.replace(full.text, num_layers=2)
    assert cut.vision == dataclasses.replace(full.vision, depth=3)
