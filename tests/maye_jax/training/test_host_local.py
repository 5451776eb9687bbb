"""What a process holds of the policy when it samples, scores and exports on its own
(`Policy.local_model` -> `policy._local_copy` of each parameter that spans several hosts).

One process stands in for a host here: with the mesh dp=2 x fsdp=4 of this session's 8 CPU
devices, dp row 0 is "this host's" 4 devices. Which parameters go through `_local_copy` (those
not fully addressable) only a real multi-process run can show: tests/maye_jax/test_multihost.py
samples with the local model on each host and compares with one process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from maye_jax.sharding.mesh import make_mesh
from maye_jax.training.policy import _local_copy


def weight(mesh, spec) -> jax.Array:
    values = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 7
    return jax.device_put(values, NamedSharding(mesh, spec))


def test_hsdp_a_host_uses_its_own_dp_row_without_a_copy():
    """HSDP (the parameter split over fsdp, a whole copy per dp row): the host's copy is its dp
    row's shards, the same buffers (nothing copied), split the same way, and what it computes
    stays on those 4 devices."""
    mesh = make_mesh(dp=2, fsdp=4)
    value = weight(mesh, PartitionSpec("fsdp", None))
    local = _local_copy(value)
    row = set(mesh.devices[0].reshape(-1))
    assert set(local.sharding.device_set) == row
    assert local.sharding.spec == value.sharding.spec
    np.testing.assert_array_equal(np.asarray(local), np.asarray(value))
    own = {s.device: s.data.unsafe_buffer_pointer() for s in value.addressable_shards}
    for shard in local.addressable_shards:
        assert shard.data.unsafe_buffer_pointer() == own[shard.device]
    product = jax.jit(lambda w: w @ w.T)(local)
    assert set(product.sharding.device_set) <= row
    # 1e-6: fp32 sums in XLA's order, not NumPy's
    np.testing.assert_allclose(
        np.asarray(product), np.asarray(value) @ np.asarray(value).T, rtol=1e-6
    )


def test_a_parameter_split_over_dp_too_is_gathered_whole_on_the_host():
    """A parameter split over both data axes (no dp row holds it whole): the host gathers a
    full copy, replicated on its devices."""
    mesh = make_mesh(dp=2, fsdp=4)
    value = weight(mesh, PartitionSpec(("dp", "fsdp"), None))
    local = _local_copy(value)
    assert local.sharding.is_fully_replicated
    assert set(local.sharding.device_set) == set(jax.local_devices())
    np.testing.assert_array_equal(np.asarray(local), np.asarray(value))
    assert float(jnp.sum(local)) == float(np.asarray(value).sum())
