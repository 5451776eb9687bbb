"""maye_jax/algorithms.py against straightforward NumPy loops (float64 references)."""

import functools
import threading

import jax
import numpy as np
import pytest

from maye_jax.rl import advantages as algorithms
from maye_jax.rl.advantages import (
    AdvantageConfig,
    compute_advantages,
    discounted_returns,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def random_batch(seed: int, batch: int = 8, length: int = 7, empty_rows=(2,)):
    """Right-padded responses with random lengths, some all-padding rows, garbage on padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length  # one full-length (truncated) response
    lengths[list(empty_rows)] = 0
    mask = np.arange(length)[None, :] < lengths[:, None]  # [B, T]
    logprobs = -rng.exponential(1.0, size=(batch, length))
    ref_logprobs = logprobs + rng.normal(0.0, 0.5, size=(batch, length))
    # Padding holds garbage that must never reach a result.
    logprobs[~mask] = 1e4
    ref_logprobs[~mask] = -1e4
    scores = rng.integers(0, 2, size=batch).astype(np.float64) + rng.normal(0, 0.1, size=batch)
    return scores, mask, logprobs.astype(np.float32), ref_logprobs.astype(np.float32)


def valid_positions(mask_row):
    return [t for t in range(len(mask_row)) if mask_row[t]]


# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------


def reference_kl(logp, logp_ref, kind, low=-10.0, high=10.0):
    logp, logp_ref = float(logp), float(logp_ref)
    if kind == "k1":
        value = logp - logp_ref
    elif kind == "k2":
        value = 0.5 * (logp - logp_ref) ** 2
    else:
        d = logp_ref - logp
        value = np.exp(d) - 1.0 - d
    return min(max(value, low), high)


def reference_token_rewards(scores, kl, mask, coeff):
    rewards = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        positions = valid_positions(mask[i])
        for t in positions:
            rewards[i, t] = -coeff * kl[i, t]
        if positions:
            rewards[i, positions[-1]] += scores[i]
    return rewards


def reference_returns(rewards, mask, gamma):
    returns = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        positions = valid_positions(mask[i])
        for t in positions:
            returns[i, t] = sum(gamma ** (k - t) * rewards[i, k] for k in positions if k >= t)
    return returns


def reference_whiten(values, mask, shift_mean, eps=1e-8):
    selected = np.array(
        [values[i, t] for i in range(mask.shape[0]) for t in valid_positions(mask[i])]
    )
    mean = selected.mean()
    var = selected.var(ddof=1)
    out = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        for t in valid_positions(mask[i]):
            out[i, t] = (values[i, t] - mean) / np.sqrt(var + eps) + (mean if shift_mean else 0.0)
    return out


def reference_reinforce_pp(scores, mask, logp, logp_ref, coeff, gamma, whiten, shift_mean):
    kl = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        for t in valid_positions(mask[i]):
            kl[i, t] = reference_kl(logp[i, t], logp_ref[i, t], "k3")
    returns = reference_returns(reference_token_rewards(scores, kl, mask, coeff), mask, gamma)
    return reference_whiten(returns, mask, shift_mean) if whiten else returns


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_reference(kind):
    rng = np.random.default_rng(0)
    logp = -rng.exponential(2.0, size=(5, 6)).astype(np.float32)
    logp_ref = (logp + rng.normal(0.0, 6.0, size=(5, 6))).astype(np.float32)
    expected = np.vectorize(lambda a, b: reference_kl(a, b, kind))(logp, logp_ref)
    assert np.abs(expected).max() == 10.0, "inputs should exercise the clamp"
    np.testing.assert_allclose(kl_estimate(logp, logp_ref, kind=kind), expected, **TOLERANCE)
    jitted = jax.jit(functools.partial(kl_estimate, kind=kind))
    np.testing.assert_allclose(jitted(logp, logp_ref), expected, **TOLERANCE)


def test_kl_estimate_clamp_boundaries():
    logp = np.zeros(5, np.float32)
    # k1 = logp - ref: 12 -> 10, -12 -> -10, exactly 10 stays, 9.5 stays, -10 stays.
    ref = np.array([-12.0, 12.0, -10.0, -9.5, 10.0], np.float32)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k1"), [10, -10, 10, 9.5, -10], rtol=1e-6)
    # k3 with d = ref - logp: d=3 -> e^3 - 4 = 16.09 -> 10; d=-15 -> 14 -> 10; d=-5 -> 4.0067.
    ref = np.array([3.0, -15.0, -5.0, 0.0, 0.5], np.float32)
    unclamped = np.exp(ref) - 1 - ref
    np.testing.assert_allclose(
        kl_estimate(logp, ref, "k3"), np.minimum(unclamped, 10.0), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(kl_estimate(logp, ref, "k3", clamp=None), unclamped, rtol=1e-5)
    np.testing.assert_allclose(
        kl_estimate(logp, ref, "k3", clamp=(0.5, 5.0)), np.clip(unclamped, 0.5, 5.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        kl_estimate(logp, ref, "k3", clamp=2.0), np.clip(unclamped, -2, 2), rtol=1e-6
    )
    # A clamped token has no gradient; an unclamped one has d/dlogp (e^d - 1 - d) = 1 - e^d.
    gradient = jax.grad(lambda lp: kl_estimate(lp, ref, "k3").sum())(logp)
    np.testing.assert_allclose(gradient, [0, 0, 1 - np.exp(-5.0), 0, 1 - np.exp(0.5)], rtol=1e-5)


@pytest.mark.parametrize("clamp", [10.0, None])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_gradient_is_finite_for_every_finite_log_ratio(kind, clamp):
    # ref - logp above ~88 overflowed k3's exp() in fp32: the clamped value was finite but the
    # gradient was 0 x inf = NaN. k3's log-ratio is now clipped to [-20, 20] before exp; k1 and
    # k2 take no exp and use the log-ratio as it is.
    logp = np.array([-100.0, 0.0, -2.0, -0.5], np.float32)
    ref = original_ref = np.array([0.0, -100.0, -5.0, -0.25], np.float32)
    value, gradient = jax.value_and_grad(lambda lp: kl_estimate(lp, ref, kind, clamp).sum())(logp)
    gradient = np.asarray(gradient)
    assert np.isfinite(float(value)) and np.all(np.isfinite(gradient)), gradient
    log_ratio = (logp - ref).astype(np.float64)
    analytic = {"k1": np.ones(4), "k2": log_ratio, "k3": 1 - np.exp(-log_ratio)}[kind]
    np.testing.assert_allclose(gradient[2:], analytic[2:], rtol=1e-5)
    if kind == "k3" or clamp is not None:
        # Beyond k3's clip or the clamp the token gets no gradient.
        np.testing.assert_array_equal(gradient[:2], 0.0)
    else:  # k1 / k2 unclamped: exact at +-100 too
        np.testing.assert_allclose(gradient[:2], analytic[:2], rtol=1e-6)
    # The value: k3's beyond its clip is the estimator at +-20; then the usual clamp.
    if kind == "k3":  # the log-ratio clipped to [-20, 20]
        ref = logp + np.clip(ref - logp, -20.0, 20.0)
    expected = [reference_kl(lp, r, kind, -np.inf, np.inf) for lp, r in zip(logp, ref)]
    expected = np.clip(expected, -clamp, clamp) if clamp else expected
    np.testing.assert_allclose(kl_estimate(logp, original_ref, kind, clamp), expected, rtol=1e-6)
    # Even a log-ratio of 1e30 gives a finite gradient where an exp or a clamp is involved.
    huge = jax.grad(lambda lp: kl_estimate(lp, np.float32(0.0), kind, 10.0))(np.float32(-1e30))
    assert float(huge) == 0.0


def test_k1_and_k2_are_not_clipped_without_a_clamp_and_k3_keeps_its_clip():
    """With `kl_clamp=None` the k1 and k2 estimates are exact (verl's, which clip neither); k3
    keeps the [-20, 20] clip of its log-ratio before exp (verl's low_var_kl does the same)."""
    zero, ref = np.float32(0.0), np.float32(-30.0)
    k1, k1_gradient = jax.value_and_grad(lambda lp: kl_estimate(lp, ref, "k1", None))(zero)
    assert (float(k1), float(k1_gradient)) == (30.0, 1.0)
    k2, k2_gradient = jax.value_and_grad(lambda lp: kl_estimate(lp, ref, "k2", None))(zero)
    assert (float(k2), float(k2_gradient)) == (450.0, 30.0)
    k3, k3_gradient = jax.value_and_grad(lambda lp: kl_estimate(lp, ref, "k3", None))(zero)
    np.testing.assert_allclose(float(k3), np.exp(-20.0) - 1 + 20, rtol=1e-6)  # d clipped to -20
    assert float(k3_gradient) == 0.0
    # The default clamp of 10 still bounds all three.
    assert [float(kl_estimate(zero, ref, kind)) for kind in ("k1", "k2", "k3")] == [10.0] * 3


def test_kl_estimate_rejects_unknown_kind_and_bad_bounds():
    with pytest.raises(ValueError, match="k4.*k1"):
        kl_estimate(np.zeros(2), np.zeros(2), kind="k4")
    with pytest.raises(ValueError, match="low <= high"):
        kl_estimate(np.zeros(2), np.zeros(2), clamp=(1.0, -1.0))


# ---------------------------------------------------------------------------------------------
# Rewards and returns
# ---------------------------------------------------------------------------------------------


def test_token_rewards_places_score_at_last_valid_token():
    scores, mask, logp, logp_ref = random_batch(seed=1)
    kl = np.random.default_rng(1).normal(size=mask.shape).astype(np.float32)
    kl[~mask] = np.nan  # never read
    rewards = np.asarray(token_rewards(scores, kl, mask, kl_reward_coeff=0.05))
    np.testing.assert_allclose(
        rewards, reference_token_rewards(scores, kl, mask, 0.05), **TOLERANCE
    )
    assert np.all(rewards[2] == 0.0), "an all-padding row gets no reward"
    no_kl = np.asarray(jax.jit(token_rewards)(scores, None, mask))
    lengths = mask.sum(axis=1)
    for i in range(len(scores)):
        expected_row = np.zeros(mask.shape[1])
        if lengths[i]:
            expected_row[lengths[i] - 1] = scores[i]
        np.testing.assert_allclose(no_kl[i], expected_row, rtol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_matches_reference(gamma):
    _, mask, _, _ = random_batch(seed=2)
    rewards = np.random.default_rng(2).normal(size=mask.shape)
    rewards[~mask] = 1e6  # garbage
    returns = jax.jit(discounted_returns, static_argnums=2)(rewards, mask, gamma)
    np.testing.assert_allclose(returns, reference_returns(rewards, mask, gamma), **TOLERANCE)


def test_discounted_returns_hand_computed():
    rewards = np.array([[1.0, 2.0, 3.0, 0.0]])
    mask = np.array([[True, True, True, False]])
    np.testing.assert_allclose(discounted_returns(rewards, mask), [[6, 5, 3, 0]])
    np.testing.assert_allclose(discounted_returns(rewards, mask, 0.5), [[2.75, 3.5, 3, 0]])
    # A hole in the mask (not produced by rollouts) is skipped: the discount counts valid tokens.
    holey_mask = np.array([[True, False, True, False]])
    np.testing.assert_allclose(discounted_returns(rewards, holey_mask, 0.5), [[2.5, 0, 3, 0]])


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def test_masked_mean_and_var_match_numpy():
    _, mask, logp, _ = random_batch(seed=3)
    selected = logp[mask].astype(np.float64)
    np.testing.assert_allclose(masked_mean(logp, mask), selected.mean(), rtol=1e-6)
    np.testing.assert_allclose(masked_var(logp, mask), selected.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(masked_var(logp, mask, unbiased=False), selected.var(), rtol=1e-5)
    row_means = [logp[i, mask[i]].mean() if mask[i].any() else 0.0 for i in range(len(mask))]
    np.testing.assert_allclose(masked_mean(logp, mask, axis=1), row_means, rtol=1e-6)


def test_masked_statistics_guard_small_counts():
    values = np.array([[3.0, 7.0, np.inf]])
    assert float(masked_mean(values, np.zeros((1, 3), bool))) == 0.0
    one_token = np.array([[False, True, False]])
    assert float(masked_mean(values, one_token)) == 7.0
    assert float(masked_var(values, one_token)) == 0.0  # Bessel with one token: no spread, not inf
    assert float(masked_var(values, np.zeros((1, 3), bool))) == 0.0
    np.testing.assert_allclose(masked_whiten(values, one_token), [[0.0, 7.0, 0.0]])


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shift_mean):
    _, mask, logp, _ = random_batch(seed=4)
    whitened = np.asarray(masked_whiten(logp, mask, shift_mean=shift_mean))
    np.testing.assert_allclose(whitened, reference_whiten(logp, mask, shift_mean), **TOLERANCE)
    selected = logp[mask].astype(np.float64)
    expected_mean = selected.mean() if shift_mean else 0.0
    np.testing.assert_allclose(whitened[mask].mean(), expected_mean, atol=1e-5)
    np.testing.assert_allclose(whitened[mask].var(ddof=1), 1.0, rtol=1e-5)
    assert np.all(whitened[~mask] == 0.0)


# ---------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "coeff, gamma, whiten, shift_mean",
    [(0.0, 1.0, True, True), (0.1, 1.0, True, False), (0.1, 0.95, False, True)],
)
def test_reinforce_pp_matches_reference(coeff, gamma, whiten, shift_mean):
    scores, mask, logp, logp_ref = random_batch(seed=5)
    config = AdvantageConfig(
        kl_reward_coeff=coeff, gamma=gamma, whiten=whiten, shift_mean=shift_mean
    )
    advantages = compute_advantages(
        "reinforce_pp",
        scores=scores,
        response_mask=mask,
        logprobs=logp,
        ref_logprobs=logp_ref,
        config=config,
    )
    expected = reference_reinforce_pp(
        scores, mask, logp, logp_ref, coeff, gamma, whiten, shift_mean
    )
    np.testing.assert_allclose(advantages, expected, **TOLERANCE)


def across_processes(row_counts, compute):
    """`compute(rows, global_sum)` run by one thread per simulated process on its own slice
    of rows (`row_counts` each, in process order), with a `global_sum` that, like the real
    collective (multihost.global_sum), returns the sum of every process's values to each;
    returns the processes' results concatenated in process order."""
    processes = len(row_counts)
    barrier = threading.Barrier(processes, timeout=60)
    handed = [None] * processes
    results = [None] * processes
    starts = np.cumsum([0, *row_counts])

    def run(p):
        def global_sum(values):
            handed[p] = np.asarray(values, np.float64)
            barrier.wait()  # every process has handed its values
            total = np.sum(handed, axis=0)
            barrier.wait()  # every process has read them before the next call
            return total

        results[p] = np.asarray(compute(slice(starts[p], starts[p + 1]), global_sum))

    threads = [threading.Thread(target=run, args=(p,)) for p in range(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r is not None for r in results), "a simulated process failed"
    return np.concatenate(results)


@pytest.mark.parametrize(
    "row_counts, coeff, gamma, shift_mean",
    [((4, 4), 0.0, 1.0, True), ((3, 5), 0.1, 0.95, True), ((1, 2, 5), 0.1, 1.0, False)],
)
def test_whitening_across_processes_equals_whitening_the_concatenated_rows(
    row_counts, coeff, gamma, shift_mean
):
    """Each process whitens its own rows with every process's statistics (`global_sum`): the
    result is the NumPy reference's whitening over all rows together, whatever the split
    (uneven row counts, an empty row on one process), and not each process's own whitening."""
    scores, mask, logp, logp_ref = random_batch(seed=11, batch=sum(row_counts))
    config = AdvantageConfig(kl_reward_coeff=coeff, gamma=gamma, shift_mean=shift_mean)

    def advantages(rows, global_sum=None):
        return compute_advantages(
            "reinforce_pp",
            scores=scores[rows],
            response_mask=mask[rows],
            logprobs=logp[rows],
            ref_logprobs=logp_ref[rows],
            config=config,
            global_sum=global_sum,
        )

    ours = across_processes(row_counts, advantages)
    expected = reference_reinforce_pp(scores, mask, logp, logp_ref, coeff, gamma, True, shift_mean)
    np.testing.assert_allclose(ours, expected, **TOLERANCE)
    assert np.all(ours[~mask] == 0.0)
    # each process whitening its rows alone gives other advantages: the test can tell them apart
    starts = np.cumsum([0, *row_counts])
    alone = np.concatenate(
        [np.asarray(advantages(slice(a, b))) for a, b in zip(starts[:-1], starts[1:])]
    )
    assert np.abs(alone - expected).max() > 0.1


def test_reinforce_pp_needs_logprobs_for_kl_reward():
    scores, mask, _, _ = random_batch(seed=5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        compute_advantages(
            "reinforce_pp",
            scores=scores,
            response_mask=mask,
            config=AdvantageConfig(kl_reward_coeff=0.1),
        )


# Three prompts x four samples; the middle group all correct (no signal).
GROUP_SCORES = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
GROUP_MASK = np.arange(5)[None, :] < np.array([5, 3, 1, 0, 5, 2, 4, 1, 2, 5, 3, 1])[:, None]


def group_advantages(name, **config):
    advantages = compute_advantages(
        name,
        scores=GROUP_SCORES,
        response_mask=GROUP_MASK,
        num_samples_per_prompt=4,
        config=AdvantageConfig(**config),
    )
    advantages = np.asarray(advantages)
    assert np.all(advantages[~GROUP_MASK] == 0.0)
    for i in range(len(GROUP_SCORES)):  # one value per sequence, on every valid token
        valid = advantages[i, GROUP_MASK[i]]
        assert np.all(valid == valid[:1])
    return np.array(
        [row[m][0] if m.any() else 0.0 for row, m in zip(advantages, GROUP_MASK, strict=True)]
    )


def test_grpo_hand_computed_groups():
    # Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) -> +-0.5 * sqrt(3) = +-0.8660.
    # Group [0, 0, 0, 1]: mean 0.25, unbiased std 0.5 -> -0.5 and 1.5.
    a = 0.5 * np.sqrt(3.0)
    expected = [a, -a, -a, 0.0, 0, 0, 0, 0, -0.5, -0.5, -0.5, 1.5]  # row 3 is all padding
    np.testing.assert_allclose(group_advantages("grpo", grpo_eps=0.0), expected, rtol=1e-6)
    # With the default eps the division is by (std + 1e-6).
    np.testing.assert_allclose(
        group_advantages("grpo")[8:],
        np.array([-0.25, -0.25, -0.25, 0.75]) / (0.5 + 1e-6),
        rtol=1e-6,
    )
    dr_grpo = group_advantages("grpo", grpo_scale_by_std=False)
    np.testing.assert_allclose(dr_grpo, [0.5, -0.5, -0.5, 0, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75])


def test_rloo_hand_computed_groups():
    # Score minus the mean of the other three: [1, 0, 0, 1] -> 1 - 1/3, 0 - 2/3, ...
    expected = [2 / 3, -2 / 3, -2 / 3, 0.0, 0, 0, 0, 0, -1 / 3, -1 / 3, -1 / 3, 1.0]
    np.testing.assert_allclose(group_advantages("rloo"), expected, rtol=1e-6, atol=1e-7)


def test_reinforce_pp_baseline_is_reinforce_pp_on_centered_scores():
    scores, mask, logp, logp_ref = random_batch(seed=6)
    config = AdvantageConfig(kl_reward_coeff=0.05, shift_mean=False)
    centered = scores - scores.reshape(4, 2).mean(axis=1).repeat(2)
    advantages = compute_advantages(
        "reinforce_pp_baseline",
        scores=scores,
        response_mask=mask,
        logprobs=logp,
        ref_logprobs=logp_ref,
        num_samples_per_prompt=2,
        config=config,
    )
    expected = reference_reinforce_pp(centered, mask, logp, logp_ref, 0.05, 1.0, True, False)
    np.testing.assert_allclose(advantages, expected, **TOLERANCE)


def test_group_estimators_validate_groups():
    with pytest.raises(ValueError, match="divide the batch size 12"):
        compute_advantages(
            "grpo", scores=GROUP_SCORES, response_mask=GROUP_MASK, num_samples_per_prompt=5
        )
    for name in ("grpo", "rloo", "reinforce_pp_baseline"):
        with pytest.raises(ValueError, match="num_samples_per_prompt >= 2"):
            compute_advantages(name, scores=GROUP_SCORES, response_mask=GROUP_MASK)
    with pytest.raises(ValueError, match="kl_reward_coeff=0"):
        group_advantages("grpo", kl_reward_coeff=0.1)
    with pytest.raises(ValueError, match=r"expected scores \[B\]"):
        compute_advantages("grpo", scores=GROUP_SCORES[:4], response_mask=GROUP_MASK)


def test_unknown_estimator_lists_known_names():
    with pytest.raises(ValueError, match="'ppo'.*grpo, reinforce_pp, reinforce_pp_baseline, rloo"):
        compute_advantages("ppo", scores=GROUP_SCORES, response_mask=GROUP_MASK)


def test_registering_a_new_estimator():
    name = "test_only_score_times_position"

    @algorithms.register_advantage_estimator(name)
    def score_times_position(
        *, scores, response_mask, logprobs, ref_logprobs, num_samples_per_prompt, config
    ):
        positions = np.arange(response_mask.shape[1])[None, :]
        return np.where(response_mask, scores[:, None] * positions * config.gamma, 0.0)

    try:
        assert name in algorithms.advantage_estimator_names()
        advantages = compute_advantages(
            name, scores=GROUP_SCORES, response_mask=GROUP_MASK, config=AdvantageConfig(gamma=2.0)
        )
        expected = np.where(GROUP_MASK, GROUP_SCORES[:, None] * np.arange(5) * 2.0, 0.0)
        np.testing.assert_allclose(advantages, expected)
        with pytest.raises(ValueError, match="already registered"):
            algorithms.register_advantage_estimator(name)(score_times_position)
    finally:
        algorithms._ADVANTAGE_ESTIMATORS.pop(name)


def test_compute_advantages_under_jit_matches_eager():
    for name, config in [("grpo", AdvantageConfig()), ("reinforce_pp", AdvantageConfig())]:
        run = functools.partial(compute_advantages, name, num_samples_per_prompt=4, config=config)
        eager = run(scores=GROUP_SCORES, response_mask=GROUP_MASK)
        jitted = jax.jit(run)(scores=GROUP_SCORES, response_mask=GROUP_MASK)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Groups whose scores are all equal, but not exact in fp32
# ---------------------------------------------------------------------------------------------

# 1.0 minus a language penalty: not exact in binary floating point.
PENALISED = np.float32(1.0) - np.float32(0.1) * np.float32(3) / np.float32(37)


def inexact_groups():
    """Four groups of 16: all 0.7 (its fp32 mean is one ulp off), all PENALISED, all 0.1, and one
    with a small but real difference (must keep its signal)."""
    small = np.full(16, 0.7, np.float32)
    small[3] = 0.701  # group std 2.5e-4: a std threshold would wrongly zero it
    groups = [np.full(16, 0.7), np.full(16, PENALISED), np.full(16, 0.1), small]
    scores = np.concatenate(groups).astype(np.float32)
    lengths = np.arange(len(scores)) % 5  # ragged, with all-padding rows
    mask = np.arange(5)[None, :] < lengths[:, None]
    return scores, mask


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_groups_with_equal_inexact_scores_get_exactly_zero_advantage(name):
    scores, mask = inexact_groups()
    config = AdvantageConfig(whiten=False)  # baseline: the returns are the baselined score
    advantages = np.asarray(
        compute_advantages(
            name, scores=scores, response_mask=mask, num_samples_per_prompt=16, config=config
        )
    )
    assert np.all(advantages[:48] == 0.0), np.abs(advantages[:48]).max()
    # The group with a small real difference keeps its (reference-checked) advantage.
    group = scores[48:].astype(np.float64)
    if name == "grpo":
        expected = (group - group.mean()) / (group.std(ddof=1) + 1e-6)
    elif name == "rloo":
        expected = group - (group.sum() - group) / 15
    else:
        expected = group - group.mean()
    last = advantages[48:]
    rows = mask[48:].any(axis=1)
    actual = np.array([row[m][0] for row, m in zip(last[rows], mask[48:][rows], strict=True)])
    assert np.all(actual != 0.0)
    # 5e-3: the deviations from the group mean (~6e-5) are 1e4 times smaller than the scores
    # (0.7), so fp32's rounding of the scores (6e-8) is ~1e-3 of a deviation (float64 here).
    np.testing.assert_allclose(actual, expected[rows], rtol=5e-3)


def test_equal_group_check_is_exact_equality_not_a_small_std():
    # fp32 arithmetic on equal scores gives an ulp-sized mean error: without the exact check,
    # GRPO divides it by (std + eps) ~ 1.2e-6 and the 0.7 group gets ~0.1 instead of 0.
    group = np.full((1, 16), 0.7, np.float32)
    ulp_error = group - np.float32(jax.numpy.mean(group))
    assert np.all(ulp_error != 0.0), "the fp32 mean of 16 x 0.7 is one ulp off (the bug's cause)"
    scores, mask = inexact_groups()
    grpo = compute_advantages("grpo", scores=scores, response_mask=mask, num_samples_per_prompt=16)
    assert float(np.abs(np.asarray(grpo)[:16]).max()) == 0.0
