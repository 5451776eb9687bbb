"""Tiny random Qwen-VL models (transformers configs) for tests, demos and benchmarks.

No hub access is needed: the configs are built in code. A small vocabulary keeps model tests
fast; the special vision token ids then move inside it (`small_vocab_token_ids`). With the real
152k vocabulary (`vocab_size=151936`) the real Qwen token ids are kept, so the offline
tokenizer and the rollout engines work end to end.
"""

from __future__ import annotations

from typing import Any

from maye_jax.qwen_ids import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
)

QWEN_TOKEN_IDS = dict(
    image_token_id=IMAGE_PAD_ID,
    video_token_id=VIDEO_PAD_ID,
    vision_start_token_id=VISION_START_ID,
    vision_end_token_id=VISION_END_ID,
)


def small_vocab_token_ids(vocab_size: int) -> dict[str, int]:
    """Vision special ids placed at the top of a small vocabulary."""
    return dict(
        image_token_id=vocab_size - 12,
        video_token_id=vocab_size - 11,
        vision_start_token_id=vocab_size - 14,
        vision_end_token_id=vocab_size - 13,
    )


def tiny_hf_config(
    family: str = "qwen2_5_vl",
    *,
    tied: bool = False,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_depth: int = 2,
    initializer_range: float = 0.02,
    intermediate_size: int | None = None,
) -> Any:
    """A transformers Qwen2VLConfig / Qwen2_5_VLConfig / Qwen3VLConfig of a ~tiny model
    (head_dim 32)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if family == "qwen3_vl":
        return _tiny_qwen3_vl_config(
            tied=tied,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            vision_depth=vision_depth,
            initializer_range=initializer_range,
            intermediate_size=intermediate_size,
        )

    token_ids = QWEN_TOKEN_IDS if vocab_size > VIDEO_PAD_ID else small_vocab_token_ids(vocab_size)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        initializer_range=initializer_range,
        bos_token_id=min(ENDOFTEXT_ID, vocab_size - 1),
        eos_token_id=min(IM_END_ID, vocab_size - 1),
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=vision_depth,
            embed_dim=32,
            num_heads=1,
            mlp_ratio=2,
            hidden_size=hidden_size,
            initializer_range=initializer_range,
        )
        config = Qwen2VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=tied, **token_ids
        )
        config.architectures = ["Qwen2VLForConditionalGeneration"]
    elif family == "qwen2_5_vl":
        # window_size 56 = 2 merged units per window side, so small images span several
        # windows; the last block uses full attention.
        vision = dict(
            depth=vision_depth,
            hidden_size=32,
            intermediate_size=64,
            num_heads=1,
            out_hidden_size=hidden_size,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
            initializer_range=initializer_range,
        )
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=tied, **token_ids
        )
        config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    else:
        raise ValueError(f"unknown family {family!r}")
    config.text_config.tie_word_embeddings = tied
    return config


def _tiny_qwen3_vl_config(
    *,
    tied: bool,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    vision_depth: int,
    initializer_range: float,
    intermediate_size: int | None,
) -> Any:
    """Qwen3-VL at test size: GQA (heads of 32, half as many KV heads), an explicit head_dim
    that differs from hidden / heads, interleaved M-RoPE, a 4 x 4 position table (so images
    both larger and smaller than it resample it), and DeepStack on two levels (the first and
    the last vision block: after decoder layers 0 and 1)."""
    from transformers import Qwen3VLConfig

    token_ids = QWEN_TOKEN_IDS if vocab_size > VIDEO_PAD_ID else small_vocab_token_ids(vocab_size)
    num_heads = max(2, hidden_size // 32)
    depth = max(vision_depth, 2)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=max(num_layers, 2),
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2,
        head_dim=48,  # 24 frequencies: t, h, w interleaved over the first 21, then t
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [10, 7, 7],
            "mrope_interleaved": True,
        },
        initializer_range=initializer_range,
        bos_token_id=min(ENDOFTEXT_ID, vocab_size - 1),
        eos_token_id=min(IM_END_ID, vocab_size - 1),
        tie_word_embeddings=tied,
    )
    vision = dict(
        depth=depth,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden_size,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, depth - 1],
        initializer_range=initializer_range,
    )
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tied, **token_ids
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    return config


def _model_class(family: str):
    import transformers

    names = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
    }
    if family not in names:
        raise ValueError(f"unknown family {family!r}; known: {sorted(names)}")
    return getattr(transformers, names[family])


def tiny_hf_model(family: str = "qwen2_5_vl", *, tied: bool = False, seed: int = 0, **kwargs):
    """A random transformers model (fp32, eval mode) built from `tiny_hf_config`."""
    import torch

    config = tiny_hf_config(family, tied=tied, **kwargs)
    torch.manual_seed(seed)
    model = _model_class(family)(config).eval()
    return model


def preset_hf_config(
    name: str, *, num_layers: int | None = None, vision_depth: int | None = None
) -> Any:
    """A transformers config with the shapes of a published model (models/presets.py);
    `num_layers` / `vision_depth` keep only that many decoder layers / vision blocks."""
    import transformers

    from maye_jax.models.presets import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    family = preset["family"]
    config_class = {
        "qwen2_vl": "Qwen2VLConfig",
        "qwen2_5_vl": "Qwen2_5_VLConfig",
        "qwen3_vl": "Qwen3VLConfig",
    }[family]
    text = dict(preset["text"])
    vision = dict(preset["vision"])
    if num_layers is not None:
        text["num_hidden_layers"] = num_layers
    if vision_depth is not None:
        vision["depth"] = vision_depth
    config = getattr(transformers, config_class)(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=preset["tie_word_embeddings"],
        **QWEN_TOKEN_IDS,
    )
    config.text_config.tie_word_embeddings = preset["tie_word_embeddings"]
    config.architectures = [_model_class(family).__name__]
    return config
