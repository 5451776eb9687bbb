"""Every experiment option with its default (`maye_jax.config.defaults`), under the path users and
`configs/*.py` import it from."""

from maye_jax.config.defaults import default_config, paper_preset

__all__ = ["default_config", "paper_preset"]
