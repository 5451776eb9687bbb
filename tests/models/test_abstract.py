"""Real-size models build abstractly (no memory) with transformers' parameter counts."""

from __future__ import annotations

import jax
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from maye_jax.models.configs import ModelConfig
from maye_jax.models.hf_mapping import flax_param_paths, hf_name_for, parameter_count
from maye_jax.models.qwen_vl import build_model
from maye_jax.tiny import preset_hf_config


@pytest.mark.parametrize("preset", ["qwen2_vl_7b", "qwen2_5_vl_7b", "qwen2_5_vl_3b"])
def test_real_size_abstract_build_matches_transformers(preset):
    hf_config = preset_hf_config(preset)
    cls = (
        Qwen2VLForConditionalGeneration
        if hf_config.model_type == "qwen2_vl"
        else Qwen2_5_VLForConditionalGeneration
    )
    with torch.device("meta"):
        hf_model = cls(hf_config)
    hf_count = sum(p.numel() for p in hf_model.parameters())  # tied weights counted once
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
