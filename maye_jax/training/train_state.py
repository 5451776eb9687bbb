"""The policy's training state: trainable vs frozen parameters, sharded layout, reference model.

Parameters live in flat dicts `{dotted name: array}` (names as in `models/hf_mapping.py`, e.g.
`language_model.layers.3.mlp.up_proj.kernel`, `lm_head`, `visual.merger.fc1.kernel`):

- `TrainState` (donated to every update): the trainable parameters in fp32 (master weights),
  the optax state (AdamW `mu`/`nu` in fp32, sharded exactly like the parameters) and the number
  of updates applied. Frozen parameters are not in it: no gradient, no optimizer state.
- `frozen`: the frozen parameters (by default the vision tower and its merger), stored in bf16,
  never donated and never written. Because they are immutable arrays, the policy, the reference
  model and the image-feature computation all use the same `frozen` arrays.
- the reference model: its own bf16 copy of the trainable parameters (taken at start-up; the
  policy's arrays are donated and overwritten by every update, so sharing them is impossible)
  plus the shared `frozen` arrays.

Sharding is data (`sharding/rules.py`): parameters, gradients and both AdamW moments get the
same PartitionSpec per name, and start-up fails when too much of the trainable state would be
replicated on every device. A parameter none of whose dimensions the mesh divides is stored
padded with zeros (`rules.storage_shape`), in the state, its moments, `frozen` and the
reference alike; the model cuts the padding off where it uses the parameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from maye_jax.sharding.layout import Layout, plan_state_layout
from maye_jax.sharding.rules import DEFAULT_RULES, spec_for, storage_shape

Params = dict[str, jax.Array]
EMBEDDING_PREFIXES = ("language_model.embed_tokens.", "lm_head")


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """Which parts of the model train (the original MAYE's flags).

    train_vit: the vision transformer (`visual.*` except the merger);
    train_connector: the patch merger that maps image features to the text width
    (`visual.merger.*`); train_llm: the text decoder, its embeddings and `lm_head`;
    train_embeddings (with train_llm): the token embeddings and `lm_head` too. Freezing them
    keeps Adam from moving every one of the ~152k vocabulary rows by about the learning rate on
    gradients that are almost pure noise (each row's softmax share of a few sampled tokens),
    which is what broke RL on the tiny CPU demo model.
    """

    train_vit: bool = False
    train_connector: bool = False
    train_llm: bool = True
    train_embeddings: bool = True

    def is_trainable(self, name: str) -> bool:
        if name.startswith("visual.merger."):
            return self.train_connector
        if name.startswith("visual."):
            return self.train_vit
        if name.startswith(EMBEDDING_PREFIXES):
            return self.train_llm and self.train_embeddings
        return self.train_llm

    @property
    def trains_vision(self) -> bool:
        """True when the vision tower must run inside the update (its output changes)."""
        return self.train_vit or self.train_connector


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static half of a split model: its graph and where each named parameter goes."""

    graphdef: Any
    paths: Mapping[str, tuple]  # dotted name -> nnx path
    compute_dtype: Any  # the dtype the model computes in (its modules' `dtype`)

    def merge(self, *param_dicts: Mapping[str, jax.Array]) -> nnx.Module:
        """A model from flat parameter dicts that together name every parameter."""
        flat = {self.paths[name]: value for params in param_dicts for name, value in params.items()}
        if len(flat) != len(self.paths):
            missing = sorted(set(self.paths) - {n for p in param_dicts for n in p})
            raise ValueError(f"parameters missing to build the model: {missing[:10]}")
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))


def split_model(model: nnx.Module, trainable: TrainableConfig) -> tuple[ModelDef, Params, Params]:
    """(definition, trainable parameters, frozen parameters) of a real or abstract model."""
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    non_params = [path for path, v in flat if not isinstance(v, nnx.Param)]
    if non_params:
        raise ValueError(f"the model holds non-parameter state, unsupported here: {non_params[:5]}")
    paths = {".".join(str(k) for k in path): tuple(path) for path, _ in flat}
    values = {".".join(str(k) for k in path): v.get_value() for path, v in flat}
    model_def = ModelDef(graphdef, paths, model.dtype)
    train = {n: v for n, v in values.items() if trainable.is_trainable(n)}
    frozen = {n: v for n, v in values.items() if not trainable.is_trainable(n)}
    if not train:
        raise ValueError(f"{trainable} leaves no parameter to train")
    return model_def, train, frozen


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], number of updates applied so far
    params: Params  # trainable parameters, fp32 master weights
    opt_state: optax.OptState  # sharded like `params`


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    """Pure; jit it with `out_shardings=layout.state` to create the state sharded. The
    parameters are copied: the state is donated to every update, the model's arrays are not."""
    params = {name: jnp.array(value, jnp.float32, copy=True) for name, value in params.items()}
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


# --------------------------------------------------------------------------------------------------
# Sharded layout
# --------------------------------------------------------------------------------------------------


def storage_shapes(values: Mapping[str, Any], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, tuple]:
    """{name: the shape the trainer stores it in on `mesh`} (`rules.storage_shape`)."""
    return {n: storage_shape(n, tuple(v.shape), mesh, rules) for n, v in values.items()}


def padded(values: Mapping[str, jax.Array], shapes: Mapping[str, tuple]) -> Params:
    """Each value zero-padded at the end of its dimensions to `shapes[name]` (jit it)."""
    return {
        n: v
        if tuple(v.shape) == shapes[n]
        else jnp.pad(v, [(0, size - have) for size, have in zip(shapes[n], v.shape)])
        for n, v in values.items()
    }


def plan_layout(
    mesh: Mesh,
    params: Mapping[str, Any],
    frozen: Mapping[str, Any],
    optimizer: optax.GradientTransformation,
    *,
    frozen_dtype=jnp.bfloat16,
    rules=DEFAULT_RULES,
    max_replicated_fraction: float | None = 0.05,
) -> Layout:
    """Shardings of the train state `init_train_state(params, optimizer)` would make, of
    `params` and `frozen` stored in their `storage_shapes`, and the replication check
    (`maye_jax.sharding.layout.plan_state_layout`)."""
    params = {
        n: jax.ShapeDtypeStruct(s, jnp.float32)
        for n, s in storage_shapes(params, mesh, rules).items()
    }
    frozen = {
        n: jax.ShapeDtypeStruct(s, frozen_dtype)
        for n, s in storage_shapes(frozen, mesh, rules).items()
    }
    abstract = {n: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32) for n, v in params.items()}
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract)
    return plan_state_layout(
        mesh,
        params,
        frozen,
        abstract_state,
        frozen_dtype=frozen_dtype,
        rules=rules,
        max_replicated_fraction=max_replicated_fraction,
    )


def create_train_state(
    model: nnx.Module,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
    *,
    trainable: TrainableConfig = TrainableConfig(),  # noqa: B008 (frozen dataclass)
    frozen_dtype=jnp.bfloat16,
    rules=DEFAULT_RULES,
    max_replicated_fraction: float | None = 0.05,
) -> tuple[ModelDef, TrainState, Params, Layout]:
    """Splits a (preferably already sharded, see `load_sharded_model`) model into the sharded
    train state and the frozen parameters. Returns (model_def, state, frozen, layout)."""
    model_def, params, frozen = split_model(model, trainable)
    layout = plan_layout(
        mesh,
        params,
        frozen,
        optimizer,
        frozen_dtype=frozen_dtype,
        rules=rules,
        max_replicated_fraction=max_replicated_fraction,
    )
    shapes = storage_shapes({**params, **frozen}, mesh, rules)
    state = jax.jit(
        lambda p: init_train_state(padded(p, shapes), optimizer), out_shardings=layout.state
    )(params)
    frozen = jax.jit(
        lambda f: {n: v.astype(frozen_dtype) for n, v in padded(f, shapes).items()},
        out_shardings=layout.frozen,
    )(frozen)
    return model_def, state, frozen, layout


def load_sharded_model(
    path,
    mesh: Mesh,
    *,
    trainable: TrainableConfig = TrainableConfig(),  # noqa: B008
    dtype=jnp.bfloat16,
    frozen_dtype=jnp.bfloat16,
    remat: bool | str = False,
    attention: str = "xla",
    rules=DEFAULT_RULES,
):
    """(model, hf_config) with every tensor placed straight onto its shards, in its storage
    shape (padded where the mesh divides none of its dimensions): trainable ones in fp32,
    frozen ones in `frozen_dtype`. The host holds one full tensor at a time (HF), or only the
    shards (Orbax); no device ever holds a full copy of a sharded tensor."""
    from maye_jax.storage.model_folders import load_model

    def stored(name: str, shape) -> tuple:
        return storage_shape(name, tuple(shape), mesh, rules)

    def place(name: str, value: np.ndarray) -> jax.Array:
        target = jnp.float32 if trainable.is_trainable(name) else frozen_dtype
        value = np.asarray(value).astype(target)
        shape = stored(name, value.shape)
        if shape != value.shape:
            value = np.pad(value, [(0, size - have) for size, have in zip(shape, value.shape)])
        return jax.device_put(value, NamedSharding(mesh, spec_for(name, shape, mesh, rules)))

    def shardings(name: str, shape) -> NamedSharding:
        return NamedSharding(mesh, spec_for(name, tuple(shape), mesh, rules))

    return load_model(
        path,
        dtype=dtype,
        param_dtype=jnp.float32,
        place=place,
        shardings=shardings,
        stored_shape=stored,
        remat=remat,
        attention=attention,
    )


# --------------------------------------------------------------------------------------------------
# The reference model
# --------------------------------------------------------------------------------------------------


def reference_params(state: TrainState, layout: Layout, dtype=jnp.bfloat16) -> Params:
    """A copy of the current trainable parameters in `dtype`, sharded like them: new buffers,
    so the donated train state can be overwritten while the reference stays fixed."""
    copy = jax.jit(
        lambda p: {n: jnp.array(v, dtype=dtype, copy=True) for n, v in p.items()},
        out_shardings=layout.params,
    )
    return copy(state.params)


def reference_model(model_def: ModelDef, ref_params: Params, frozen: Params) -> nnx.Module:
    """The frozen reference policy (frozen tower arrays shared with the policy: immutable)."""
    return model_def.merge(ref_params, frozen)


def policy_model(model_def: ModelDef, state: TrainState, frozen: Params) -> nnx.Module:
    """The current policy as a module (for logprobs_old); invalid after the next update, which
    donates `state`."""
    return model_def.merge(state.params, frozen)
