"""Model configuration: the few numbers that define a Qwen2-VL / Qwen2.5-VL / Qwen3-VL network.

`ModelConfig.from_hf(hf_config)` reads a `transformers` config object (or anything with the
same attributes, e.g. one parsed from a model directory's `config.json` by `AutoConfig`), so
this module itself needs neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maye_jax.qwen_ids import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID

FAMILY_QWEN2_VL = "qwen2_vl"
FAMILY_QWEN2_5_VL = "qwen2_5_vl"
FAMILY_QWEN3_VL = "qwen3_vl"  # the dense models (2B/4B/8B/32B)
FAMILIES = (FAMILY_QWEN2_VL, FAMILY_QWEN2_5_VL, FAMILY_QWEN3_VL)
SUPPORTED_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": FAMILY_QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": FAMILY_QWEN2_5_VL,
    "Qwen3VLForConditionalGeneration": FAMILY_QWEN3_VL,
}
# Families people ask for that are refused by name (architecture or model_type -> what it is).
UNSUPPORTED_FAMILIES = {
    "Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe (Qwen3-VL MoE)",
    "qwen3_vl_moe": "qwen3_vl_moe (Qwen3-VL MoE)",
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int  # width of the vision blocks (Qwen2-VL `embed_dim`, Qwen2.5-VL `hidden_size`)
    num_heads: int
    mlp_hidden_dim: int  # Qwen2-VL: embed_dim * mlp_ratio; Qwen2.5-VL: intermediate_size
    out_dim: int  # merger output width == text hidden size
    hidden_act: str  # "quick_gelu" (Qwen2-VL) or "silu" (Qwen2.5-VL)
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    window_size: int | None = None  # Qwen2.5-VL window attention (in pixels); None: full only
    fullatt_block_indexes: tuple[int, ...] = ()
    # Qwen3-VL: a learned (side x side) position table added after the patch embedding (0: none)
    num_position_embeddings: int = 0
    # Qwen3-VL DeepStack: the blocks whose outputs also feed the LLM (after its layers 0, 1, ...)
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch: channels x temporal x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    hidden_act: str = "silu"
    explicit_head_dim: int | None = None  # Qwen3: 128 whatever hidden / heads is
    attention_bias: bool = True  # q/k/v biases (Qwen2); Qwen3 has none
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before the rotation
    mrope_interleaved: bool = False  # Qwen3: t/h/w frequencies interleaved, not in chunks

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # FAMILY_QWEN2_VL | FAMILY_QWEN2_5_VL
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
    image_token_id: int = IMAGE_PAD_ID
    video_token_id: int = VIDEO_PAD_ID
    vision_start_token_id: int = VISION_START_ID
    vision_end_token_id: int = VISION_END_ID

    @property
    def architecture(self) -> str:
        return {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.family]

    @property
    def num_deepstack_levels(self) -> int:
        """Vision features per image token beyond the main one (Qwen3-VL DeepStack; else 0)."""
        return len(self.vision.deepstack_visual_indexes)

    @property
    def image_feature_width(self) -> int:
        """Width of one image token's features: the main one and each DeepStack level's."""
        return (1 + self.num_deepstack_levels) * self.text.hidden_size

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Builds the config from a transformers Qwen2VLConfig / Qwen2_5_VLConfig / Qwen3VLConfig
        (transformers 5 names, or the 4.57 ones hub files still carry: `rope_scaling`,
        `rope_theta`, a text-level `tie_word_embeddings`)."""
        family = _family_of(hf_config)
        text = hf_config.text_config
        vision = hf_config.vision_config
        rope = dict(getattr(text, "rope_scaling", None) or {})
        rope.update(getattr(text, "rope_parameters", None) or {})
        mrope_section = rope.get("mrope_section")
        if mrope_section is None or len(mrope_section) != 3:
            raise ValueError(f"text_config: expected a 3-part mrope_section, got {mrope_section!r}")
        rope_theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
        if rope_theta is None:
            raise ValueError("text_config: rope_theta is missing")
        qwen3 = family == FAMILY_QWEN3_VL
        text_cfg = TextConfig(
            vocab_size=int(text.vocab_size),
            hidden_size=int(text.hidden_size),
            intermediate_size=int(text.intermediate_size),
            num_layers=int(text.num_hidden_layers),
            num_heads=int(text.num_attention_heads),
            num_kv_heads=int(text.num_key_value_heads),
            rms_norm_eps=float(text.rms_norm_eps),
            rope_theta=float(rope_theta),
            mrope_section=tuple(int(s) for s in mrope_section),
            hidden_act=str(text.hidden_act),
            explicit_head_dim=int(text.head_dim) if qwen3 else None,
            attention_bias=bool(getattr(text, "attention_bias", False)) if qwen3 else True,
            qk_norm=qwen3,
            mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
        )
        if text_cfg.num_heads % text_cfg.num_kv_heads:
            raise ValueError(
                f"text_config: num_attention_heads {text_cfg.num_heads} is not a multiple of "
                f"num_key_value_heads {text_cfg.num_kv_heads}"
            )
        if sum(text_cfg.mrope_section) * 2 != text_cfg.head_dim:
            raise ValueError(
                f"text_config: mrope_section {text_cfg.mrope_section} must sum to head_dim/2 "
                f"= {text_cfg.head_dim // 2}"
            )
        vision_rope = dict(getattr(vision, "rope_parameters", None) or {})
        common = dict(
            depth=int(vision.depth),
            num_heads=int(vision.num_heads),
            hidden_act=str(vision.hidden_act),
            patch_size=int(vision.patch_size),
            temporal_patch_size=int(vision.temporal_patch_size),
            in_channels=int(getattr(vision, "in_channels", getattr(vision, "in_chans", 3))),
            spatial_merge_size=int(vision.spatial_merge_size),
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
        )
        if family == FAMILY_QWEN2_VL:
            vision_cfg = VisionConfig(
                embed_dim=int(vision.embed_dim),
                mlp_hidden_dim=int(vision.embed_dim * vision.mlp_ratio),
                out_dim=int(vision.hidden_size),
                **common,
            )
        elif family == FAMILY_QWEN2_5_VL:
            vision_cfg = VisionConfig(
                embed_dim=int(vision.hidden_size),
                mlp_hidden_dim=int(vision.intermediate_size),
                out_dim=int(vision.out_hidden_size),
                window_size=int(vision.window_size),
                fullatt_block_indexes=tuple(int(i) for i in vision.fullatt_block_indexes),
                **common,
            )
        else:
            vision_cfg = VisionConfig(
                embed_dim=int(vision.hidden_size),
                mlp_hidden_dim=int(vision.intermediate_size),
                out_dim=int(vision.out_hidden_size),
                num_position_embeddings=int(vision.num_position_embeddings),
                deepstack_visual_indexes=tuple(int(i) for i in vision.deepstack_visual_indexes),
                **common,
            )
            _check_qwen3_vision(vision_cfg, text_cfg)
        if vision_cfg.out_dim != text_cfg.hidden_size:
            raise ValueError(
                f"vision_config: merger output {vision_cfg.out_dim} != text hidden size "
                f"{text_cfg.hidden_size}"
            )
        # transformers 5 reads the top-level flag, 4.57 the text-level one; hub files of tied
        # models (Qwen3-VL 2B/4B) may set only the latter, and carry no lm_head either way.
        tie = bool(getattr(hf_config, "tie_word_embeddings", False)) or bool(
            getattr(text, "tie_word_embeddings", False)
        )
        return cls(
            family=family,
            text=text_cfg,
            vision=vision_cfg,
            tie_word_embeddings=tie,
            image_token_id=int(hf_config.image_token_id),
            video_token_id=int(hf_config.video_token_id),
            vision_start_token_id=int(hf_config.vision_start_token_id),
            vision_end_token_id=int(getattr(hf_config, "vision_end_token_id", VISION_END_ID)),
        )


def _check_qwen3_vision(vision: VisionConfig, text: TextConfig) -> None:
    """Qwen3-VL settings the model cannot run with, refused in one line each."""
    indexes = vision.deepstack_visual_indexes
    if any(i < 0 or i >= vision.depth for i in indexes):
        raise ValueError(
            f"vision_config.deepstack_visual_indexes {list(indexes)}: every index must name a "
            f"vision block, 0 .. {vision.depth - 1} (depth {vision.depth})"
        )
    if list(indexes) != sorted(set(indexes)):
        raise ValueError(
            f"vision_config.deepstack_visual_indexes {list(indexes)}: must be strictly increasing"
        )
    if len(indexes) > text.num_layers:
        raise ValueError(
            f"vision_config.deepstack_visual_indexes {list(indexes)}: {len(indexes)} DeepStack "
            f"levels need as many decoder layers, the text model has {text.num_layers}"
        )
    side = round(vision.num_position_embeddings**0.5)
    if vision.num_position_embeddings < 1 or side * side != vision.num_position_embeddings:
        raise ValueError(
            f"vision_config.num_position_embeddings {vision.num_position_embeddings}: must be a "
            "square (side x side position table)"
        )


def _family_of(hf_config: Any) -> str:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    for name in [*architectures, model_type]:
        if name in UNSUPPORTED_FAMILIES:
            raise ValueError(
                f"unsupported model family {UNSUPPORTED_FAMILIES[name]}: maye-jax supports "
                f"{', '.join(FAMILIES)} (Qwen3-VL dense only)"
            )
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if model_type in FAMILIES:
        return model_type
    raise ValueError(
        f"unsupported architecture {architectures or model_type!r}: maye-jax supports "
        f"{sorted(SUPPORTED_ARCHITECTURES)}"
    )
