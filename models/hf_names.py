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
