"""The sharded policy a run trains: its definition, train state, frozen parameters, layout and
(when a KL term needs it) the frozen reference model.

    policy = build_policy(settings, mesh, model_dir, optimizer, with_reference=True)
    policy.model()          # the current policy as a module (invalid after the next update)
    policy.reference()      # the reference model, or None
    export_policy(policy, out_dir, progress=True)   # its current weights as an HF folder
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maye_jax.config.settings import Settings
from maye_jax.models.configs import ModelConfig
from maye_jax.run import multihost
from maye_jax.training.optim import make_optimizer
from maye_jax.training.train_state import (
    TrainableConfig,
    create_train_state,
    load_sharded_model,
    policy_model,
    reference_model,
    reference_params,
)

log = logging.getLogger("maye_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass
class Policy:
    """The sharded policy: definition, train state, frozen params, layout, reference params."""

    model_def: object
    state: object
    frozen: dict
    layout: object
    ref_params: dict | None
    model_config: ModelConfig
    hf_config: object
    source_dir: Path  # where the weights came from (tokenizer/processor files too)

    def model(self):
        return policy_model(self.model_def, self.state, self.frozen)

    def local_model(self):
        """The current policy on this process's devices only (several processes): each host
        samples, scores and exports with it without talking to the others. With one dp row per
        host (HSDP) this host's shards are a whole copy and nothing is copied; otherwise (FSDP
        across hosts) the parameters are gathered from every process, a full copy per host and
        per call. One process: the policy itself."""
        return host_local_model(self.model())

    def reference(self):
        return (
            None
            if self.ref_params is None
            else reference_model(self.model_def, self.ref_params, self.frozen)
        )


def export_policy(policy: Policy, out_dir: Path, *, progress: bool, run_inputs) -> None:
    """The policy's current weights as an HF folder (the final export, the best evaluation's)
    with what the run used to read its inputs (`run_inputs`, storage/run_inputs.py): every
    process calls it (several: each takes part in gathering a copy), process 0 writes."""
    from maye_jax.storage.model_folders import export_hf

    model = policy.local_model()
    if multihost.is_leader():
        export_hf(
            model,
            policy.hf_config,
            out_dir,
            tokenizer_source=policy.source_dir,
            progress=progress,
            run_inputs=run_inputs,
        )
    multihost.barrier(f"exported {Path(out_dir).name}")


def trainable_config(settings: Settings) -> TrainableConfig:
    m = settings.model
    return TrainableConfig(
        train_vit=m.train_vit,
        train_connector=m.train_connector,
        train_llm=m.train_llm,
        train_embeddings=m.train_embeddings,
    )


def optimizer_for(
    settings: Settings, total_updates: int, *, learning_rate=None, warmup_fraction=None
):
    """(AdamW with its schedule over `total_updates`, the schedule)."""
    config = settings.optimizer_config(learning_rate=learning_rate, warmup_fraction=warmup_fraction)
    return make_optimizer(config, max(total_updates, 1))


def build_policy(
    settings: Settings, mesh, source_dir, optimizer, *, with_reference: bool
) -> Policy:
    """The policy loaded from `source_dir` (HF directory or checkpoint) onto `mesh`, with a
    fresh optimizer state; a reference copy of its weights only when `with_reference`."""
    m = settings.model
    model, hf_config = load_sharded_model(
        source_dir,
        mesh,
        trainable=trainable_config(settings),
        dtype=dtype_of(m.dtype),
        frozen_dtype=dtype_of(m.frozen_dtype),
        remat=m.remat and m.remat_policy,
        attention=m.attention,
    )
    return _policy_from_model(
        settings,
        model,
        mesh,
        optimizer,
        with_reference=with_reference,
        hf_config=hf_config,
        source_dir=Path(source_dir),
    )


def with_fresh_optimizer(settings: Settings, policy: Policy, optimizer, *, with_reference: bool):
    """The weights of an already trained policy with a fresh optimizer state (and, when asked,
    reference = current weights), e.g. RL after an SFT warm-up. The old train state is freed
    first, so two never coexist in device memory."""
    model = policy.model()
    layout, hf_config, source_dir = policy.layout, policy.hf_config, policy.source_dir
    # The module holds the master weights; the optimizer moments and the reference can go.
    for leaf in jax.tree.leaves((policy.state.opt_state, policy.ref_params)):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()
    policy.state = policy.ref_params = None
    return _policy_from_model(
        settings,
        model,
        layout.mesh,
        optimizer,
        with_reference=with_reference,
        hf_config=hf_config,
        source_dir=source_dir,
    )


def _policy_from_model(
    settings: Settings, model, mesh, optimizer, *, with_reference: bool, hf_config, source_dir
) -> Policy:
    """Train state (fp32 masters + a fresh optimizer), frozen params and layout of `model` on
    `mesh`, and the reference (a copy of the trainable weights) when asked."""
    model_def, state, frozen, layout = create_train_state(
        model,
        mesh,
        optimizer,
        trainable=trainable_config(settings),
        frozen_dtype=dtype_of(settings.model.frozen_dtype),
        max_replicated_fraction=settings.sharding.max_replicated_fraction,
    )
    log.info("sharding: %s", layout.report.summary())
    ref = (
        reference_params(state, layout, dtype=dtype_of(settings.model.dtype))
        if with_reference
        else None
    )
    return Policy(
        model_def,
        state,
        frozen,
        layout,
        ref,
        ModelConfig.from_hf(hf_config),
        hf_config,
        source_dir,
    )


def host_local_model(model):
    """`model` with every parameter on this process's devices (see `Policy.local_model`)."""
    if not multihost.multiprocess():
        return model
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, variable in flat.items():
        value = variable.get_value()
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            flat[path] = variable.replace(_local_copy(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _local_copy(value: jax.Array) -> jax.Array:
    """A fully addressable copy of a global array on this process's devices."""
    sharding = value.sharding
    mesh = sharding.mesh
    rows = [
        r
        for r in range(mesh.shape["dp"])
        if {d.process_index for d in mesh.devices[r].reshape(-1)} == {multihost.process_index()}
    ]
    if rows:  # HSDP: this host's dp row holds the whole array over its own devices: no copy
        local = NamedSharding(
            Mesh(mesh.devices[rows[0] : rows[0] + 1], mesh.axis_names), sharding.spec
        )
        global_index = sharding.devices_indices_map(value.shape)
        by_device = {shard.device: shard.data for shard in value.addressable_shards}
        arrays = []
        for device, index in local.devices_indices_map(value.shape).items():
            if index != global_index[device]:
                break  # the array is split over dp too: no whole copy here
            arrays.append(by_device[device])
        else:
            return jax.make_array_from_single_device_arrays(value.shape, local, arrays)
    # FSDP across hosts: no host holds a whole copy; gather one (a full copy per host per call)
    full = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    local_mesh = Mesh(np.array(jax.local_devices()).reshape(1, -1, 1), ("dp", "fsdp", "tp"))
    return jax.device_put(full, NamedSharding(local_mesh, PartitionSpec()))
