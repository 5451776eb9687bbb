"""The text decoder's layers as one `lax.scan` over stacked weights, for the sharded update.

`models/qwen_vl.TextDecoder` runs its layers in a Python loop. Under FSDP that loop unrolls into
one program in which XLA may keep every layer's all-gathered weights and full-size gradients
alive at once (on the 7B CPU compile, ~3 GiB per layer per device). Scanning one layer body
over weights stacked along a new leading axis bounds that to a single layer: each iteration
gathers its layer, and its gradient is reduced back to shards before the next one.

Numerically the same computation as `TextDecoder.__call__` without a KV cache (rotary tables,
the layers in order with any DeepStack levels, the final norm); the equality is tested in
tests/maye_jax/training/test_update.py.
It works on the flat parameter dict of the update (`{"language_model.layers.<i>.<...>": array}`),
so the update step chooses it (`UpdateConfig.scan_layers`, the default) without changing the
module tree that checkpoints, HF conversion and the sampler share.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maye_jax.models.layers import REMAT_POLICIES
from maye_jax.models.qwen_vl import causal_padding_mask

LAYER_PREFIX = "language_model.layers."


def stack_layers(
    params: Mapping[str, jax.Array],
    shardings: Mapping[str, NamedSharding] | None = None,
) -> dict[str, jax.Array]:
    """`{"self_attn.q_proj.kernel": [num_layers, ...], ...}` from the per-layer parameters
    `language_model.layers.<i>.<name>`; with `shardings` (per-layer names), each stack keeps
    its layer's PartitionSpec with the new layer axis unsplit."""
    by_name: dict[str, dict[int, jax.Array]] = {}
    for full_name, value in params.items():
        if full_name.startswith(LAYER_PREFIX):
            index, name = full_name[len(LAYER_PREFIX) :].split(".", 1)
            by_name.setdefault(name, {})[int(index)] = value
    stacked = {
        name: jnp.stack([layers[i] for i in range(len(layers))]) for name, layers in by_name.items()
    }
    if shardings is None:
        return stacked
    for name, value in stacked.items():
        layer_sharding = shardings[f"{LAYER_PREFIX}0.{name}"]
        spec = PartitionSpec(None, *layer_sharding.spec)
        stacked[name] = jax.lax.with_sharding_constraint(
            value, NamedSharding(layer_sharding.mesh, spec)
        )
    return stacked


def scanned_decoder(
    model: nnx.Module,
    stacked: Mapping[str, jax.Array],
    embeds: jax.Array,  # [B, L, D]
    positions: jax.Array,  # [3, B, L]
    attention_mask: jax.Array,  # [B, L]
    deepstack: jax.Array | None = None,  # [K, B, L, D], zero on text tokens
) -> jax.Array:  # final-normed hidden states [B, L, D]
    """`model.language_model(embeds, positions, mask, deepstack=deepstack)` with the layers
    scanned (remat per layer, with the model's remat policy, when it was built with `remat`).

    Qwen3-VL's DeepStack levels are added inside the scan: layer i adds level i while i < K
    (the levels are closed over, not carried per iteration). Unrolling the first K layers before
    the scan instead was 1.03-1.05x slower per update on the CPU, slower to compile, and held
    9.9 GiB more temporaries in the 8B update over 7 devices (benchmarks/RESULTS.md)."""
    text = model.language_model
    cos, sin = text.rotary_tables(positions)
    mask = causal_padding_mask(attention_mask)
    layer_def = nnx.graphdef(text.layers[0])
    layer_paths = {
        ".".join(str(k) for k in path): tuple(path)
        for path, _ in nnx.to_flat_state(nnx.state(text.layers[0]))
    }
    levels = 0 if deepstack is None else deepstack.shape[0]

    def one_layer(hidden, layer):
        index, layer_params = layer
        state = nnx.from_flat_state({layer_paths[n]: v for n, v in layer_params.items()})
        hidden, _ = nnx.merge(layer_def, state)(hidden, cos, sin, mask)
        if levels:  # layer `index` adds DeepStack level `index` while there is one
            level = deepstack[jnp.minimum(index, levels - 1)].astype(hidden.dtype)
            hidden = jnp.where(index < levels, hidden + level, hidden)
        return hidden, None

    if text.remat:  # scan already prevents CSE
        one_layer = jax.checkpoint(one_layer, prevent_cse=False, policy=REMAT_POLICIES[text.remat])
    num_layers = next(iter(stacked.values())).shape[0]
    hidden, _ = jax.lax.scan(one_layer, embeds, (jnp.arange(num_layers), dict(stacked)))
    return text.norm(hidden)
