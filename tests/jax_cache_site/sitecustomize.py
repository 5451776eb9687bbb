"""Loaded (PYTHONPATH) into processes the tests start that share a JAX compilation cache:
their cache entries are written atomically (atomic_jax_cache.py says why)."""

import atomic_jax_cache

atomic_jax_cache.install_on_import()
