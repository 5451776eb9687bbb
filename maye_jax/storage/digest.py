"""What a checkpoint's digest is made of, computed while it is written (nothing is re-read).

- `content_digests(tree)`: per array, 64 bits computed on the devices from the values being
  saved: two wrapping uint32 sums over the array's words (its bits as unsigned integers), each
  word multiplied by an odd weight that depends on its position (the second sum on a bijective
  mix of the word). An odd weight times a non-zero difference is non-zero modulo 2**32, so
  changing any one word always changes the first sum; swapping words or changing several
  changes both with overwhelming probability. Integer sums are exact in any order, so the
  digest does not depend on the sharding, and it costs one read of the state on the devices
  (milliseconds at 7B on a GPU) instead of re-reading the files from the disk.
- `file_sizes(root, owned)`: the files under a folder with their sizes, from a listing.

A checkpoint's listing catches a missing or truncated file before the restore; the content
digest of what was restored catches bytes that changed but still load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_WORD_DTYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _words(leaf: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (one per element; 8-byte elements give two)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
        leaf = leaf.astype(jnp.uint8)
    if leaf.dtype.itemsize == 8:  # only with jax_enable_x64: [..., 2] uint32
        return jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    return jax.lax.bitcast_convert_type(leaf, _WORD_DTYPES[leaf.dtype.itemsize]).astype(jnp.uint32)


def _leaf_digest(leaf: jax.Array) -> jax.Array:
    """uint32[2] of one array (see the module doc)."""
    words = _words(leaf)
    # Each element's flat position from per-axis iotas: no reshape of a sharded array.
    position = jnp.zeros((), jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        position = position + iota * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= words.shape[axis]
    weight_a = position * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15) | jnp.uint32(1)
    weight_b = (position ^ jnp.uint32(0x85EBCA6B)) * jnp.uint32(0xC2B2AE35) | jnp.uint32(1)
    mixed = (words ^ (words >> 16)) * jnp.uint32(0x45D9F3B)
    return jnp.stack(
        [jnp.sum(words * weight_a, dtype=jnp.uint32), jnp.sum(mixed * weight_b, dtype=jnp.uint32)]
    )


_tree_digest = jax.jit(lambda tree: jax.tree.map(_leaf_digest, tree))


def content_digests(tree) -> dict[str, str]:
    """{leaf path (jax.tree_util.keystr): 16 hex digits} of every array of `tree`."""
    digests = jax.device_get(_tree_digest(tree))
    flat, _ = jax.tree_util.tree_flatten_with_path(digests)
    return {
        jax.tree_util.keystr(path): "".join(f"{int(x):08x}" for x in np.asarray(value))
        for path, value in flat
    }


def json_digest(value) -> str:
    """SHA-256 of a JSON value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_sizes(root: Path, owned: Callable[[str], bool] = lambda relative: True) -> dict[str, int]:
    """{path relative to `root`: size in bytes} of every file under `root` that `owned` keeps."""
    sizes = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if owned(relative):
                sizes[relative] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def listing_problems(root: Path, expected: Mapping[str, int], limit: int = 3) -> list[str]:
    """What differs between the files under `root` and the listing recorded at write time."""
    problems = []
    for relative, size in expected.items():
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif (found := path.stat().st_size) != size:
            problems.append(f"{relative} has {found} bytes, {size} when written")
        if len(problems) == limit:
            break
    return problems
