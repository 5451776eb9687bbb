"""Partition rules as data: parameter-name pattern -> preferred PartitionSpec.

The same specs apply to parameters, gradients and optimizer moments (they share shapes).
A mesh axis that does not divide its preferred dimension (e.g. vocab 152064 or intermediate
18944 over 7 devices) is moved to another dimension of the same tensor that it divides (the
largest such), else dropped for that tensor only; `replication_report` says how many bytes end
up replicated on every device, so a bad plan is visible at start-up.

A trainer stores such a tensor padded instead (`storage_shape`): its preferred dimension
rounded up to a multiple of the axis, zeros after the real rows, so it shards. Qwen3-VL's widths
(1024, 2048, 4096, 12288, ...) have no factor 7: on the paper's 7 training GPUs every matrix of
it would otherwise be replicated. The model cuts the padding off where it uses a parameter
(`models/layers.logical`); gradients there are zero, so AdamW keeps the padding at zero.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (regex on the dotted Flax parameter name, preferred spec per dimension). First match wins.
DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens\.weight$", ("tp", "fsdp")),  # [vocab, hidden]
    (r"^lm_head$", ("tp", "fsdp")),  # [vocab, hidden]
    (r"self_attn\.(q|k|v)_proj\.kernel$", ("fsdp", "tp")),  # [hidden, heads*head_dim]
    (r"self_attn\.(q|k|v)_proj\.bias$", ("tp",)),
    (r"self_attn\.o_proj\.kernel$", ("tp", "fsdp")),  # [heads*head_dim, hidden]
    (r"mlp\.(gate|up)_proj\.kernel$", ("fsdp", "tp")),  # [hidden, intermediate]
    (r"mlp\.(gate|up)_proj\.bias$", ("tp",)),
    (r"mlp\.down_proj\.kernel$", ("tp", "fsdp")),  # [intermediate, hidden]
    (r"attn\.qkv\.kernel$", ("fsdp", "tp")),  # vision
    (r"attn\.proj\.kernel$", ("tp", "fsdp")),
    (r"mlp\.(linear_)?fc1\.kernel$", ("fsdp", "tp")),  # Qwen2-VL fc1, Qwen3-VL linear_fc1
    (r"mlp\.(linear_)?fc2\.kernel$", ("tp", "fsdp")),
    (r"merger(_list\.\d+)?\.(linear_)?fc1\.kernel$", ("fsdp", "tp")),  # and DeepStack's
    (r"merger(_list\.\d+)?\.(linear_)?fc2\.kernel$", ("tp", "fsdp")),
    (r"patch_embed\.kernel$", (None, "fsdp")),
    (r"pos_embed\.weight$", (None, "fsdp")),  # Qwen3-VL's position table [2304, width]
    (r".*", ()),  # norms, remaining biases: replicated (they are small)
)


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of one parameter, with the per-dimension fallback applied."""
    preferred = next(spec for pattern, spec in rules if re.search(pattern, name))
    preferred = list(preferred) + [None] * (len(shape) - len(preferred))
    assigned: list = [None] * len(shape)
    homeless = []
    for dim, axis in enumerate(preferred[: len(shape)]):
        if axis is None or mesh.shape.get(axis, 1) == 1:
            continue
        if shape[dim] % mesh.shape[axis] == 0:
            assigned[dim] = axis
        else:
            homeless.append(axis)
    for axis in homeless:  # move to the largest free dimension it divides
        size = mesh.shape[axis]
        candidates = [d for d in range(len(shape)) if assigned[d] is None and shape[d] % size == 0]
        if candidates:
            assigned[max(candidates, key=lambda d: shape[d])] = axis
    return PartitionSpec(*assigned)


def storage_shape(name: str, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> tuple:
    """The shape a trainer stores a parameter in on `mesh`: `shape`, or with the preferred
    dimension of a mesh axis that divides none of its dimensions padded up to a multiple of it
    (one axis: the first such)."""
    preferred = next(spec for pattern, spec in rules if re.search(pattern, name))
    placed = spec_for(name, shape, mesh, rules)
    for dim, axis in enumerate(preferred[: len(shape)]):
        size = mesh.shape.get(axis, 1) if axis is not None else 1
        if size > 1 and axis not in placed and shape[dim] >= size:
            padded = list(shape)
            padded[dim] = -(-shape[dim] // size) * size
            return tuple(padded)
    return tuple(shape)


def param_sharding_fn(mesh: Mesh, rules=DEFAULT_RULES) -> Callable[[str, tuple], NamedSharding]:
    return lambda name, shape: NamedSharding(mesh, spec_for(name, shape, mesh, rules))


@dataclasses.dataclass
class ReplicationReport:
    trainable_bytes: int
    trainable_replicated_bytes: int
    frozen_bytes: int
    frozen_replicated_bytes: int
    replicated_names: list[str]

    @property
    def trainable_replicated_fraction(self) -> float:
        return self.trainable_replicated_bytes / max(self.trainable_bytes, 1)

    def summary(self) -> str:
        gib = 1024**3
        return (
            f"replicated on every device: trainable {self.trainable_replicated_bytes / gib:.3f} "
            f"GiB of {self.trainable_bytes / gib:.3f} GiB "
            f"({100 * self.trainable_replicated_fraction:.2f}%), frozen "
            f"{self.frozen_replicated_bytes / gib:.3f} GiB of {self.frozen_bytes / gib:.3f} GiB"
        )


def replication_report(
    params: dict[str, tuple[tuple[int, ...], np.dtype]],
    mesh: Mesh,
    is_trainable: Callable[[str], bool],
    rules=DEFAULT_RULES,
) -> ReplicationReport:
    """Bytes that each device holds in full (unsharded), split by trainable and frozen.

    `params` maps dotted names to (shape, dtype). A tensor counts as replicated when none of
    its dimensions is sharded while the mesh has more than one device.
    """
    report = ReplicationReport(0, 0, 0, 0, [])
    multi_device = mesh.size > 1
    for name, (shape, dtype) in params.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        replicated = multi_device and all(a is None for a in spec_for(name, shape, mesh, rules))
        if is_trainable(name):
            report.trainable_bytes += nbytes
            report.trainable_replicated_bytes += nbytes if replicated else 0
        else:
            report.frozen_bytes += nbytes
            report.frozen_replicated_bytes += nbytes if replicated else 0
        if replicated:
            report.replicated_names.append(name)
    return report


def check_replication(report: ReplicationReport, max_trainable_fraction: float = 0.05) -> None:
    if report.trainable_replicated_fraction > max_trainable_fraction:
        raise ValueError(
            f"{report.summary()}; more than {100 * max_trainable_fraction:.0f}% of the trainable "
            "state would be replicated on every device (add a partition rule, or raise "
            "--config.sharding.max_replicated_fraction)"
        )
