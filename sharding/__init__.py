"""maye_jax.sharding: device mesh, partition rules and the sharded layouts of train states and batches.

Imported as `maye_jax.sharding` only: the folder sits at the repository's top level, and loading it
a second time as `sharding` would create a second copy of every module (and of its registries).
"""

if __name__ != "maye_jax.sharding":
    raise ImportError(f"import maye_jax.sharding, not {__name__} (one copy of each module)")
