"""Not the paper's: mm_math5k with Qwen3-VL-8B-Instruct and the paper's Qwen2.5-VL-7B settings."""

from maye_jax.config.paper import qwen3_vl_config


def get_config():
    return qwen3_vl_config("mm_math5k", "Qwen3-VL-8B-Instruct")
