"""maye_jax.models: Flax NNX Qwen2-VL / Qwen2.5-VL / Qwen3-VL, host-side M-RoPE, HF weight mapping.

Imported as `maye_jax.models` only: the folder sits at the repository's top level, and loading it
a second time as `models` would create a second copy of every module (and of its registries).
"""

if __name__ != "maye_jax.models":
    raise ImportError(f"import maye_jax.models, not {__name__} (one copy of each module)")
