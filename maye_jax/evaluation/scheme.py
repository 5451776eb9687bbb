"""The evaluation scheme's metrics (SPEC §6): reflection words, pass@k, summaries over epochs/seeds.

Pure Python on lists, so the training loop, the evaluator and the report share one definition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# The paper's 15 reflection words, in SPEC order. Matching is a plain substring test on the
# lower-cased text, so "verify" also counts inside "verifying" and "yet" inside "yeti".
REFLECTION_WORDS: tuple[str, ...] = (
    "re-check",
    "re-evaluate",
    "re-examine",
    "re-think",
    "recheck",
    "reevaluate",
    "reexamine",
    "reevaluation",
    "rethink",
    "check again",
    "think again",
    "try again",
    "verify",
    "wait",
    "yet",
)

# How tables, plots and summaries name the three generation settings (SPEC §6).
SETTING_LABELS = {
    "pass@8_t1.0": "pass@8 T=1.0",
    "pass@1_t0.6": "pass@1 T=0.6",
    "pass@1_t0.01": "pass@1 T=0.01",
}

REFLECTION_RATIO_NAMES: tuple[str, ...] = (
    "reflection_ratio",
    "reflection_ratio_in_correct_answers",
    "reflection_ratio_in_incorrect_answers",
    "correct_ratio_in_reflection_texts",
    "correct_ratio_in_no_reflection_texts",
)


def has_reflection(text: str) -> bool:
    """Whether any reflection word occurs in the lower-cased text (substring match)."""
    lowered = text.lower()
    return any(word in lowered for word in REFLECTION_WORDS)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def reflection_metrics(texts: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """The five reflection ratios of SPEC §6 and ``count/<word>`` for each reflection word.

    With N texts, N_ref with reflection, N+ correct and N_ref+ correct with reflection:
    reflection_ratio = N_ref/N, reflection_ratio_in_correct_answers = N_ref+/N+,
    reflection_ratio_in_incorrect_answers = (N_ref - N_ref+)/(N - N+),
    correct_ratio_in_reflection_texts = N_ref+/N_ref,
    correct_ratio_in_no_reflection_texts = (N+ - N_ref+)/(N - N_ref); 0.0 where a denominator is 0.
    ``count/<word>`` sums ``text.lower().count(word)`` (non-overlapping occurrences) over texts.
    """
    if len(texts) != len(correct):
        raise ValueError(
            f"scheme.reflection_metrics: {len(texts)} texts but {len(correct)} correctness flags"
        )
    lowered_texts = [text.lower() for text in texts]
    reflects = [any(word in text for word in REFLECTION_WORDS) for text in lowered_texts]
    num_texts = len(texts)
    num_reflection = sum(reflects)
    num_correct = sum(bool(flag) for flag in correct)
    num_correct_reflection = sum(
        bool(flag) and reflect for flag, reflect in zip(correct, reflects, strict=True)
    )
    metrics = {
        "reflection_ratio": _ratio(num_reflection, num_texts),
        "reflection_ratio_in_correct_answers": _ratio(num_correct_reflection, num_correct),
        "reflection_ratio_in_incorrect_answers": _ratio(
            num_reflection - num_correct_reflection, num_texts - num_correct
        ),
        "correct_ratio_in_reflection_texts": _ratio(num_correct_reflection, num_reflection),
        "correct_ratio_in_no_reflection_texts": _ratio(
            num_correct - num_correct_reflection, num_texts - num_reflection
        ),
    }
    for word in REFLECTION_WORDS:
        metrics[f"count/{word}"] = float(sum(text.count(word) for text in lowered_texts))
    return metrics


def pass_at_k_per_prompt(correct_matrix: Sequence[Sequence[bool]]) -> list[bool]:
    """For each prompt (row of k samples), whether any sample is correct."""
    return [any(bool(flag) for flag in row) for row in correct_matrix]


def pass_at_k(correct_matrix: Sequence[Sequence[bool]]) -> float:
    """Fraction of prompts with at least one correct sample among their k (0.0 for no prompts).

    With one sample per prompt this is pass@1, i.e. plain accuracy.
    """
    per_prompt = pass_at_k_per_prompt(correct_matrix)
    return _ratio(sum(per_prompt), len(per_prompt))


def summarize_over_epochs(values_by_epoch: Mapping[int, float]) -> dict[str, float]:
    """``untrained`` (epoch 0), and ``mean``/``max`` over epochs 1..E, as the paper's tables.

    A missing epoch 0 gives ``untrained = nan``; no epoch >= 1 gives ``mean = max = nan``.
    """
    trained = [value for epoch, value in values_by_epoch.items() if epoch >= 1]
    return {
        "untrained": float(values_by_epoch.get(0, math.nan)),
        "mean": sum(trained) / len(trained) if trained else math.nan,
        "max": float(max(trained)) if trained else math.nan,
    }


def mean_std_over_seeds(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0) of one number measured per seed."""
    if not values:
        raise ValueError("scheme.mean_std_over_seeds: no values (expected one per seed)")
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / len(values)
    return mean, math.sqrt(variance)


def summarize_over_seeds(
    values_by_epoch_per_seed: Sequence[Mapping[int, float]],
) -> dict[str, tuple[float, float]]:
    """summarize_over_epochs per seed, then (mean, std) over seeds of each entry (one table cell)."""
    per_seed = [summarize_over_epochs(values) for values in values_by_epoch_per_seed]
    if not per_seed:
        raise ValueError("scheme.summarize_over_seeds: no seeds")
    return {key: mean_std_over_seeds([summary[key] for summary in per_seed]) for key in per_seed[0]}
