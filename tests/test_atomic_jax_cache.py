"""The test processes' JAX compilation cache writes whole entries or none (tests/jax_cache_site)."""

import os

from jax._src import lru_cache

from tests.jax_cache_site import atomic_jax_cache


def test_cache_entries_are_renamed_into_place_whole(tmp_path):
    atomic_jax_cache.install()  # as the sitecustomize does in the processes the tests start
    cache = lru_cache.LRUCache(str(tmp_path), max_size=-1)
    renames = []
    real_replace = os.replace

    def replace(source, target):
        renames.append((os.path.basename(source), os.path.basename(target)))
        assert os.path.getsize(source) == 3 * 2**20  # complete before it gets its name
        real_replace(source, target)

    os.replace = replace
    try:
        cache.put("key", b"x" * (3 * 2**20))
        cache.put("key", b"other")  # an existing entry is kept
    finally:
        os.replace = real_replace
    assert [target for _, target in renames] == ["key-cache"]
    assert renames[0][0].startswith(".partial-")
    assert cache.get("key") == b"x" * (3 * 2**20)
    assert sorted(os.listdir(tmp_path)) == ["key-cache"]
