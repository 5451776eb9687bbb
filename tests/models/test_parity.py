"""Logits and vision-feature parity with transformers (fp32, tiny random models of every family;
Qwen3-VL's features include every DeepStack level)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from maye_jax.data.sequences import make_sequence_batch
from maye_jax.models.configs import ModelConfig
from maye_jax.models.rope import get_rope_index, prompt_token_types
from maye_jax.models.vision_inputs import image_feature_index, pack_images, pad_rows
from maye_jax.tiny import tiny_hf_config
from tests.models.conftest import make_batch

# fp32 against transformers: torch's and XLA's kernels sum in different orders, through every
# layer (logits of order 1 agree to ~1e-5); a wrong rope index, mask or weight layout is O(1).
LOGIT_TOL = 1e-4


def _hf_image_features(hf, batch):
    """[tokens, (1 + K) * D]: the merged features, then each DeepStack level (Qwen3-VL)."""
    with torch.no_grad():
        out = hf.model.get_image_features(
            torch.tensor(batch["pixel_values"]),
            torch.tensor(batch["image_grid_thw"]),
            return_dict=True,
        )
    levels = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
    return torch.cat([torch.cat(level, dim=0) for level in levels], dim=-1).numpy()


@nnx.jit
def _tower(model, arrays):
    return model.encode_images(**arrays)


@nnx.jit
def _forward(model, *arrays):
    return model(*arrays)


def _encode(model, packed):
    """The tower's output for packed images (jitted: one compile per packing shape instead of
    one per operation)."""
    return _tower(model, {n: jnp.asarray(a) for n, a in packed.arrays().items()})


def _flax_logits(model, config, batch):
    types = prompt_token_types(batch["input_ids"], batch["prompt_lengths"], config.image_token_id)
    positions, _ = get_rope_index(
        batch["input_ids"],
        batch["attention_mask"],
        types,
        batch["image_grid_thw"],
        config.vision.spatial_merge_size,
    )
    packed = pack_images(batch["pixel_values"], batch["image_grid_thw"], config.vision)
    features = _encode(model, packed)
    index = image_feature_index(types, packed.feature_index)
    return np.asarray(
        _forward(
            model,
            jnp.asarray(batch["input_ids"]),
            jnp.asarray(positions),
            jnp.asarray(batch["attention_mask"]),
            features,
            jnp.asarray(index),
        )
    )


def _hf_logits_from_parts(hf, batch):
    """transformers' own modules, with image features placed by the prompt's token types.

    (transformers' forward places features at every image-pad id, so it cannot take a response
    that contains a generated one; its components still define the reference numbers.)
    """
    input_ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    types = torch.tensor(batch["mm_token_type_ids"])
    with torch.no_grad():
        positions, _ = hf.model.get_rope_index(
            input_ids,
            mm_token_type_ids=types,
            image_grid_thw=torch.tensor(batch["image_grid_thw"]),
            attention_mask=mask,
        )
        embeds = hf.model.language_model.embed_tokens(input_ids)
        hidden_size = embeds.shape[-1]
        features = torch.tensor(_hf_image_features(hf, batch))
        embeds[types.bool()] = features[:, :hidden_size]
        deepstack = {}
        if features.shape[-1] > hidden_size:  # Qwen3-VL: the DeepStack levels
            deepstack = dict(
                visual_pos_masks=types.bool(),
                deepstack_visual_embeds=list(features[:, hidden_size:].split(hidden_size, -1)),
            )
        hidden = hf.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **deepstack
        ).last_hidden_state
        return hf.lm_head(hidden).numpy()


def _max_valid_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


def test_vision_features_match_transformers(variant):
    hf, model, config = variant
    batch = make_batch(config)
    packed = pack_images(batch["pixel_values"], batch["image_grid_thw"], config.vision)
    ours = np.asarray(_encode(model, packed))[packed.feature_index]
    reference = _hf_image_features(hf, batch)
    assert ours.shape == reference.shape
    assert ours.shape[1] == (1 + config.num_deepstack_levels) * config.text.hidden_size
    np.testing.assert_allclose(ours, reference, atol=LOGIT_TOL, rtol=0)


def test_vision_features_independent_of_packing(variant):
    """Row length / row count buckets change the layout, never the features."""
    _, model, config = variant
    batch = make_batch(config)
    outs = []
    for row_len, num_rows, padded_rows in ((64, None, None), (128, 2, None), (256, 3, 4)):
        packed = pack_images(
            batch["pixel_values"],
            batch["image_grid_thw"],
            config.vision,
            row_len=row_len,
            num_rows=num_rows,
        )
        if padded_rows:
            packed = pad_rows(packed, padded_rows)
            assert packed.patches.shape[0] == 4 and (packed.full_segment_ids[3] == -1).all()
        feats = _encode(model, packed)
        outs.append(np.asarray(feats)[packed.feature_index])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)


def test_sequence_batch_packs_images_into_the_rows_they_fill():
    """Three 16-patch images and one of 64 fill two rows of 64 slots (next-fit): the batch's
    tower input has bucket(2) = 2 rows, not one per image (4)."""
    config = ModelConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=512))
    grids = [(1, 4, 4), (1, 4, 4), (1, 4, 4), (1, 8, 8)]
    image_id, merge = config.image_token_id, config.vision.spatial_merge_size
    prompts = [
        dict(
            input_ids=[5] + [image_id] * (h * w // merge**2) + [6],
            pixel_values=np.ones((h * w, config.vision.patch_dim), np.float32),
            image_grid_thw=np.array([(t, h, w)]),
        )
        for t, h, w in grids
    ]
    batch = make_sequence_batch(prompts, [[] for _ in prompts], config, pad_id=0)
    assert batch.vision["patches"].shape[:2] == (2, 64)
    # row 0 holds the three small images (merged features 0-11 of its 16), row 1 the large one
    features = batch.image_feature_index[batch.image_feature_index >= 0]
    assert sorted(features.tolist()) == list(range(12)) + list(range(16, 32))


def test_logits_match_transformers_forward(variant):
    """Against transformers' own forward (no generated image-pad in the responses)."""
    hf, model, config = variant
    batch = make_batch(config, with_generated_image_pad=False)
    with torch.no_grad():
        reference = hf(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_grid_thw=torch.tensor(batch["image_grid_thw"]),
            mm_token_type_ids=torch.tensor(batch["mm_token_type_ids"]),
        ).logits.numpy()
    ours = _flax_logits(model, config, batch)
    assert np.abs(reference).max() > 0.1  # the comparison is not between near-zero numbers
    assert _max_valid_diff(ours, reference, batch["attention_mask"]) <= LOGIT_TOL


def test_logits_with_generated_image_pad_in_response(variant):
    """A generated image-pad id is text: embedded as a token, positioned as text."""
    hf, model, config = variant
    batch = make_batch(config, with_generated_image_pad=True)
    reference = _hf_logits_from_parts(hf, batch)
    ours = _flax_logits(model, config, batch)
    assert _max_valid_diff(ours, reference, batch["attention_mask"]) <= LOGIT_TOL


def test_text_only_batch_matches_transformers(variant):
    hf, model, config = variant
    rng = np.random.default_rng(3)
    input_ids = rng.integers(0, 400, size=(2, 9))
    mask = np.ones_like(input_ids)
    mask[1, :4] = 0
    with torch.no_grad():
        # transformers numbers text-only rows 0..L-1 over padding too; RoPE is relative, so
        # the logits of valid tokens agree with our 0-based positions of valid tokens.
        reference = hf(
            input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    types = np.zeros_like(input_ids)
    positions, _ = get_rope_index(input_ids, mask, types, None, 2)
    ours = np.asarray(
        _forward(model, jnp.asarray(input_ids), jnp.asarray(positions), jnp.asarray(mask))
    )
    assert _max_valid_diff(ours, reference, mask) <= LOGIT_TOL
