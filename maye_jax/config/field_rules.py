"""Per-field rules of the settings (`opt(default, check)`): a check returns the problem with
a value as one short phrase, or None; the registries (estimators, losses, rewards, evaluation
settings, ...) are looked up when checked, so a new one needs no change here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], str | None]  # a problem with the value, or None


def positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def one_of(*choices) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def greater_than(low) -> Check:
    return lambda value: None if value > low else f"must be > {low}"


def in_range(low, high, *, low_open=False) -> Check:
    def check(value):
        ok = (low < value if low_open else low <= value) and value <= high
        return None if ok else f"must be in {'(' if low_open else '['}{low}, {high}]"

    return check


def each(check: Check) -> Check:
    def check_all(values):
        problems = [p for p in (check(v) for v in values) if p]
        return problems[0] if problems else None

    return check_all


def non_empty(values) -> str | None:
    return None if len(values) else "must not be empty"


def cpu_list(value) -> str | None:
    """CPU ids as taskset writes them: "1", "0,2", "2-3"."""
    import re

    ok = re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", value.replace(" ", ""))
    return None if ok else "expected CPU ids such as 1, 0,2 or 2-3"


def registry(names: Callable[[], tuple[str, ...]], what: str) -> Check:
    """A name that must be registered (imported lazily: the registries' modules import JAX)."""

    def check(value):
        known = names()
        return None if value in known else f"unknown {what}; known: {', '.join(sorted(known))}"

    return check


def opt(default=None, check: Check | None = None, *, none_off: str | None = None):
    """A field with its default and rule. `none_off`: the old "off" spelling (e.g. "0") that
    now means nothing, refused with a message naming None."""
    return dataclasses.field(default=default, metadata={"check": check, "none_off": none_off})


def known_advantage_estimators():
    from maye_jax.rl.advantages import advantage_estimator_names

    return advantage_estimator_names()


def known_policy_losses():
    from maye_jax.rl.losses import policy_loss_names

    return policy_loss_names()


def known_loss_aggregations():
    from maye_jax.rl.losses import loss_aggregation_names

    return loss_aggregation_names()


def known_kl_estimators():
    from maye_jax.rl.advantages import KL_ESTIMATORS

    return KL_ESTIMATORS


def known_reward_names():
    from maye_jax.rl.rewards import reward_names

    return reward_names()


def known_char_classes():
    from maye_jax.rl.rewards import CHAR_CLASSES

    return tuple(CHAR_CLASSES)


def known_eval_settings():
    from maye_jax.evaluation.evaluate import SETTINGS

    return tuple(SETTINGS)


def known_prompt_templates():
    from maye_jax.data.processor import prompt_template_names

    return prompt_template_names()


def known_schedules():
    from maye_jax.training.optim import SCHEDULES

    return SCHEDULES


DTYPES = ("float32", "bfloat16")
