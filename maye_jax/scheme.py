"""The evaluation scheme's metrics (`maye_jax.evaluation.scheme`), under the documented public
path: `maye_jax.scheme.reflection_metrics(texts, correct) -> dict`."""

from maye_jax.evaluation.scheme import (
    has_reflection,
    pass_at_k,
    reflection_metrics,
    summarize_over_epochs,
    summarize_over_seeds,
)

__all__ = [
    "has_reflection",
    "pass_at_k",
    "reflection_metrics",
    "summarize_over_epochs",
    "summarize_over_seeds",
]
