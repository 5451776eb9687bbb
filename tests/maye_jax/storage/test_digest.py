"""The content digest of a checkpoint's arrays: a NumPy reference of the same sums, any one
changed word changes it, and the sharding does not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from maye_jax.storage.digest import content_digests


def numpy_digest(array: np.ndarray) -> str:
    """The same two wrapping uint32 sums, written out in NumPy."""
    words = array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.itemsize]).astype(np.uint64)
    position = np.arange(words.size, dtype=np.uint64).reshape(words.shape)
    mask = np.uint64(0xFFFFFFFF)
    weight_a = ((position * np.uint64(0x9E3779B1) + np.uint64(0x7F4A7C15)) & mask) | np.uint64(1)
    weight_b = (((position ^ np.uint64(0x85EBCA6B)) * np.uint64(0xC2B2AE35)) & mask) | np.uint64(1)
    mixed = ((words ^ (words >> np.uint64(16))) * np.uint64(0x45D9F3B)) & mask
    first = int(np.sum((words * weight_a) & mask) & mask)
    second = int(np.sum((mixed * weight_b) & mask) & mask)
    return f"{first:08x}{second:08x}"


def test_digest_equals_the_numpy_reference_for_each_dtype():
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((33, 17)).astype(np.float32),
        "bf16": rng.standard_normal((5, 7, 3)).astype(ml_dtypes.bfloat16),
        "i32": rng.integers(-(2**31), 2**31 - 1, 100).astype(np.int32),
        "u8": rng.integers(0, 255, (4, 4)).astype(np.uint8),
        "scalar": np.asarray(7, np.int32),
    }
    found = content_digests({k: jnp.asarray(v) for k, v in arrays.items()})
    assert found == {f"['{k}']": numpy_digest(v) for k, v in arrays.items()}


def test_any_changed_word_changes_the_digest_and_the_sharding_does_not():
    rng = np.random.default_rng(1)
    array = rng.standard_normal((64, 48)).astype(np.float32)
    reference = content_digests(jnp.asarray(array))[""]
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.device_put(array, NamedSharding(mesh, P("x", None)))
    assert content_digests(sharded)[""] == reference
    for row, column, bit in [(0, 0, 0), (31, 7, 31), (63, 47, 12)]:
        changed = array.copy()
        changed.view(np.uint32)[row, column] ^= np.uint32(1 << bit)
        assert content_digests(jnp.asarray(changed))[""] != reference
    swapped = array.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert content_digests(jnp.asarray(swapped))[""] != reference
