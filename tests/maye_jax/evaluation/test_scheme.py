"""Tests for maye_jax/scheme.py: reflection metrics, pass@k and table summaries, on hand cases."""

import math

import pytest

from maye_jax.evaluation import scheme


def test_reflection_words_are_the_papers_fifteen_in_order():
    assert scheme.REFLECTION_WORDS == (
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


def test_reflection_metrics_hand_case():
    texts = [
        "Let me re-check: 5. Wait, yes.",  # reflection, correct
        "The answer is 4.",  # no reflection, correct
        "RETHINK this. Let me re-think and rethink.",  # reflection, incorrect
        "I will check again and recheck; verifying now.",  # reflection, incorrect
        "Done.",  # no reflection, incorrect
    ]
    correct = [True, True, False, False, False]
    metrics = scheme.reflection_metrics(texts, correct)
    # N = 5, N_ref = 3, N+ = 2, N_ref+ = 1
    assert metrics["reflection_ratio"] == pytest.approx(3 / 5)
    assert metrics["reflection_ratio_in_correct_answers"] == pytest.approx(1 / 2)
    assert metrics["reflection_ratio_in_incorrect_answers"] == pytest.approx(2 / 3)
    assert metrics["correct_ratio_in_reflection_texts"] == pytest.approx(1 / 3)
    assert metrics["correct_ratio_in_no_reflection_texts"] == pytest.approx(1 / 2)
    counts = {key[len("count/") :]: value for key, value in metrics.items() if "/" in key}
    assert {word: count for word, count in counts.items() if count} == {
        "re-check": 1,
        "wait": 1,
        "rethink": 2,
        "re-think": 1,
        "check again": 1,
        "recheck": 1,
        "verify": 1,
    }
    assert set(metrics) == set(scheme.REFLECTION_RATIO_NAMES) | {
        f"count/{word}" for word in scheme.REFLECTION_WORDS
    }


@pytest.mark.parametrize(
    "text, expected_counts",
    [
        ("Re-check again", {"re-check": 1, "check again": 1}),
        ("rechecking", {"recheck": 1}),
        ("A REEVALUATION", {"reevaluation": 1}),
        ("reevaluated", {"reevaluate": 1}),
        ("re-evaluate, re-examine, reexamine", {"re-evaluate": 1, "re-examine": 1, "reexamine": 1}),
        ("think again, try again", {"think again": 1, "try again": 1}),
        ("waitwait, awaiting", {"wait": 3}),
        ("a yeti", {"yet": 1}),
        ("yesterday", {}),
        ("verifying verification", {"verify": 1}),
    ],
)
def test_reflection_counts_are_literal_substring_counts(text, expected_counts):
    metrics = scheme.reflection_metrics([text], [False])
    found = {
        word: metrics[f"count/{word}"]
        for word in scheme.REFLECTION_WORDS
        if metrics[f"count/{word}"]
    }
    assert found == expected_counts
    assert metrics["reflection_ratio"] == (1.0 if expected_counts else 0.0)
    assert scheme.has_reflection(text) == bool(expected_counts)


def test_reflection_metrics_zero_denominators():
    all_correct_no_reflection = scheme.reflection_metrics(["a", "b"], [True, True])
    assert all_correct_no_reflection["reflection_ratio"] == 0.0
    assert all_correct_no_reflection["reflection_ratio_in_incorrect_answers"] == 0.0  # N - N+ = 0
    assert all_correct_no_reflection["correct_ratio_in_reflection_texts"] == 0.0  # N_ref = 0
    assert all_correct_no_reflection["correct_ratio_in_no_reflection_texts"] == 1.0

    all_wrong_all_reflect = scheme.reflection_metrics(["wait", "yet"], [False, False])
    assert all_wrong_all_reflect["reflection_ratio_in_correct_answers"] == 0.0  # N+ = 0
    assert all_wrong_all_reflect["correct_ratio_in_no_reflection_texts"] == 0.0  # N - N_ref = 0
    assert all_wrong_all_reflect["reflection_ratio_in_incorrect_answers"] == 1.0

    empty = scheme.reflection_metrics([], [])
    assert all(value == 0.0 for value in empty.values())
    assert len(empty) == 5 + 15


def test_reflection_metrics_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 texts but 1"):
        scheme.reflection_metrics(["a", "b"], [True])


def test_pass_at_k_on_fixed_fake_generations():
    correct_matrix = [
        [False, False, True],
        [False, False, False],
        [True, True, True],
        [False, True, False],
    ]
    assert scheme.pass_at_k_per_prompt(correct_matrix) == [True, False, True, True]
    assert scheme.pass_at_k(correct_matrix) == 0.75
    assert scheme.pass_at_k([[row[0]] for row in correct_matrix]) == 0.25  # pass@1 = accuracy
    assert scheme.pass_at_k([]) == 0.0
    assert scheme.pass_at_k([[], [True]]) == 0.5  # a prompt without samples is not passed


def test_summarize_over_epochs():
    summary = scheme.summarize_over_epochs({2: 0.6, 0: 0.3, 1: 0.4, 3: 0.5})
    assert summary == {"untrained": 0.3, "mean": pytest.approx(0.5), "max": 0.6}
    no_untrained = scheme.summarize_over_epochs({1: 0.2, 2: 0.4})
    assert math.isnan(no_untrained["untrained"])
    assert no_untrained["mean"] == pytest.approx(0.3)
    only_untrained = scheme.summarize_over_epochs({0: 0.7})
    assert only_untrained["untrained"] == 0.7
    assert math.isnan(only_untrained["mean"]) and math.isnan(only_untrained["max"])


def test_mean_std_over_seeds_uses_ddof_zero():
    mean, std = scheme.mean_std_over_seeds([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(1.25))  # ddof=1 would give 1.29
    assert scheme.mean_std_over_seeds([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError, match="no values"):
        scheme.mean_std_over_seeds([])


def test_summarize_over_seeds_averages_per_seed_summaries():
    seeds = [{0: 0.2, 1: 0.4, 2: 0.8}, {0: 0.2, 1: 0.5, 2: 0.5}]
    table = scheme.summarize_over_seeds(seeds)
    assert table["untrained"] == (pytest.approx(0.2), 0.0)
    assert table["mean"] == (pytest.approx(0.55), pytest.approx(0.05))  # per-seed means 0.6, 0.5
    assert table["max"] == (pytest.approx(0.65), pytest.approx(0.15))  # per-seed maxima 0.8, 0.5
