"""The optimizer of the policy update (SPEC §3): AdamW, warmup + cosine, global-norm clipping.

The same settings as the original's torch AdamW (decoupled weight decay on every trainable
tensor, eps added to sqrt(v_hat)) and torchtune's `get_cosine_schedule_with_warmup`
(linear warmup from 0 over the first `warmup_fraction` of the updates, then a half cosine to 0).
"""

from __future__ import annotations

import dataclasses

import optax

from maye_jax.config.options import declared_default

SCHEDULES = ("warmup_cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule; the defaults are the `optim.*` options'
    (maye_jax/config/options.py).

    schedule: "warmup_cosine" (the paper's) or "constant" (lr at every step; used by tests, as
    a warmup schedule's step-0 learning rate is 0).
    warmup_fraction: share of all updates spent warming up (rounded to whole updates).
    max_grad_norm: global-norm clip applied before AdamW; None disables it.
    """

    learning_rate: float = declared_default("optim.learning_rate")
    b1: float = declared_default("optim.b1")
    b2: float = declared_default("optim.b2")
    eps: float = declared_default("optim.eps")
    weight_decay: float = declared_default("optim.weight_decay")
    max_grad_norm: float | None = declared_default("optim.max_grad_norm")
    schedule: str = declared_default("optim.schedule")
    warmup_fraction: float = declared_default("optim.warmup_fraction")


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
