"""Where a training run's arrays live on the mesh: the train state, the frozen parameters and
the rows of a batch.

Parameters, their gradients and every optimizer moment that has a parameter's shape get that
parameter's PartitionSpec (`rules.spec_for`); a batch's rows split over the data axes
('dp', 'fsdp'). This module knows the structure of a state only as "dicts keyed by parameter
name" (as optax's AdamW moments are), nothing of RL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maye_jax.sharding.rules import (
    DEFAULT_RULES,
    ReplicationReport,
    check_replication,
    replication_report,
    spec_for,
)

DATA_AXES = ("dp", "fsdp")  # the mesh axes a batch's rows are split over


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Shardings of a train state (a pytree of NamedShardings shaped like the state), of the
    trainable and frozen parameters by name, and the replication report of the plan."""

    mesh: Mesh
    state: Any
    params: dict[str, NamedSharding]  # trainable parameters (and their grads, mu, nu)
    frozen: dict[str, NamedSharding]
    report: ReplicationReport

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def shards_params(self) -> bool:
        """Whether any parameter is split over devices (False: every device holds them all)."""
        shardings = [*self.params.values(), *self.frozen.values()]
        return any(not sharding.is_fully_replicated for sharding in shardings)

    @property
    def data_parallel_size(self) -> int:
        """How many ways a batch's rows are split (the product of the data axes)."""
        return data_parallel_size(self.mesh)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in DATA_AXES if a in mesh.shape]))


def param_shardings(
    shapes: Mapping[str, Any], mesh: Mesh, rules=DEFAULT_RULES
) -> dict[str, NamedSharding]:
    """NamedSharding per parameter name (values: anything with a `.shape`)."""
    return {
        name: NamedSharding(mesh, spec_for(name, tuple(value.shape), mesh, rules))
        for name, value in shapes.items()
    }


def plan_state_layout(
    mesh: Mesh,
    params: Mapping[str, Any],
    frozen: Mapping[str, Any],
    abstract_state: Any,
    *,
    frozen_dtype,
    rules=DEFAULT_RULES,
    max_replicated_fraction: float | None = 0.05,
) -> Layout:
    """Shardings of `abstract_state` (the state's ShapeDtypeStructs): a leaf under a dict key
    naming a trainable parameter, with that parameter's shape, is sharded like the parameter;
    every other leaf (counters, schedules) is replicated. Raises when more than the fraction
    of the trainable state (fp32 params, grads, mu, nu) would be replicated (None: no check)."""
    trainable_shardings = param_shardings(params, mesh, rules)
    frozen_shardings = param_shardings(frozen, mesh, rules)
    shapes = {n: (tuple(v.shape), np.float32) for n, v in params.items()}
    shapes.update({n: (tuple(v.shape), frozen_dtype) for n, v in frozen.items()})
    report = replication_report(shapes, mesh, lambda name: name in params, rules)
    if max_replicated_fraction is not None:
        check_replication(report, max_replicated_fraction)
    replicated = NamedSharding(mesh, PartitionSpec())

    def like_params(key_path, leaf):
        name = next(
            (k.key for k in reversed(key_path) if isinstance(k, jax.tree_util.DictKey)), None
        )
        if name in trainable_shardings and tuple(leaf.shape) == tuple(params[name].shape):
            return trainable_shardings[name]
        return replicated

    state_shardings = jax.tree_util.tree_map_with_path(like_params, abstract_state)
    return Layout(mesh, state_shardings, trainable_shardings, frozen_shardings, report)


def row_sharding(mesh: Mesh, shape: tuple[int, ...], row_axis: int) -> NamedSharding:
    """Rows (dimension `row_axis`) over the data axes. Rows that do not divide evenly are
    refused: pad them first (`UpdateBatch.pad_micro_rows`), never replicate them silently."""
    axes = tuple(a for a in DATA_AXES if mesh.shape.get(a, 1) > 1)
    if not axes:
        return NamedSharding(mesh, PartitionSpec())
    ways = int(np.prod([mesh.shape[a] for a in axes]))
    if shape[row_axis] % ways:
        raise ValueError(
            f"{shape[row_axis]} rows do not split over the {ways}-way data axes {axes}: pad them"
        )
    spec: list = [None] * len(shape)
    spec[row_axis] = axes
    return NamedSharding(mesh, PartitionSpec(*spec))
