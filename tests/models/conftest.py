"""Shared fixtures for model tests: tiny random HF models and a multi-image padded batch."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from maye_jax.models.configs import ModelConfig
from maye_jax.models.hf_mapping import load_hf_tensors
from maye_jax.models.qwen_vl import build_model
from maye_jax.tiny import tiny_hf_model

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VARIANTS = [(f, t) for f in FAMILIES for t in (False, True)]


def randomize_norms_and_biases(hf, seed: int) -> None:
    """Norm weights around 1, biases and the position table random: transformers initialises
    norms to 1 and biases to 0, which would hide a missing bias, norm or position table."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.3 * noise)
            elif "pos_embed" in name:
                param.copy_(noise)


@functools.cache
def hf_and_flax(family: str, tied: bool):
    """(hf_model, flax_model, ModelConfig) with identical weights, fp32, built once per session
    (Qwen3-VL's norms, biases and position table randomised)."""
    hf = tiny_hf_model(family, tied=tied, seed=1, initializer_range=0.2)
    if family == "qwen3_vl":
        randomize_norms_and_biases(hf, seed=2)
    config = ModelConfig.from_hf(hf.config)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    flax_model = load_hf_tensors(build_model(config, abstract=True), state.items())
    return hf, flax_model, config


@pytest.fixture(params=VARIANTS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in VARIANTS])
def variant(request):
    return hf_and_flax(*request.param)


def make_batch(config: ModelConfig, seed: int = 0, with_generated_image_pad: bool = True):
    """A left-padded batch: row 0 two images of different sizes + a response that contains a
    generated image-pad id, row 1 one image, row 2 text only.

    Returns dict(input_ids, attention_mask, mm_token_type_ids, prompt_lengths, pixel_values,
    image_grid_thw) as NumPy arrays.
    """
    rng = np.random.default_rng(seed)
    merge = config.vision.spatial_merge_size
    image_id = config.image_token_id
    start_id, end_id = config.vision_start_token_id, config.vision_end_token_id
    text = lambda n: list(rng.integers(0, image_id - 20, size=n))  # noqa: E731

    def image_tokens(grid):
        return [start_id] + [image_id] * (grid[1] * grid[2] // merge**2) + [end_id]

    grids = [(1, 8, 8), (1, 4, 6), (1, 6, 10)]  # row 0: two images; row 1: one
    if config.vision.num_position_embeddings:  # Qwen3-VL: a 4 x 4 table
        # square, wide and tall; the table resampled to grids larger and smaller than it
        grids = [(1, 8, 8), (1, 2, 6), (1, 10, 4)]
    prompts = [
        text(3) + image_tokens(grids[0]) + text(2) + image_tokens(grids[1]) + text(4),
        text(2) + image_tokens(grids[2]) + text(5),
        text(7),
    ]
    responses = [
        text(3) + ([image_id] if with_generated_image_pad else []) + text(2),
        text(4),
        text(3),
    ]
    rows = [p + r for p, r in zip(prompts, responses)]
    length = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), length), np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    types = np.zeros((len(rows), length), np.int64)
    prompt_lengths = np.zeros(len(rows), np.int64)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        pad = length - len(row)
        input_ids[i, pad:] = row
        attention_mask[i, pad:] = 1
        prompt_lengths[i] = pad + len(prompt)
        types[i, pad : pad + len(prompt)] = np.array(prompt) == image_id
    num_patches = sum(t * h * w for t, h, w in grids)
    pixel_values = rng.standard_normal((num_patches, config.vision.patch_dim)).astype(np.float32)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=types,
        prompt_lengths=prompt_lengths,
        pixel_values=pixel_values,
        image_grid_thw=np.array(grids, np.int64),
    )
