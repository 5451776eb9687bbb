"""maye_jax/rl/dynamic_sampling.py: which groups an update batch keeps, tops up and refills."""

import numpy as np
import pytest

from maye_jax.rl.dynamic_sampling import PromptGroups, fill_batch, top_up_seed


def groups(prompt_ids, scores_per_prompt):
    """Prompt groups of 2 samples; `scores_per_prompt[i]` are prompt i's two total scores."""
    completions = [[f"{p}/a", f"{p}/b"] for p in prompt_ids]
    totals = [float(x) for pair in scores_per_prompt for x in pair]
    return PromptGroups(
        records=list(prompt_ids),
        encoded=[f"enc-{p}" for p in prompt_ids],
        completions=completions,
        rewards={"accuracy": [float(x >= 1.0) for x in totals], "total": totals},
    )


class FakeSampler:
    """Serves prompts 100, 101, ... with scripted scores; records each request."""

    def __init__(self, scores, available):
        self.scores = list(scores)  # one (score, score) pair per prompt, in serving order
        self.available = available
        self.requests = []
        self.next_prompt = 100

    def __call__(self, count, round_index):
        self.requests.append((count, round_index))
        count = min(count, self.available)
        if count == 0:
            return None
        self.available -= count
        served = groups(range(self.next_prompt, self.next_prompt + count), self.scores[:count])
        self.scores, self.next_prompt = self.scores[count:], self.next_prompt + count
        return served


EQUAL, MIXED = (1.0, 1.0), (1.0, 0.0)
PENALISED = (0.9, 0.9)  # equal but inexact: still one score


def test_informative_is_exact_inequality_of_total_scores():
    g = groups(range(4), [EQUAL, MIXED, PENALISED, (0.7, 0.7 + 1e-6)])
    np.testing.assert_array_equal(g.informative(), [False, True, False, True])


def test_drops_equal_groups_and_tops_up_with_the_next_prompts():
    first = groups(range(4), [EQUAL, MIXED, (0.0, 0.0), MIXED])  # 2 informative of 4
    sampler = FakeSampler([MIXED, EQUAL, MIXED], available=10)
    batch, metrics, sampled = fill_batch(first, wanted=4, sample_more=sampler, max_rounds=5)
    # round 1 asks for the 2 missing groups: 100 informative, 101 not; round 2 asks for 1: 102.
    assert sampler.requests == [(2, 1), (1, 2)]
    assert batch.records == [1, 3, 100, 102]
    assert batch.completions == [
        ["1/a", "1/b"],
        ["3/a", "3/b"],
        ["100/a", "100/b"],
        ["102/a", "102/b"],
    ]
    assert batch.rewards["total"] == [1.0, 0.0] * 4 and len(batch.encoded) == 4
    assert sampled.records == [0, 1, 2, 3, 100, 101, 102]
    assert metrics == {
        "dynamic_sampling/groups_dropped": 3.0,
        "dynamic_sampling/groups_refilled": 0.0,
        "dynamic_sampling/extra_prompts": 3.0,
        "dynamic_sampling/rounds": 2.0,
    }


def test_refills_with_dropped_groups_after_the_round_limit():
    first = groups(range(4), [EQUAL, MIXED, (0.0, 0.0), EQUAL])
    sampler = FakeSampler([EQUAL] * 10, available=10)
    batch, metrics, _ = fill_batch(first, wanted=4, sample_more=sampler, max_rounds=2)
    assert sampler.requests == [(3, 1), (3, 2)]
    # the one informative group, then the earliest dropped ones: 0, 2, 3 (of the first round)
    assert batch.records == [1, 0, 2, 3]
    assert metrics["dynamic_sampling/groups_refilled"] == 3.0
    assert metrics["dynamic_sampling/groups_dropped"] == 6.0  # 3 of round 0 + 6 sampled - 3
    assert metrics["dynamic_sampling/extra_prompts"] == 6.0


def test_stops_when_the_epoch_has_no_prompt_left():
    first = groups(range(2), [EQUAL, EQUAL])
    sampler = FakeSampler([MIXED, MIXED, MIXED], available=1)
    batch, metrics, sampled = fill_batch(first, wanted=2, sample_more=sampler, max_rounds=10)
    assert sampler.requests == [(2, 1), (1, 2)]  # the second request finds the epoch empty
    assert batch.records == [100, 0] and sampled.records == [0, 1, 100]
    assert metrics["dynamic_sampling/rounds"] == 1.0
    assert metrics["dynamic_sampling/groups_refilled"] == 1.0


def test_a_full_first_round_samples_nothing_more():
    first = groups(range(3), [MIXED, MIXED, (0.5, 0.0)])
    sampler = FakeSampler([], available=10)
    batch, metrics, sampled = fill_batch(first, wanted=3, sample_more=sampler, max_rounds=3)
    assert sampler.requests == [] and batch.records == [0, 1, 2] and sampled is first
    assert set(metrics.values()) == {0.0}
    with pytest.raises(ValueError, match="holds 3 groups, not 4"):
        fill_batch(first, wanted=4, sample_more=sampler, max_rounds=3)


def test_top_up_seeds_differ_by_round_and_step():
    seeds = {top_up_seed(0, step, r) for step in (1, 2) for r in (1, 2, 3)}
    assert len(seeds) == 6 and all(0 <= s < 2**31 for s in seeds)
    assert top_up_seed(0, 1, 1) == top_up_seed(0, 1, 1)
