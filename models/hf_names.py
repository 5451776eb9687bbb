"""HF tensor names: every spelling transformers and older exports use, mapped to one.

Imports nothing but the standard library: the torch-side rollout worker (no JAX in its
environment) and `hf_mapping` (JAX) share it.
"""

from __future__ import annotations


def normalize_hf_name(name: str) -> str:
    """Maps any accepted HF spelling of a tensor name to the hub file layout
    (`model.layers.N...`, `model.embed_tokens`, `model.norm`, `lm_head`, `visual...`)."""
    if name.startswith("model.language_model."):  # transformers 5 in memory
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):  # transformers 5 in memory
        return name[len("model.") :]
    if name.startswith("language_model.model."):  # some older exports
        return "model." + name[len("language_model.model.") :]
    return name


def hub_name(name: str, family: str) -> str:
    """A normalised name (`normalize_hf_name`) in the layout of `family`'s hub checkpoints, which
    is what an exported folder holds and what a torch-side engine loads. Qwen2-VL / Qwen2.5-VL
    files use the normalised names themselves; Qwen3-VL files keep transformers 5's
    `model.visual.*` / `model.language_model.*` (transformers has no rename rule for them)."""
    if family != "qwen3_vl":
        return name
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name
