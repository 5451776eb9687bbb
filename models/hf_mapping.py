"""Names and layouts between Hugging Face checkpoints and our Flax parameters.

HF names are normalised to the Qwen2-VL hub file layout (`model.layers.N...`,
`model.embed_tokens`, `model.norm`, `lm_head`, `visual...`); transformers 5's in-memory names
(`model.language_model.*`, `model.visual.*`, also Qwen3-VL's hub layout) are accepted too. What
leaves the trainer (an export, a weight sync) is in the family's hub layout (`hf_names.hub_name`).
Layout rules:
- torch Linear `weight` [out, in] <-> our `kernel` [in, out] (transpose);
- the patch Conv3d weight [C, 3, 2, 14, 14] <-> `visual.patch_embed.kernel` [1176, C];
- norms, biases, the embedding and lm_head keep their layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Iterator

import jax
import numpy as np
from einops import rearrange
from flax import nnx

from maye_jax.models import layers
from maye_jax.models.hf_names import hub_name, normalize_hf_name

# Our module names that differ from HF's (HF name -> ours), applied to dotted names.
_RENAMES = (
    ("visual.merger.mlp.0.", "visual.merger.fc1."),
    ("visual.merger.mlp.2.", "visual.merger.fc2."),
    ("visual.patch_embed.proj.weight", "visual.patch_embed.weight"),
    ("visual.patch_embed.proj.bias", "visual.patch_embed.bias"),  # Qwen3-VL
)


def flax_param_paths(model: nnx.Module) -> dict[str, tuple]:
    """Dotted name -> nnx path tuple, for every Param of the model (real or abstract)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(str(p) for p in path): tuple(path) for path, _ in flat}


def hf_name_for(flax_name: str, family: str | None = None) -> str:
    """Our dotted parameter name -> the normalised HF tensor name, or with `family` the name in
    that family's hub checkpoints."""
    if family is not None:
        return hub_name(hf_name_for(flax_name), family)
    if flax_name == "lm_head":
        return "lm_head.weight"
    name = flax_name
    if name.startswith("language_model."):
        name = "model." + name[len("language_model.") :]
    for hf_part, ours in _RENAMES:
        name = name.replace(ours, hf_part)
    if name.endswith(".kernel"):
        name = name[: -len(".kernel")] + ".weight"
    if name == "visual.patch_embed.weight":
        name = "visual.patch_embed.proj.weight"
    return name


def to_hf_layout(flax_name: str, value: np.ndarray) -> np.ndarray:
    """Our array -> HF layout (a view where possible)."""
    if flax_name == "visual.patch_embed.kernel":
        patch_dim, _ = value.shape
        temporal = 2
        side = int(round((patch_dim / (3 * temporal)) ** 0.5))
        # the Conv3d weight [out, in_channels, time, height, width] of the patch embedding
        return rearrange(value, "(rgb t h w) c -> c rgb t h w", rgb=3, t=temporal, h=side, w=side)
    if flax_name.endswith(".kernel"):
        return value.T
    return value


def from_hf_layout(flax_name: str, value: np.ndarray) -> np.ndarray:
    """HF array -> our layout."""
    if flax_name == "visual.patch_embed.kernel":
        return rearrange(value, "c rgb t h w -> (rgb t h w) c")
    if flax_name.endswith(".kernel"):
        return value.T
    return value


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: names the missing, unexpected or misshapen tensors."""


def load_hf_tensors(
    model: nnx.Module,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
    source: str = "checkpoint",
) -> nnx.Module:
    """Fills `model` (real or abstract, from build_model) with HF tensors, one at a time.

    `tensors` yields (hf_name, array) lazily, so at most one full tensor is on the host at once;
    `place(flax_name, array)` puts it on devices (default: `jax.numpy.asarray` in the param
    dtype). Raises CheckpointMismatchError naming every missing, unexpected or misshapen tensor.
    """
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    by_hf_name = {}
    for path, variable in flat.items():
        flax_name = ".".join(str(p) for p in path)
        if isinstance(variable, nnx.Param) or getattr(variable, "type", None) is nnx.Param:
            by_hf_name[hf_name_for(flax_name)] = (flax_name, path)
    tied = getattr(model, "lm_head", "absent") is None
    loaded: set[str] = set()
    unexpected, misshapen = [], []
    for raw_name, array in tensors:
        hf_name = normalize_hf_name(raw_name)
        if hf_name not in by_hf_name:
            if not (tied and hf_name == "lm_head.weight"):  # tied checkpoints may still carry it
                unexpected.append(raw_name)
            continue
        flax_name, path = by_hf_name[hf_name]
        target = flat[path]
        value = from_hf_layout(flax_name, np.asarray(array))
        if tuple(value.shape) != tuple(target.get_value().shape):
            misshapen.append(
                f"{raw_name}: checkpoint {tuple(np.shape(array))}, model expects "
                f"{tuple(to_hf_layout(flax_name, np.zeros(target.get_value().shape, np.int8)).shape)}"
            )
            continue
        dtype = target.get_value().dtype
        placed = place(flax_name, value) if place else jax.numpy.asarray(value, dtype=dtype)
        flat[path] = _with_value(target, placed)
        loaded.add(hf_name)
    missing = sorted(set(by_hf_name) - loaded)
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(
                f"unexpected tensors: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            )
        if misshapen:
            parts.append("shape mismatches: " + "; ".join(misshapen[:20]))
        raise CheckpointMismatchError(f"{source}: " + " | ".join(parts))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _with_value(variable, value):
    return variable.replace(value)


@functools.cache
def logical_shapes(config) -> dict[str, tuple[int, ...]]:
    """{flax_name: the model's shape} of every parameter of a model of `config` (a trainer's
    copy may be stored padded: `sharding/rules.storage_shape`)."""
    from maye_jax.models.qwen_vl import build_model

    state = nnx.state(build_model(config, abstract=True), nnx.Param)
    return {
        ".".join(str(p) for p in path): tuple(v.get_value().shape)
        for path, v in nnx.to_flat_state(state)
    }


def unpadded(model: nnx.Module, flax_name: str, value):
    """`value` (host or device array) of parameter `flax_name` at the model's shape."""
    return layers.logical(value, logical_shapes(model.config)[flax_name])


def iter_hf_tensors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hub name, numpy array in HF layout) for every parameter, one at a time."""
    state = nnx.state(model, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        flax_name = ".".join(str(p) for p in path)
        value = unpadded(model, flax_name, np.asarray(jax.device_get(variable.get_value())))
        yield hf_name_for(flax_name, model.config.family), to_hf_layout(flax_name, value)


def named_params(model: nnx.Module, flax_names: Collection[str]) -> dict[str, jax.Array]:
    """{flax_name: array at the model's shape} of the named parameters; a KeyError names any
    that do not exist."""
    values = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        if name in flax_names:
            values[name] = unpadded(model, name, variable.get_value())
    unknown = sorted(set(flax_names) - set(values))
    if unknown:
        raise KeyError(f"no parameters named {unknown[:10]}")
    return values


@functools.partial(jax.jit, static_argnames=("dtype", "family"))
def hf_layout_on_device(
    values: dict[str, jax.Array], dtype: str | None = None, family: str | None = None
):
    """{flax_name: array} -> {hf_name (`family`'s hub name): array in HF layout, cast to
    `dtype`}, computed where the arrays live (one jitted call: new arrays, at device
    bandwidth)."""
    return {
        hf_name_for(name, family): to_hf_layout(name, value).astype(dtype or value.dtype)
        for name, value in values.items()
    }


def _dtype_name(dtype) -> str | None:
    """A hashable static argument for the jitted layout: "bfloat16", "float32", or None."""
    return None if dtype is None else np.dtype(dtype).name


def hf_views_on_host(
    values: dict[str, jax.Array], family: str | None = None
) -> dict[str, np.ndarray]:
    """{flax_name: array} -> {hf_name (`family`'s hub name): host array in HF layout}, in the
    arrays' own dtype: each fetched to the host (no copy for a single-device CPU array),
    kernels as transposed views, so the one copy that happens (into the shared-memory segment)
    transposes."""
    return {
        hf_name_for(name, family): to_hf_layout(name, np.asarray(v)) for name, v in values.items()
    }


def device_hf_tensors(
    model: nnx.Module, flax_names: Collection[str], dtype=None
) -> dict[str, jax.Array]:
    """The named parameters in hub names and HF layout, cast to `dtype`, made on their devices
    (`hf_layout_on_device`). Nothing is fetched to the host here; `WeightSegment.write`
    fetches each array while the next ones transfer."""
    return hf_layout_on_device(
        named_params(model, flax_names), _dtype_name(dtype), model.config.family
    )


def hf_tensors_for_sync(
    model: nnx.Module, flax_names: Collection[str], dtype=None
) -> dict[str, jax.Array | np.ndarray]:
    """What a weight sync sends, {hf_name: array in HF layout}. On an accelerator,
    `device_hf_tensors` (transpose and cast at device bandwidth; half the bytes over the host
    link when the worker computes in bf16). On the CPU backend, `hf_views_on_host` in the
    parameters' own dtype (the worker casts on load): XLA's CPU transpose + cast alone costs
    more than the segment's transposing copy (benchmarks/trainer_sync.py)."""
    values = named_params(model, flax_names)
    family = model.config.family
    if {device.platform for v in values.values() for device in v.devices()} - {"cpu"}:
        return hf_layout_on_device(values, _dtype_name(dtype), family)
    return hf_views_on_host(values, family)


def parameter_count(model: nnx.Module) -> int:
    """Number of scalars in the model's parameters (works on abstract models)."""
    state = nnx.state(model, nnx.Param)
    return int(sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(state)))
