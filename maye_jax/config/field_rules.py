"""The rule of one option (`opt(default, rule, meaning)` in maye_jax/config/options.py): what a
value must be, as a check that returns the problem with a value as one short phrase (or None)
and as the text the options listing shows (`allowed`). The registries (estimators, losses,
rewards, evaluation settings, ...) are looked up when checked, so a new one needs no change
here."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Rule:
    """`rule(value)`: the problem with `value` ("must be > 0"), or None when it is allowed.
    `allowed`: what is allowed, for the options listing ("> 0"); a function for the registries,
    whose names are known only once their modules are imported."""

    check: Callable[[Any], str | None]
    allowed: str | Callable[[], str]

    def __call__(self, value) -> str | None:
        return self.check(value)

    def describe(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed


def _bound(test: Callable[[Any], bool], text: str) -> Rule:
    return Rule(lambda value: None if test(value) else f"must be {text}", text)


positive = _bound(lambda value: value > 0, "> 0")
non_negative = _bound(lambda value: value >= 0, ">= 0")


def greater_than(low) -> Rule:
    return _bound(lambda value: value > low, f"> {low}")


def in_range(low, high, *, low_open=False) -> Rule:
    def test(value) -> bool:
        return (low < value if low_open else low <= value) and value <= high

    return _bound(test, f"in {'(' if low_open else '['}{low}, {high}]")


def one_of(*choices) -> Rule:
    text = ", ".join(choices)
    return Rule(lambda value: None if value in choices else f"must be one of {text}", text)


def each(rule: Rule) -> Rule:
    """Every item of a tuple follows `rule` (the first item's problem is reported)."""

    def check_all(values):
        problems = [p for p in (rule(v) for v in values) if p]
        return problems[0] if problems else None

    return Rule(check_all, lambda: f"each: {rule.describe()}")


non_empty = Rule(lambda values: None if len(values) else "must not be empty", "not empty")

cpu_list = Rule(
    lambda value: (
        None
        if re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", value.replace(" ", ""))
        else "expected CPU ids such as 1, 0,2 or 2-3"
    ),
    "CPU ids as taskset writes them: 1, 0,2, 2-3",
)


def registry(names: Callable[[], tuple[str, ...]], what: str) -> Rule:
    """A name that must be registered (imported lazily: the registries' modules import JAX)."""

    def check(value):
        known = names()
        return None if value in known else f"unknown {what}; known: {', '.join(sorted(known))}"

    return Rule(check, lambda: ", ".join(sorted(names())))


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


def _reward_function_problem(entry) -> str | None:
    from maye_jax.rl.user_rewards import entry_problem

    return entry_problem(entry) if isinstance(entry, str) else "must be a string"


reward_function = Rule(
    _reward_function_problem, "path/to/file.py:function or module:function, optionally =weight"
)


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
DATA_FORMATS = ("jsonl", "parquet", "arrow")  # maye_jax/data/tables.py
DATA_LAYOUTS = ("maye", "geo3k_easyr1", "geo3k_verl")  # maye_jax/data/layouts.py
