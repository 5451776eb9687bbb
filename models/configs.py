"""Model configuration: the few numbers that define a Qwen2-VL / Qwen2.5-VL network.

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
SUPPORTED_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": FAMILY_QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": FAMILY_QWEN2_5_VL,
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


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

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Builds the config from a transformers Qwen2VLConfig / Qwen2_5_VLConfig."""
        family = _family_of(hf_config)
        text = hf_config.text_config
        vision = hf_config.vision_config
        rope = dict(getattr(text, "rope_parameters", None) or {})
        legacy_rope = getattr(text, "rope_scaling", None) or {}
        mrope_section = rope.get("mrope_section") or legacy_rope.get("mrope_section")
        if mrope_section is None or len(mrope_section) != 3:
            raise ValueError(f"text_config: expected a 3-part mrope_section, got {mrope_section!r}")
        rope_theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
        if rope_theta is None:
            raise ValueError("text_config: rope_theta is missing")
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
        )
        if sum(text_cfg.mrope_section) * 2 != text_cfg.head_dim:
            raise ValueError(
                f"text_config: mrope_section {text_cfg.mrope_section} must sum to head_dim/2 "
                f"= {text_cfg.head_dim // 2}"
            )
        vision_rope = dict(getattr(vision, "rope_parameters", None) or {})
        if family == FAMILY_QWEN2_VL:
            vision_cfg = VisionConfig(
                depth=int(vision.depth),
                embed_dim=int(vision.embed_dim),
                num_heads=int(vision.num_heads),
                mlp_hidden_dim=int(vision.embed_dim * vision.mlp_ratio),
                out_dim=int(vision.hidden_size),
                hidden_act=str(vision.hidden_act),
                patch_size=int(vision.patch_size),
                temporal_patch_size=int(vision.temporal_patch_size),
                in_channels=int(getattr(vision, "in_channels", getattr(vision, "in_chans", 3))),
                spatial_merge_size=int(vision.spatial_merge_size),
                rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
            )
        else:
            vision_cfg = VisionConfig(
                depth=int(vision.depth),
                embed_dim=int(vision.hidden_size),
                num_heads=int(vision.num_heads),
                mlp_hidden_dim=int(vision.intermediate_size),
                out_dim=int(vision.out_hidden_size),
                hidden_act=str(vision.hidden_act),
                patch_size=int(vision.patch_size),
                temporal_patch_size=int(vision.temporal_patch_size),
                in_channels=int(getattr(vision, "in_channels", getattr(vision, "in_chans", 3))),
                spatial_merge_size=int(vision.spatial_merge_size),
                rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
                window_size=int(vision.window_size),
                fullatt_block_indexes=tuple(int(i) for i in vision.fullatt_block_indexes),
            )
        if vision_cfg.out_dim != text_cfg.hidden_size:
            raise ValueError(
                f"vision_config: merger output {vision_cfg.out_dim} != text hidden size "
                f"{text_cfg.hidden_size}"
            )
        tie = getattr(hf_config, "tie_word_embeddings", None)
        if tie is None:
            tie = getattr(text, "tie_word_embeddings", False)
        return cls(
            family=family,
            text=text_cfg,
            vision=vision_cfg,
            tie_word_embeddings=bool(tie),
            image_token_id=int(hf_config.image_token_id),
            video_token_id=int(hf_config.video_token_id),
            vision_start_token_id=int(hf_config.vision_start_token_id),
            vision_end_token_id=int(getattr(hf_config, "vision_end_token_id", VISION_END_ID)),
        )


def _family_of(hf_config: Any) -> str:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    model_type = getattr(hf_config, "model_type", None)
    if model_type in (FAMILY_QWEN2_VL, FAMILY_QWEN2_5_VL):
        return model_type
    raise ValueError(
        f"unsupported architecture {architectures or model_type!r}: maye-jax supports "
        f"{sorted(SUPPORTED_ARCHITECTURES)}"
    )
