"""maye_jax/losses.py against NumPy loops, and exactness of gradient accumulation.

Over ~500 lines on purpose: each loss, aggregation and estimator against its NumPy loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maye_jax.rl import losses
from maye_jax.rl.losses import (
    LossConfig,
    aggregate_loss,
    finalize_metrics,
    kl_token_loss,
    loss_normalizer,
    policy_objective,
    ppo_clip_loss,
    sum_metrics,
    truncated_is_weight,
)

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def random_loss_batch(seed: int, batch: int = 8, length: int = 6):
    """A mini-batch of right-padded responses (two all-padding rows), garbage on padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    lengths[[3, 6]] = 0
    mask = np.arange(length)[None, :] < lengths[:, None]  # [B, T]

    def logprobs_near(base, scale):
        return (base + rng.normal(0.0, scale, size=base.shape)).astype(np.float32)

    logprobs_old = -rng.exponential(1.0, size=(batch, length)).astype(np.float32)
    batch_arrays = {
        "logprobs": logprobs_near(logprobs_old, 0.3),  # ratios well outside [0.8, 1.2] too
        "logprobs_old": logprobs_old,
        "ref_logprobs": logprobs_near(logprobs_old, 1.5),  # some k3 values above the clamp
        "logprobs_rollout": logprobs_near(logprobs_old, 0.5),  # some IS weights above the cap
        "advantages": rng.normal(0.0, 1.0, size=(batch, length)).astype(np.float32),
    }
    for name, values in batch_arrays.items():
        values[~mask] = 1e4 if name == "logprobs" else -1e4  # garbage, never read
    return batch_arrays, mask


# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------


def reference_token_terms(arrays, mask, config):
    """Per valid token: (policy loss incl. IS weight, clamped k3, clip low, clip high, ratio)."""
    terms = {}
    for i, t in zip(*np.nonzero(mask), strict=True):
        logp, old = float(arrays["logprobs"][i, t]), float(arrays["logprobs_old"][i, t])
        ref, rollout = float(arrays["ref_logprobs"][i, t]), float(arrays["logprobs_rollout"][i, t])
        advantage = float(arrays["advantages"][i, t])
        ratio = np.exp(logp - old)
        low, high = 1 - config.clip_eps_low, 1 + config.clip_eps_high
        policy = max(-advantage * ratio, -advantage * min(max(ratio, low), high))
        if config.clip_ratio_c is not None and advantage < 0:  # dual-clip (Ye et al. 2020)
            policy = min(policy, -advantage * config.clip_ratio_c)
        if config.rollout_is_cap is not None:
            policy *= min(np.exp(old - rollout), config.rollout_is_cap)
        d = ref - logp
        kl = {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - 1 - d}[config.kl_loss_estimator]
        k3 = min(max(kl, -10.0), 10.0)
        clipped_low = ratio < low and advantage < 0
        clipped_high = ratio > high and advantage > 0
        terms[i, t] = (policy, k3, clipped_low, clipped_high, ratio, 0.5 * (logp - old) ** 2)
    return terms


def reference_aggregate(token_values: dict, mask, mode, max_tokens):
    rows = [i for i in range(mask.shape[0]) if mask[i].any()]
    if mode == "token_mean":
        return sum(token_values.values()) / mask.sum()
    if mode == "seq_mean_token_mean":
        per_row = [
            sum(v for (i, _), v in token_values.items() if i == row) / mask[row].sum()
            for row in rows
        ]
        return sum(per_row) / len(rows)
    per_row = [sum(v for (i, _), v in token_values.items() if i == row) for row in rows]
    if mode == "seq_mean_token_sum":
        return sum(per_row) / len(rows)
    return sum(p / max_tokens for p in per_row) / len(rows)


def reference_objective(arrays, mask, config):
    terms = reference_token_terms(arrays, mask, config)
    policy = reference_aggregate(
        {k: v[0] for k, v in terms.items()}, mask, config.loss_agg, config.max_tokens
    )
    kl = reference_aggregate(
        {k: v[1] for k, v in terms.items()}, mask, config.loss_agg, config.max_tokens
    )
    return policy + config.kl_loss_coeff * kl, policy, kl, terms


# ---------------------------------------------------------------------------------------------
# Token-level pieces
# ---------------------------------------------------------------------------------------------


def test_ppo_clip_matches_reference_and_clipped_tokens_have_no_gradient():
    arrays, mask = random_loss_batch(seed=0)
    config = LossConfig(clip_eps_low=0.2, clip_eps_high=0.28, rollout_is_cap=None)
    terms = reference_token_terms(arrays, mask, config)

    def token_losses(logprobs):
        inputs = {k: arrays[k] for k in ("logprobs_old", "advantages")}
        return ppo_clip_loss(logprobs=logprobs, response_mask=mask, config=config, **inputs)

    losses_per_token, metrics = jax.jit(token_losses)(arrays["logprobs"])
    for column, name in enumerate(["loss", None, "clip_frac/low", "clip_frac/high", "ratio/mean"]):
        if name is None:
            continue
        expected = np.zeros(mask.shape)
        for (i, t), values in terms.items():
            expected[i, t] = values[column]
        actual = losses_per_token if name == "loss" else np.where(mask, metrics[name], 0.0)
        np.testing.assert_allclose(actual, expected, **TOLERANCE, err_msg=name)
    assert np.all(np.asarray(losses_per_token)[~mask] == 0.0)
    clipped = np.asarray(metrics["clip_frac/low"] + metrics["clip_frac/high"]) > 0
    assert metrics["clip_frac/low"].sum() > 0 and metrics["clip_frac/high"].sum() > 0
    assert np.sum(~clipped & mask) > 0
    # d/dlogp of -A * ratio is -A * ratio; clipped tokens get none; padding gets none.
    gradient = jax.grad(lambda lp: token_losses(lp)[0].sum())(arrays["logprobs"])
    ratio = np.exp(
        arrays["logprobs"] - arrays["logprobs_old"], where=mask, out=np.zeros(mask.shape)
    )
    expected_gradient = np.where(mask & ~clipped, -arrays["advantages"] * ratio, 0.0)
    np.testing.assert_allclose(gradient, expected_gradient, **TOLERANCE)


def test_ppo_clip_hand_computed():
    logprobs_old = np.zeros((1, 4), np.float32)
    ratio = np.array([[1.5, 0.5, 0.5, 1.1]], np.float32)
    advantages = np.array([[1.0, -1.0, 1.0, -2.0]], np.float32)
    token_losses, metrics = ppo_clip_loss(
        logprobs=np.log(ratio),
        logprobs_old=logprobs_old,
        advantages=advantages,
        response_mask=np.ones((1, 4), bool),
        config=LossConfig(),
    )
    # A=1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped high); A=-1, r=0.5: max(0.5, 0.8) = 0.8 (clipped
    # low); A=1, r=0.5: max(-0.5, -0.8) = -0.5 (not clipped); A=-2, r=1.1: 2.2 (inside the range).
    np.testing.assert_allclose(token_losses, [[-1.2, 0.8, -0.5, 2.2]], rtol=1e-6)
    np.testing.assert_array_equal(metrics["clip_frac/high"], [[1, 0, 0, 0]])
    np.testing.assert_array_equal(metrics["clip_frac/low"], [[0, 1, 0, 0]])
    np.testing.assert_allclose(metrics["approx_kl"], 0.5 * np.log(ratio) ** 2, rtol=1e-6)


def test_kl_token_loss_clamps_per_token():
    logprobs = np.array([[0.0, 0.0, 0.0, 1e4]], np.float32)
    ref_logprobs = np.array([[3.0, -0.5, -15.0, -1e4]], np.float32)  # k3: 16.09, 0.107, 14, pad
    mask = np.array([[True, True, True, False]])
    d = np.array([3.0, -0.5, -15.0])
    expected = np.minimum(np.exp(d) - 1 - d, 10.0)
    np.testing.assert_allclose(
        kl_token_loss(logprobs, ref_logprobs, mask)[0, :3], expected, rtol=1e-6
    )
    assert float(kl_token_loss(logprobs, ref_logprobs, mask)[0, 3]) == 0.0
    gradient = jax.grad(lambda lp: kl_token_loss(lp, ref_logprobs, mask).sum())(logprobs)
    np.testing.assert_allclose(gradient, [[0.0, 1 - np.exp(-0.5), 0.0, 0.0]], rtol=1e-5)
    loose = kl_token_loss(logprobs, ref_logprobs, mask, clamp=(0.0, 15.0))
    np.testing.assert_allclose(loose[0, :3], np.minimum(np.exp(d) - 1 - d, 15.0), rtol=1e-6)


def test_truncated_is_weight():
    arrays, mask = random_loss_batch(seed=1)
    weight = np.asarray(
        truncated_is_weight(arrays["logprobs_old"], arrays["logprobs_rollout"], mask, cap=2.0)
    )
    log_ratio = (arrays["logprobs_old"] - arrays["logprobs_rollout"]).astype(np.float64)
    expected = np.where(mask, np.minimum(np.exp(np.where(mask, log_ratio, 0.0)), 2.0), 0.0)
    np.testing.assert_allclose(weight, expected, rtol=1e-6)
    assert np.sum(weight == 2.0) > 0 and np.sum((weight > 0) & (weight < 1)) > 0


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def test_aggregation_hand_computed():
    token_losses = np.array([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [99.0] * 4])
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    # token_mean (1+2+3+4)/4; seq_mean_token_mean (2 + 4)/2; seq_mean_token_sum (6 + 4)/2;
    # seq_mean_token_sum_norm (6/4 + 4/4)/2.
    for mode, normalizer, loss in [
        ("token_mean", 4.0, 2.5),
        ("seq_mean_token_mean", 2.0, 3.0),
        ("seq_mean_token_sum", 2.0, 5.0),
        ("seq_mean_token_sum_norm", 8.0, 1.25),
    ]:
        assert float(loss_normalizer(mode, mask, max_tokens=4)) == normalizer
        value = aggregate_loss(mode, token_losses, mask, loss_normalizer(mode, mask, 4))
        np.testing.assert_allclose(value, loss, rtol=1e-6, err_msg=mode)
    assert float(aggregate_loss("token_mean", token_losses, np.zeros((3, 4)), 0.0)) == 0.0
    with pytest.raises(ValueError, match="'mean'.*seq_mean_token_sum, seq_mean_token_sum_norm"):
        loss_normalizer("mean", mask, 4)


@pytest.mark.parametrize("mode", MODES)
def test_policy_objective_matches_reference(mode):
    arrays, mask = random_loss_batch(seed=2)
    config = LossConfig(loss_agg=mode, max_tokens=6, kl_loss_coeff=0.1, rollout_is_cap=2.0)
    normalizer = loss_normalizer(mode, mask, config.max_tokens)
    loss, metrics = jax.jit(policy_objective, static_argnames="config")(
        **arrays, response_mask=mask, normalizer=normalizer, config=config
    )
    expected_loss, expected_policy, expected_kl, terms = reference_objective(arrays, mask, config)
    np.testing.assert_allclose(loss, expected_loss, **TOLERANCE)
    means = finalize_metrics(metrics)
    np.testing.assert_allclose(means["loss/total"], expected_loss, **TOLERANCE)
    np.testing.assert_allclose(means["loss/policy"], expected_policy, **TOLERANCE)
    np.testing.assert_allclose(means["loss/kl"], expected_kl, **TOLERANCE)
    token_means = np.mean(np.array(list(terms.values()), dtype=np.float64), axis=0)
    for column, name in [(1, "kl/k3"), (2, "clip_frac/low"), (3, "clip_frac/high")]:
        np.testing.assert_allclose(means[name], token_means[column], **TOLERANCE, err_msg=name)
    np.testing.assert_allclose(means["ratio/mean"], token_means[4], **TOLERANCE)
    np.testing.assert_allclose(means["approx_kl"], token_means[5], **TOLERANCE)
    assert 0.0 < float(means["is_weight/mean"]) <= 2.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_gradient_accumulation_is_exact(mode, micro_batch_size):
    """Micro-batches of 1, 2 or 4 of a mini-batch of 8 sum to the mini-batch's loss and gradient."""
    arrays, mask = random_loss_batch(seed=3)
    config = LossConfig(loss_agg=mode, max_tokens=6, kl_loss_coeff=0.1, rollout_is_cap=2.0)
    normalizer = loss_normalizer(mode, mask, config.max_tokens)  # over the whole mini-batch

    @jax.jit
    def loss_and_gradient(logprobs, other_arrays, micro_mask):
        def objective(logprobs):
            return policy_objective(
                logprobs=logprobs,
                **other_arrays,
                response_mask=micro_mask,
                normalizer=normalizer,
                config=config,
            )

        (loss, metrics), gradient = jax.value_and_grad(objective, has_aux=True)(logprobs)
        return loss, gradient, metrics

    others = {k: v for k, v in arrays.items() if k != "logprobs"}
    full_loss, full_gradient, full_metrics = loss_and_gradient(arrays["logprobs"], others, mask)

    accumulated_loss, gradients, accumulated_metrics, naive_loss = 0.0, [], None, 0.0
    for start in range(0, mask.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        micro_others = {k: v[rows] for k, v in others.items()}
        loss, gradient, metrics = loss_and_gradient(
            arrays["logprobs"][rows], micro_others, mask[rows]
        )
        accumulated_loss += loss
        gradients.append(gradient)
        accumulated_metrics = (
            metrics if accumulated_metrics is None else sum_metrics(accumulated_metrics, metrics)
        )
        # What normalizing each micro-batch on its own would give (the inexact way).
        micro_normalizer = loss_normalizer(mode, mask[rows], config.max_tokens)
        naive_loss += loss * normalizer / np.maximum(micro_normalizer, 1) / (8 / micro_batch_size)

    np.testing.assert_allclose(accumulated_loss, full_loss, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(gradients), full_gradient, rtol=0, atol=1e-6)
    assert np.abs(full_gradient).max() > 1e-3 and np.all(np.asarray(full_gradient)[~mask] == 0)
    full_means, accumulated_means = (
        finalize_metrics(full_metrics),
        finalize_metrics(accumulated_metrics),
    )
    for name, value in full_means.items():
        np.testing.assert_allclose(
            accumulated_means[name], value, rtol=1e-5, atol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(full_means["loss/total"], full_loss, rtol=1e-5, atol=1e-6)
    if not (mode != "token_mean" and micro_batch_size == 4):  # both halves hold 3 sequences
        assert abs(float(naive_loss) - float(full_loss)) > 1e-4, "the naive way should differ here"


def test_policy_objective_requires_inputs_its_config_uses():
    arrays, mask = random_loss_batch(seed=4)
    common = {k: arrays[k] for k in ("logprobs", "logprobs_old", "advantages")}
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_objective(**common, response_mask=mask, normalizer=1.0, config=LossConfig())
    with pytest.raises(ValueError, match="logprobs_rollout"):
        policy_objective(
            **common,
            response_mask=mask,
            normalizer=1.0,
            config=LossConfig(kl_loss_coeff=0.0, rollout_is_cap=2.0),
        )
    loss, metrics = policy_objective(
        **common, response_mask=mask, normalizer=1.0, config=LossConfig(kl_loss_coeff=0.0)
    )
    assert "loss/kl" not in metrics and "kl/k3" not in metrics
    np.testing.assert_allclose(metrics["loss/policy"][0], loss, rtol=1e-6)


def test_registering_a_new_policy_loss():
    name = "test_only_vanilla_pg"

    @losses.register_policy_loss(name)
    def vanilla_policy_gradient(*, logprobs, logprobs_old, advantages, response_mask, config):
        ratio = jnp.exp(jnp.where(response_mask, logprobs - logprobs_old, 0.0))
        token_losses = jnp.where(response_mask, -advantages * ratio, 0.0)
        return token_losses, {"ratio/max_test": ratio}

    try:
        arrays, mask = random_loss_batch(seed=5)
        config = LossConfig(policy_loss=name, kl_loss_coeff=0.0)
        common = {k: arrays[k] for k in ("logprobs", "logprobs_old", "advantages")}
        loss, metrics = policy_objective(
            **common, response_mask=mask, normalizer=float(mask.sum()), config=config
        )
        ratio = np.exp(np.where(mask, arrays["logprobs"] - arrays["logprobs_old"], 0.0))
        expected = np.sum(np.where(mask, -arrays["advantages"] * ratio, 0.0)) / mask.sum()
        np.testing.assert_allclose(loss, expected, **TOLERANCE)
        assert "ratio/max_test" in metrics and "clip_frac/low" not in metrics
        with pytest.raises(ValueError, match="already registered"):
            losses.register_policy_loss(name)(vanilla_policy_gradient)
    finally:
        losses._POLICY_LOSSES.pop(name)
    with pytest.raises(ValueError, match=f"'{name}'.*ppo_clip"):
        losses.get_policy_loss(name)


# ---------------------------------------------------------------------------------------------
# Dual-clip, KL loss estimators, GSPO, finite gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kl_loss_estimator, clip_ratio_c", [("k3", 1.5), ("k1", None), ("k2", 1.3)]
)
def test_policy_objective_with_dual_clip_and_each_kl_estimator(kl_loss_estimator, clip_ratio_c):
    arrays, mask = random_loss_batch(seed=7)
    arrays["logprobs"] = np.where(mask, arrays["logprobs"] + 0.3, arrays["logprobs"])  # r > 1.5
    config = LossConfig(
        kl_loss_coeff=0.1, clip_ratio_c=clip_ratio_c, kl_loss_estimator=kl_loss_estimator
    )
    normalizer = loss_normalizer(config.loss_agg, mask, config.max_tokens)
    loss, metrics = jax.jit(policy_objective, static_argnames="config")(
        **arrays, response_mask=mask, normalizer=normalizer, config=config
    )
    expected_loss, expected_policy, expected_kl, _ = reference_objective(arrays, mask, config)
    means = finalize_metrics(metrics)
    np.testing.assert_allclose(loss, expected_loss, **TOLERANCE)
    np.testing.assert_allclose(means["loss/policy"], expected_policy, **TOLERANCE)
    np.testing.assert_allclose(means["loss/kl"], expected_kl, **TOLERANCE)
    assert f"kl/{kl_loss_estimator}" in means
    assert ("clip_frac/dual" in means) == (clip_ratio_c is not None)
    if clip_ratio_c:
        ratio = np.exp(
            arrays["logprobs"] - arrays["logprobs_old"], where=mask, out=np.ones(mask.shape)
        )
        low_branch = np.maximum(ratio, 1 - config.clip_eps_low)
        dual = mask & (arrays["advantages"] < 0) & (low_branch > clip_ratio_c)
        assert dual.sum() > 0, "inputs should exercise the dual bound"
        np.testing.assert_allclose(means["clip_frac/dual"], dual.sum() / mask.sum(), rtol=1e-6)


def test_dual_clip_hand_computed_and_bounded_tokens_have_no_gradient():
    ratio = np.array([[5.0, 2.0, 5.0, 0.5]], np.float32)
    advantages = np.array([[-1.0, -1.0, 1.0, -2.0]], np.float32)

    def token_losses(logprobs):
        return ppo_clip_loss(
            logprobs=logprobs,
            logprobs_old=np.zeros((1, 4), np.float32),
            advantages=advantages,
            response_mask=np.ones((1, 4), bool),
            config=LossConfig(clip_ratio_c=3.0),
        )

    values, metrics = token_losses(np.log(ratio))
    # A=-1, r=5: PPO gives 5, dual-clip caps it at 3; A=-1, r=2: 2 < 3 stays; A=1, r=5: -1.2 (the
    # bound is for negative advantages only); A=-2, r=0.5: max(1, 1.6) = 1.6 < 6 stays.
    np.testing.assert_allclose(values, [[3.0, 2.0, -1.2, 1.6]], rtol=1e-6)
    np.testing.assert_array_equal(metrics["clip_frac/dual"], [[1, 0, 0, 0]])
    gradient = jax.grad(lambda lp: token_losses(lp)[0].sum())(np.log(ratio))
    np.testing.assert_allclose(gradient, [[0.0, 2.0, 0.0, 0.0]], rtol=1e-6)


def gspo_batch():
    """Sequences whose mean token log-ratios straddle GSPO's small clip range, with token noise
    around that mean, sequence advantages of both signs and one all-padding row."""
    rng = np.random.default_rng(11)
    lengths = np.array([7, 3, 5, 1, 6, 0])
    mask = np.arange(7)[None, :] < lengths[:, None]
    # row: mean log-ratio, advantage -> clipped?
    # 0: +1e-3, A=+1 -> s = 1.001 > 1 + 4e-4: clipped high; 1: -1e-3, A=-1 -> clipped low;
    # 2: -1e-3, A=+1 -> s below the range but A > 0: not clipped; 3: +1e-4, A=-1: inside;
    # 4: +2e-4, A=+1: inside.
    mean_log_ratio = np.array([1e-3, -1e-3, -1e-3, 1e-4, 2e-4, 0.0])
    sequence_advantage = np.array([1.0, -1.0, 1.0, -1.0, 1.0, 0.5])
    noise = rng.normal(0.0, 0.05, size=mask.shape) * mask
    noise -= mask * (noise.sum(axis=1) / np.maximum(lengths, 1))[:, None]  # zero mean per row
    logprobs_old = -rng.exponential(1.0, size=mask.shape)
    logprobs = logprobs_old + mean_log_ratio[:, None] + noise
    advantages = np.repeat(sequence_advantage[:, None], 7, axis=1)
    arrays = {
        "logprobs": logprobs.astype(np.float32),
        "logprobs_old": logprobs_old.astype(np.float32),
        "advantages": advantages.astype(np.float32),
    }
    for values in arrays.values():
        values[~mask] = 1e4  # garbage, never read
    return arrays, mask


def test_gspo_matches_the_published_objective_and_gradient():
    """GSPO (arXiv 2507.18071): J = (1/G) sum_i min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i),
    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) (here a product of token ratios, then the root), and
    grad J = (1/G) sum_i s_i A_i (1/|y_i|) sum_t grad log pi(y_it) on unclipped sequences."""
    arrays, mask = gspo_batch()
    config = LossConfig(policy_loss="gspo", loss_agg="seq_mean_token_mean", kl_loss_coeff=0.0)
    rows = [i for i in range(mask.shape[0]) if mask[i].any()]
    objective, expected_gradient = 0.0, np.zeros(mask.shape)
    clipped_rows = []
    for i in rows:
        n = int(mask[i].sum())
        token_ratios = np.exp(
            arrays["logprobs"][i, :n].astype(np.float64) - arrays["logprobs_old"][i, :n]
        )
        s = np.prod(token_ratios) ** (1.0 / n)
        a = float(arrays["advantages"][i, 0])
        clipped_s = min(max(s, 1 - 3e-4), 1 + 4e-4)
        objective += min(s * a, clipped_s * a) / len(rows)
        clipped = s * a > clipped_s * a
        clipped_rows.append(clipped)
        if not clipped:
            expected_gradient[i, :n] = -s * a / n / len(rows)  # of the loss, -J
    assert clipped_rows == [True, True, False, False, False], clipped_rows

    normalizer = loss_normalizer(config.loss_agg, mask, config.max_tokens)

    def loss_of(logprobs):
        others = {k: arrays[k] for k in ("logprobs_old", "advantages")}
        return policy_objective(
            logprobs=logprobs, **others, response_mask=mask, normalizer=normalizer, config=config
        )

    (loss, metrics), gradient = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(
        arrays["logprobs"]
    )
    np.testing.assert_allclose(loss, -objective, rtol=1e-6)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-6, atol=1e-9)
    means = finalize_metrics(metrics)
    np.testing.assert_allclose(means["clip_frac/high"], 7 / mask.sum(), rtol=1e-6)  # row 0
    np.testing.assert_allclose(means["clip_frac/low"], 3 / mask.sum(), rtol=1e-6)  # row 1


def test_gspo_clips_the_sequence_log_ratio_at_10_before_exp():
    """A 4-token response whose mean log-ratio is 15 (a stale sequence) with A = -1: the loss is
    exp(10) and the tokens get no gradient (as verl's GSPO). Unclipped it was exp(15) = 3.3e6,
    with 8.2e5 per token: one such sequence would dominate a clipped-norm update."""
    logprobs_old = np.array([[-20.0, -18.0, -16.0, -19.0, 0.0]], np.float32)
    logprobs = np.array([[-6.0, -2.0, -1.0, -4.0, 0.0]], np.float32)  # log-ratios 14, 16, 15, 15
    mask = np.array([[True, True, True, True, False]])
    advantages = np.full((1, 5), -1.0, np.float32)
    config = LossConfig(policy_loss="gspo", loss_agg="seq_mean_token_mean", kl_loss_coeff=0.0)
    normalizer = loss_normalizer(config.loss_agg, mask, config.max_tokens)

    def loss_of(lp):
        return policy_objective(
            logprobs=lp,
            logprobs_old=logprobs_old,
            advantages=advantages,
            response_mask=mask,
            normalizer=normalizer,
            config=config,
        )

    (loss, metrics), gradient = jax.value_and_grad(loss_of, has_aux=True)(logprobs)
    np.testing.assert_allclose(float(loss), np.exp(10.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(gradient), 0.0)
    np.testing.assert_allclose(finalize_metrics(metrics)["ratio/mean"], np.exp(10.0), rtol=1e-6)
    # Just below the bound the sequence learns: ratio exp(9.5), d loss / d logprob_t = ratio / 4.
    (loss, _), gradient = jax.value_and_grad(loss_of, has_aux=True)(logprobs - 5.5)
    np.testing.assert_allclose(float(loss), np.exp(9.5), rtol=1e-5)
    np.testing.assert_allclose(gradient[0, :4], np.exp(9.5) / 4, rtol=1e-5)


def test_gspo_averages_per_sequence_only():
    arrays, mask = gspo_batch()
    with pytest.raises(ValueError, match="gspo.*seq_mean_token_mean.*'token_mean'"):
        policy_objective(
            **arrays,
            response_mask=mask,
            normalizer=1.0,
            config=LossConfig(policy_loss="gspo", kl_loss_coeff=0.0),
        )


@pytest.mark.parametrize(
    "config",
    [
        LossConfig(kl_loss_coeff=0.1, rollout_is_cap=2.0),
        LossConfig(kl_loss_coeff=0.1, rollout_is_cap=2.0, clip_ratio_c=3.0),
        LossConfig(kl_loss_coeff=0.1, kl_loss_estimator="k2", kl_clamp=None),
        LossConfig(policy_loss="gspo", loss_agg="seq_mean_token_mean", kl_loss_coeff=0.1),
    ],
    ids=["ppo_is", "dual_clip", "k2_unclamped", "gspo"],
)
def test_huge_but_finite_log_ratios_give_finite_gradients(config):
    """Log-ratios of +-100 overflowed exp() in fp32 (0 x inf = NaN gradients, the run stopped as
    if diverged): every log-ratio that goes into exp is now clipped first."""
    # Per token (columns): logp - old = +100 / -100 with both advantage signs; ref - logp = 100;
    # old - rollout = 100; and one ordinary token.
    logprobs = np.array([[0.0, -100.0, 0.0, -100.0, -200.0, -1.0, -0.5]], np.float32)
    arrays = {
        "logprobs_old": np.array([[-100.0, 0.0, -100.0, 0.0, -200.0, -1.0, -0.4]], np.float32),
        "ref_logprobs": np.array([[0.0, -100.0, 0.0, -100.0, -100.0, -1.0, -0.45]], np.float32),
        "logprobs_rollout": np.array([[0.0, 0.0, -100.0, 0.0, -200.0, -101.0, -0.4]], np.float32),
        "advantages": np.array([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 0.5]], np.float32),
    }
    mask = np.ones((1, 7), bool)
    normalizer = loss_normalizer(config.loss_agg, mask, config.max_tokens)

    def loss_of(lp):
        return policy_objective(
            logprobs=lp, **arrays, response_mask=mask, normalizer=normalizer, config=config
        )[0]

    loss, gradient = jax.value_and_grad(loss_of)(logprobs)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(gradient))), gradient
    assert float(np.abs(gradient[0, -1])) > 0  # the ordinary token still learns
