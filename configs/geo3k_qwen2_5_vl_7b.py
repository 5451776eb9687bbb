"""The paper's geometry3k run with Qwen2.5-VL-7B-Instruct (SPEC §4): 7 training GPUs + vLLM on the 8th."""

from maye_jax.config.paper import paper_config


def get_config():
    return paper_config("geometry3k", "Qwen2.5-VL-7B-Instruct")
