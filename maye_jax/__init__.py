"""maye-jax: MAYE (RL for vision-language models) in JAX/Flax NNX.

The model and sharding code lives in the repository's top-level `models/` and `sharding/`
folders and is imported as `maye_jax.models` and `maye_jax.sharding`: `maye_jax/models` and
`maye_jax/sharding` are links to them (in a checkout, so code run from it without an install
finds them; a wheel holds the files themselves). Importing this package imports no JAX.
"""
