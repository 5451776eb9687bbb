"""The rule-based rewards (`maye_jax.rl.rewards`), under the documented public path:
`maye_jax.rewards.accuracy_reward(response, solution) -> float`, `language_reward(response)`."""

from maye_jax.rl.rewards import (
    accuracy_reward,
    accuracy_rewards,
    compute_rewards,
    get_reward,
    language_reward,
    register_reward,
)

__all__ = [
    "accuracy_reward",
    "accuracy_rewards",
    "compute_rewards",
    "get_reward",
    "language_reward",
    "register_reward",
]
