"""Published Qwen-VL shapes (the fields of each model's config.json that set tensor shapes).

Used to build real-size models abstractly (parameter counts, sharding plans, memory estimates)
and with random weights for benchmarks; the real weights come from a user's model directory.
"""

from __future__ import annotations

_QWEN2_TEXT_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)


def _qwen2_vision(out_hidden_size: int) -> dict:
    """Qwen2-VL's vision tower (the same at every size); `out_hidden_size`: the LLM's width."""
    return dict(
        depth=32,
        embed_dim=1280,
        hidden_size=out_hidden_size,
        mlp_ratio=4,
        num_heads=16,
        hidden_act="quick_gelu",
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )


def _qwen2_5_vision(out_hidden_size: int) -> dict:
    """The Qwen2.5-VL vision tower (the same at 3B and 7B but for the merger's output width)."""
    return dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=out_hidden_size,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        hidden_act="silu",
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )


def _qwen3_text(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    """The Qwen3-VL text model (every size: vocab 151936, head_dim 128, 8 KV heads, interleaved
    M-RoPE [24, 20, 20] at theta 5e6, 262144 positions)."""
    return dict(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    )


def _qwen3_vision(small: bool, out_hidden_size: int) -> dict:
    """The Qwen3-VL vision tower: 1024 x 24 blocks at 2B/4B, 1152 x 27 at 8B/32B."""
    return dict(
        depth=24 if small else 27,
        hidden_size=1024 if small else 1152,
        intermediate_size=4096 if small else 4304,
        num_heads=16,
        out_hidden_size=out_hidden_size,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[5, 11, 17] if small else [8, 16, 24],
        hidden_act="gelu_pytorch_tanh",
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )


def _qwen3_vl(hidden: int, layers: int, heads: int, intermediate: int, small: bool) -> dict:
    return dict(
        family="qwen3_vl",
        tie_word_embeddings=small,  # tied at 2B and 4B only
        text=_qwen3_text(hidden, layers, heads, intermediate),
        vision=_qwen3_vision(small, out_hidden_size=hidden),
    )


PRESETS: dict[str, dict] = {
    "qwen2_vl_2b": dict(
        family="qwen2_vl",
        tie_word_embeddings=True,
        text=dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
        ),
        vision=_qwen2_vision(out_hidden_size=1536),
    ),
    "qwen2_vl_7b": dict(
        family="qwen2_vl",
        tie_word_embeddings=False,
        text=_QWEN2_TEXT_7B,
        vision=_qwen2_vision(out_hidden_size=3584),
    ),
    "qwen2_5_vl_7b": dict(
        family="qwen2_5_vl",
        tie_word_embeddings=False,
        text=_QWEN2_TEXT_7B,
        vision=_qwen2_5_vision(out_hidden_size=3584),
    ),
    "qwen2_5_vl_3b": dict(
        family="qwen2_5_vl",
        tie_word_embeddings=True,
        text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
        ),
        vision=_qwen2_5_vision(out_hidden_size=2048),
    ),
    "qwen3_vl_2b": _qwen3_vl(2048, 28, 16, 6144, small=True),
    "qwen3_vl_4b": _qwen3_vl(2560, 36, 32, 9728, small=True),
    "qwen3_vl_8b": _qwen3_vl(4096, 36, 32, 12288, small=False),
    "qwen3_vl_32b": _qwen3_vl(5120, 64, 64, 25600, small=False),
}
