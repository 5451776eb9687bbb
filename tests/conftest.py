"""Test-session setup: 8 fake CPU devices and a persistent JAX compilation cache.

Both must be configured before JAX is first imported, which is why they live here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE_DIR = os.environ.get(
    "MAYE_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "maye_jax", "jax_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
