"""What the rollout worker's backends share: names, dtypes and the end of a sampled row.

Imports no JAX (the worker runs in a torch-only environment); torch is imported where used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np

from maye_jax.models.hf_names import normalize_hf_name
from maye_jax.rollout.engine import Sampling


def log(message: str) -> None:
    print(f"[maye-worker {os.getpid()}] {message}", file=sys.stderr, flush=True)


def is_norm_weight(name: str) -> bool:
    """A decoder norm's weight (probed after a sync), by its normalised name."""
    name = normalize_hf_name(name)
    return not name.startswith("visual.") and (
        name.endswith("layernorm.weight") or name == "model.norm.weight"
    )


def torch_view(array: np.ndarray, safetensors_dtype: str):
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if safetensors_dtype == "BF16" else tensor


def decode_texts(tokenizer, token_lists: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(list(tokens), skip_special_tokens=True) for tokens in token_lists]


def finish(tokens: list[int], logprobs: list[float], sampling: Sampling) -> tuple[list, list, str]:
    """Cuts a sampled row at its first stop token (kept) or at max_tokens."""
    stops = set(sampling.stop_token_ids)
    for index, token in enumerate(tokens[: sampling.max_tokens]):
        if token in stops:
            return tokens[: index + 1], logprobs[: index + 1], "stop"
    return tokens[: sampling.max_tokens], logprobs[: sampling.max_tokens], "length"
