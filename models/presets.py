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


PRESETS: dict[str, dict] = {
    "qwen2_vl_7b": dict(
        family="qwen2_vl",
        tie_word_embeddings=False,
        text=_QWEN2_TEXT_7B,
        vision=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=3584,
            mlp_ratio=4,
            num_heads=16,
            hidden_act="quick_gelu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
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
}
