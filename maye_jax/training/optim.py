"""The optimizer of the policy update (SPEC §3): AdamW, warmup + cosine, global-norm clipping.

The same settings as the original's torch AdamW (decoupled weight decay on every trainable
tensor, eps added to sqrt(v_hat)) and torchtune's `get_cosine_schedule_with_warmup`
(linear warmup from 0 over the first `warmup_fraction` of the updates, then a half cosine to 0).
"""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("warmup_cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule.

    schedule: "warmup_cosine" (the paper's) or "constant" (lr at every step; used by tests, as
    a warmup schedule's step-0 learning rate is 0).
    warmup_fraction: share of all updates spent warming up (rounded to whole updates).
    max_grad_norm: global-norm clip applied before AdamW; None disables it.
    """

    learning_rate: float = 5e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    schedule: str = "warmup_cosine"
    warmup_fraction: float = 0.1


def learning_rate_schedule(config: OptimizerConfig, total_updates: int) -> optax.Schedule:
    """Learning rate as a function of the number of updates already applied."""
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if config.schedule != "warmup_cosine":
        raise ValueError(f"unknown schedule {config.schedule!r}; known: {', '.join(SCHEDULES)}")
    if total_updates < 1:
        raise ValueError(
            f"total_updates must be >= 1 for a warmup_cosine schedule, got {total_updates}"
        )
    warmup_steps = min(round(config.warmup_fraction * total_updates), total_updates - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_updates,
        end_value=0.0,
    )


def make_optimizer(
    config: OptimizerConfig, total_updates: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule): clip by global norm, then AdamW with the schedule."""
    schedule = learning_rate_schedule(config, total_updates)
    adamw = optax.adamw(
        schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    if config.max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw), schedule
