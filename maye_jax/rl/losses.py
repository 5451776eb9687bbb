"""The policy-update objective (SPEC §3): PPO-clip (with optional dual-clip), GSPO, the KL loss
(k1/k2/k3), truncated IS, exact loss aggregation.

Pure, jit-compatible functions of `[B, T]` arrays (see `maye_jax/rl/advantages.py` for the
conventions: `response_mask` true on response tokens, padded positions never read). Every
log-ratio is clipped before `exp` (to [-20, 20], `advantages.LOG_RATIO_CLAMP`; GSPO's sequence
log-ratio to [-20, 10], `GSPO_LOG_RATIO_MAX`), so no finite input gives an inf ratio or a NaN
gradient.

Gradient accumulation is exact by construction. Every aggregation mode is

    loss(mini-batch) = weighted_sum(token_losses, mask) / normalizer(mini-batch mask)

where both `weighted_sum` and `normalizer` are sums of per-sequence terms. The caller computes
the normalizer once over the whole mini-batch (`loss_normalizer`) and passes it to every
micro-batch; each micro-batch returns `weighted_sum(its rows) / normalizer`, and the sum of these
contributions (and of their gradients) equals the mini-batch loss computed at once.

One micro-batch, as the update step uses it:

    normalizer = loss_normalizer(config.loss_agg, minibatch_mask, config.max_tokens)
    loss, metrics = policy_objective(logprobs=..., ..., normalizer=normalizer, config=config)
    # sum `loss` gradients and `metrics` (sum, count) pairs over micro-batches, then
    # finalize_metrics(summed_metrics) -> {"loss/policy": ..., "clip_frac/low": ..., ...}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from maye_jax.config.options import declared_default
from maye_jax.rl.advantages import (
    KL_CLAMP,
    LOG_RATIO_CLAMP,
    KlClamp,
    as_float,
    as_mask,
    clamp_log_ratio,
    kl_estimate,
    masked_sum,
    safe_divide,
)

GSPO_LOG_RATIO_MAX = 10.0
"""GSPO's sequence log-ratio is clipped to at most 10 before `exp` (as verl's GSPO): a sequence
whose tokens all moved far from the old policy (a stale or off-policy one) would otherwise give
a loss and gradient of exp(mean log-ratio) that dominate a clipped-norm update. exp(10) ~ 2.2e4;
a clipped sequence gets no gradient. Below, the usual -20 bound."""

MetricSums = dict[str, tuple[jax.Array, jax.Array]]
"""Metric name -> (sum, count) over one micro-batch; sum both over micro-batches, then divide."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Options of the policy objective (hashable, so it can be a static jit argument); the
    defaults are the `rl.*` options' (maye_jax/config/options.py).

    policy_loss: name in the policy-loss registry ("ppo_clip", "gspo", "nll").
    clip_eps_low / clip_eps_high: PPO ratio clip range [1 - low, 1 + high].
    clip_ratio_c: None (off) or PPO dual-clip's bound c > 1 (usually 3): for a negative
      advantage the token loss is at most `-A * c`, whatever the ratio.
    gspo_clip_eps_low / gspo_clip_eps_high: GSPO's own clip range of the sequence ratio
      (3e-4 / 4e-4 as in the GSPO paper: a sequence ratio moves far less than a token's).
    kl_loss_coeff: weight of the KL loss (beta_loss, 0.001 in the paper); 0 disables it.
    kl_loss_estimator: k1 | k2 | k3 (the paper's) estimator of the KL loss.
    kl_clamp: per-token clamp of the KL loss.
    loss_agg: name in the aggregation registry; max_tokens: Dr.GRPO's constant for
      seq_mean_token_sum_norm (the generation max_tokens).
    rollout_is_cap: None (off) or the cap of the truncated importance-sampling weight (2.0).
    """

    policy_loss: str = declared_default("rl.policy_loss")
    clip_eps_low: float = declared_default("rl.clip_eps_low")
    clip_eps_high: float = declared_default("rl.clip_eps_high")
    clip_ratio_c: float | None = declared_default("rl.clip_ratio_c")
    gspo_clip_eps_low: float = declared_default("rl.gspo_clip_eps_low")
    gspo_clip_eps_high: float = declared_default("rl.gspo_clip_eps_high")
    kl_loss_coeff: float = declared_default("rl.kl_loss_coeff")
    kl_loss_estimator: str = declared_default("rl.kl_loss_estimator")
    kl_clamp: KlClamp = KL_CLAMP
    loss_agg: str = declared_default("rl.loss_agg")
    max_tokens: int = declared_default("rollout.max_tokens")
    rollout_is_cap: float | None = declared_default("rl.rollout_is_cap")


# --------------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------------

PolicyLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
"""`fn(*, logprobs [B, T], logprobs_old [B, T], advantages [B, T], response_mask [B, T],
config: LossConfig) -> (token_losses [B, T], per-token metrics {name: [B, T]})`; the objective
averages each per-token metric over valid tokens."""

_POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator adding a policy loss under `name`, selected by `LossConfig.policy_loss`."""

    def decorator(policy_loss: PolicyLoss) -> PolicyLoss:
        if name in _POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        _POLICY_LOSSES[name] = policy_loss
        return policy_loss

    return decorator


def policy_loss_names() -> tuple[str, ...]:
    return tuple(_POLICY_LOSSES)


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in _POLICY_LOSSES:
        raise ValueError(
            f"unknown policy loss {name!r}; known: {', '.join(sorted(_POLICY_LOSSES))}"
        )
    return _POLICY_LOSSES[name]


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    *,
    logprobs: ArrayLike,  # [B, T], differentiated
    logprobs_old: ArrayLike,  # [B, T]
    advantages: ArrayLike,  # [B, T]
    response_mask: ArrayLike,  # [B, T]
    config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate per token: `max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))`.

    `ratio = exp(clip(logprobs - logprobs_old, -20, 20))`. With `clip_ratio_c` set (dual-clip,
    Ye et al. 2020), a token with `A < 0` gets `min(that, -A * clip_ratio_c)`: a very large
    ratio on a bad token no longer gives an unbounded loss (it gets no gradient instead).
    Per-token metrics (0/1 indicators and values):
      - clip_frac/low: the clipped branch is the active (strictly larger) one because the ratio
        fell below 1 - eps_low, i.e. `ratio < 1 - eps_low and A < 0`;
      - clip_frac/high: likewise above, `ratio > 1 + eps_high and A > 0`;
        (on these tokens the loss is constant in logprobs: they get no gradient)
      - clip_frac/dual (dual-clip only): `A < 0` and the `-A * c` bound is the active one;
      - ratio/mean: the ratio; approx_kl: `0.5 * (logprobs - logprobs_old)**2`.
    """
    mask = as_mask(response_mask)
    advantages = jnp.where(mask, as_float(advantages), 0.0)
    # Masking the log-ratio before exp() keeps garbage padding from producing inf * 0 = NaN grads;
    # clipping it keeps a finite but huge one (e.g. 100 in fp32) from doing the same.
    log_ratio = clamp_log_ratio(jnp.where(mask, as_float(logprobs) - as_float(logprobs_old), 0.0))
    ratio = jnp.exp(log_ratio)
    low, high = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high
    token_losses = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, low, high))
    metrics = {
        "clip_frac/low": ((ratio < low) & (advantages < 0)).astype(ratio.dtype),
        "clip_frac/high": ((ratio > high) & (advantages > 0)).astype(ratio.dtype),
    }
    if config.clip_ratio_c is not None:
        dual_bound = -advantages * config.clip_ratio_c
        dual_active = (advantages < 0) & (token_losses > dual_bound)
        token_losses = jnp.where(
            advantages < 0, jnp.minimum(token_losses, dual_bound), token_losses
        )
        metrics["clip_frac/dual"] = dual_active.astype(ratio.dtype)
    metrics["ratio/mean"] = ratio
    metrics["approx_kl"] = 0.5 * jnp.square(log_ratio)
    return jnp.where(mask, token_losses, 0.0), metrics


@register_policy_loss("gspo")
def gspo_loss(
    *,
    logprobs: ArrayLike,  # [B, T], differentiated
    logprobs_old: ArrayLike,  # [B, T]
    advantages: ArrayLike,  # [B, T]
    response_mask: ArrayLike,  # [B, T]
    config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GSPO (Zheng et al. 2025): PPO's clipped surrogate on the sequence-level ratio
    `s_i = exp(mean_t (logprobs - logprobs_old))` = (pi(y_i) / pi_old(y_i))^(1 / |y_i|),
    clipped to [1 - gspo_clip_eps_low, 1 + gspo_clip_eps_high], averaged per sequence
    (only with `loss_agg="seq_mean_token_mean"`: the objective is (1/G) sum_i of a sequence term).

    In the token form of GSPO-token, `s_it = sg[s_i] * pi_it / sg[pi_it]`: every token of a
    sequence has the value `s_i`, and `d s_it / d logprobs_it = s_i`, which gives the paper's
    gradient `s_i A_i (1 / |y_i|) sum_t grad log pi_it` after the per-sequence mean. Metrics as
    `ppo_clip_loss`, with the sequence ratio on every token (approx_kl stays token-level).
    The sequence log-ratio is clipped to [-20, GSPO_LOG_RATIO_MAX = 10] before `exp`.
    """
    if config.loss_agg != "seq_mean_token_mean":
        raise ValueError(
            "policy loss 'gspo' averages per sequence: it needs loss_agg='seq_mean_token_mean', "
            f"got {config.loss_agg!r}"
        )
    mask = as_mask(response_mask)
    advantages = jnp.where(mask, as_float(advantages), 0.0)
    logprobs = jnp.where(mask, as_float(logprobs), 0.0)
    token_log_ratio = jnp.where(mask, logprobs - as_float(logprobs_old), 0.0)  # [B, T]
    sequence_log_ratio = safe_divide(jnp.sum(token_log_ratio, axis=-1), jnp.sum(mask, axis=-1))
    log_ratio = (
        logprobs
        - jax.lax.stop_gradient(logprobs)
        + jax.lax.stop_gradient(sequence_log_ratio)[:, None]
    )  # [B, T]: value log s_i, gradient that of logprobs
    log_ratio = jnp.clip(jnp.where(mask, log_ratio, 0.0), -LOG_RATIO_CLAMP, GSPO_LOG_RATIO_MAX)
    ratio = jnp.exp(log_ratio)
    low, high = 1.0 - config.gspo_clip_eps_low, 1.0 + config.gspo_clip_eps_high
    token_losses = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, low, high))
    token_log_ratio = clamp_log_ratio(token_log_ratio)
    metrics = {
        "clip_frac/low": ((ratio < low) & (advantages < 0)).astype(ratio.dtype),
        "clip_frac/high": ((ratio > high) & (advantages > 0)).astype(ratio.dtype),
        "ratio/mean": ratio,
        "approx_kl": 0.5 * jnp.square(token_log_ratio),
    }
    return jnp.where(mask, token_losses, 0.0), metrics


@register_policy_loss("nll")
def nll_loss(
    *,
    logprobs: ArrayLike,  # [B, T], differentiated
    logprobs_old: ArrayLike,  # [B, T], unused
    advantages: ArrayLike,  # [B, T], unused
    response_mask: ArrayLike,  # [B, T]
    config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative log-likelihood per token: supervised fine-tuning (the SFT baseline, SPEC §5)
    through the same step, aggregation and exact accumulation as the RL losses."""
    del logprobs_old, advantages, config
    mask = as_mask(response_mask)
    return jnp.where(mask, -as_float(logprobs), 0.0), {}


def kl_token_loss(
    logprobs: ArrayLike,  # [B, T], differentiated
    ref_logprobs: ArrayLike,  # [B, T]
    response_mask: ArrayLike,  # [B, T]
    clamp: KlClamp = KL_CLAMP,
    kind: str = "k3",
) -> jax.Array:  # [B, T]
    """KL to the reference per token with the `kind` estimator (`advantages.kl_estimate`); the
    paper's k3 is `clamp(exp(d) - 1 - d)` with `d = ref_logprobs - logprobs`.

    The clamp is per token (the original clamps the micro-batch mean; a per-token clamp keeps
    gradient accumulation exact). A clamped token gets no gradient. 0 at padded positions.
    """
    mask = as_mask(response_mask)
    kl = kl_estimate(
        jnp.where(mask, as_float(logprobs), 0.0),
        jnp.where(mask, as_float(ref_logprobs), 0.0),
        kind=kind,
        clamp=clamp,
    )
    return jnp.where(mask, kl, 0.0)


def truncated_is_weight(
    logprobs_old: ArrayLike,  # [B, T] trainer's log-probabilities of the rollout policy
    logprobs_rollout: ArrayLike,  # [B, T] the rollout engine's log-probabilities
    response_mask: ArrayLike,  # [B, T]
    cap: float = 2.0,
) -> jax.Array:  # [B, T]
    """Truncated importance weight `min(exp(logprobs_old - logprobs_rollout), cap)`, a constant.

    Corrects for the rollout engine sampling from a slightly different distribution than the
    trainer computes; it multiplies the policy token loss. 0 at padded positions.
    """
    mask = as_mask(response_mask)
    log_weight = jnp.where(mask, as_float(logprobs_old) - as_float(logprobs_rollout), 0.0)
    weight = jnp.minimum(jnp.exp(clamp_log_ratio(log_weight)), cap)
    return jax.lax.stop_gradient(jnp.where(mask, weight, 0.0))


# --------------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossAggregation:
    """`loss = weighted_sum(token_losses, mask) / normalizer(mask, max_tokens)`, both functions
    sums of per-sequence terms (which is what makes gradient accumulation exact)."""

    weighted_sum: Callable[[jax.Array, jax.Array], jax.Array]
    normalizer: Callable[[jax.Array, int], jax.Array]


_LOSS_AGGREGATIONS: dict[str, LossAggregation] = {}


def register_loss_aggregation(
    name: str, *, normalizer: Callable[[jax.Array, int], jax.Array]
) -> Callable:
    """Decorator registering `weighted_sum(token_losses [B, T], mask [B, T]) -> scalar` with its
    `normalizer(mask [B, T], max_tokens) -> scalar` under `name` (both additive over rows)."""

    def decorator(weighted_sum: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
        if name in _LOSS_AGGREGATIONS:
            raise ValueError(f"loss aggregation {name!r} is already registered")
        _LOSS_AGGREGATIONS[name] = LossAggregation(weighted_sum, normalizer)
        return weighted_sum

    return decorator


def loss_aggregation_names() -> tuple[str, ...]:
    return tuple(_LOSS_AGGREGATIONS)


def get_loss_aggregation(name: str) -> LossAggregation:
    if name not in _LOSS_AGGREGATIONS:
        known = ", ".join(sorted(_LOSS_AGGREGATIONS))
        raise ValueError(f"unknown loss aggregation {name!r}; known: {known}")
    return _LOSS_AGGREGATIONS[name]


def _num_tokens(mask: jax.Array, max_tokens: int) -> jax.Array:
    del max_tokens
    return jnp.sum(mask).astype(jnp.float32)


def _num_sequences(mask: jax.Array, max_tokens: int) -> jax.Array:
    """Rows with at least one valid token (all-padding rows, e.g. batch filler, do not count)."""
    del max_tokens
    return jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)


def _num_sequences_times_max_tokens(mask: jax.Array, max_tokens: int) -> jax.Array:
    return _num_sequences(mask, max_tokens) * max_tokens


@register_loss_aggregation("token_mean", normalizer=_num_tokens)
def _token_sum(token_losses: jax.Array, mask: jax.Array) -> jax.Array:
    """token_mean: `sum_{i,t} m_it l_it / sum_{i,t} m_it` over the mini-batch (the original's)."""
    return masked_sum(token_losses, mask)


@register_loss_aggregation("seq_mean_token_mean", normalizer=_num_sequences)
def _sum_of_sequence_means(token_losses: jax.Array, mask: jax.Array) -> jax.Array:
    """seq_mean_token_mean: `sum_i [sum_t m_it l_it / sum_t m_it] / #sequences` (the paper's
    per-response 1/|o| mean)."""
    per_sequence_sum = masked_sum(token_losses, mask, axis=-1)  # [B]
    return jnp.sum(safe_divide(per_sequence_sum, jnp.sum(mask, axis=-1)))


@register_loss_aggregation("seq_mean_token_sum", normalizer=_num_sequences)
def _sum_of_sequence_sums(token_losses: jax.Array, mask: jax.Array) -> jax.Array:
    """seq_mean_token_sum: `sum_i [sum_t m_it l_it] / #sequences` (verl's seq-mean-token-sum):
    each sequence's token sum, averaged over sequences (a longer response weighs more)."""
    return masked_sum(token_losses, mask)


@register_loss_aggregation("seq_mean_token_sum_norm", normalizer=_num_sequences_times_max_tokens)
def _token_sum_for_constant_length(token_losses: jax.Array, mask: jax.Array) -> jax.Array:
    """seq_mean_token_sum_norm (Dr.GRPO): `sum_i [sum_t m_it l_it / max_tokens] / #sequences`,
    every sequence's token sum divided by the same constant, whatever its length."""
    return masked_sum(token_losses, mask)


def loss_normalizer(
    mode: str,
    response_mask: ArrayLike,  # [B_minibatch, T], the WHOLE mini-batch
    max_tokens: int,
) -> jax.Array:  # scalar float32
    """The denominator of `mode`'s mini-batch loss, computed before splitting into micro-batches.

    token_mean: number of valid tokens; seq_mean_token_mean and seq_mean_token_sum: number of
    sequences; seq_mean_token_sum_norm: number of sequences * max_tokens. A "sequence" is a row
    with at least one valid token.
    """
    return get_loss_aggregation(mode).normalizer(as_mask(response_mask), max_tokens)


def aggregate_loss(
    mode: str,
    token_losses: ArrayLike,  # [B_micro, T]
    response_mask: ArrayLike,  # [B_micro, T]
    normalizer: ArrayLike,  # scalar, from loss_normalizer over the mini-batch
) -> jax.Array:  # scalar
    """This micro-batch's contribution to the mini-batch loss (0 if the normalizer is 0)."""
    weighted_sum = get_loss_aggregation(mode).weighted_sum(
        as_float(token_losses), as_mask(response_mask)
    )
    return safe_divide(weighted_sum, jax.lax.stop_gradient(as_float(normalizer)))


# --------------------------------------------------------------------------------------------------
# The objective of one micro-batch
# --------------------------------------------------------------------------------------------------


def policy_objective(
    *,
    logprobs: ArrayLike,  # [B, T], the differentiated current-policy log-probabilities
    logprobs_old: ArrayLike,  # [B, T]
    advantages: ArrayLike,  # [B, T]
    response_mask: ArrayLike,  # [B, T]
    normalizer: ArrayLike,  # scalar, loss_normalizer(config.loss_agg, minibatch_mask, max_tokens)
    config: LossConfig = LossConfig(),  # noqa: B008 (frozen, immutable)
    ref_logprobs: ArrayLike | None = None,  # [B, T], required when kl_loss_coeff != 0
    logprobs_rollout: ArrayLike | None = None,  # [B, T], required when rollout_is_cap is set
) -> tuple[jax.Array, MetricSums]:
    """`loss = agg(pg_token_loss * is_weight) + kl_loss_coeff * agg(kl_token_loss)` for one
    micro-batch, as its contribution to the mini-batch loss, and the metric (sum, count) pairs.

    Metrics: loss/{policy,kl,total} as (weighted sum, this micro-batch's share of the
    normalizer), so summing pairs over micro-batches and dividing gives the mini-batch losses;
    token means over valid tokens of kl/<kl_loss_estimator> (kl/k3 by default),
    clip_frac/{low,high} (and clip_frac/dual with dual-clip), ratio/mean, approx_kl (and
    is_weight/mean when the IS correction is on). kl metrics only when ref_logprobs is given.
    Summed over several mini-batches, the loss pairs give a normalizer-weighted mean of their
    losses. Metric sums carry no gradient.
    """
    mask = as_mask(response_mask)
    aggregation = get_loss_aggregation(config.loss_agg)
    policy_token_losses, token_metrics = get_policy_loss(config.policy_loss)(
        logprobs=logprobs,
        logprobs_old=logprobs_old,
        advantages=advantages,
        response_mask=mask,
        config=config,
    )
    if config.rollout_is_cap is not None:
        if logprobs_rollout is None:
            raise ValueError("rollout_is_cap is set but logprobs_rollout was not given")
        is_weight = truncated_is_weight(logprobs_old, logprobs_rollout, mask, config.rollout_is_cap)
        policy_token_losses = policy_token_losses * is_weight
        token_metrics = {**token_metrics, "is_weight/mean": is_weight}

    normalizer = jax.lax.stop_gradient(as_float(normalizer))
    micro_normalizer = aggregation.normalizer(mask, config.max_tokens)
    policy_sum = aggregation.weighted_sum(policy_token_losses, mask)
    total_sum = policy_sum
    metrics: MetricSums = {"loss/policy": (policy_sum, micro_normalizer)}

    if ref_logprobs is not None:
        kl_token_losses = kl_token_loss(
            logprobs, ref_logprobs, mask, config.kl_clamp, kind=config.kl_loss_estimator
        )
        kl_sum = aggregation.weighted_sum(kl_token_losses, mask)
        total_sum = total_sum + config.kl_loss_coeff * kl_sum
        metrics["loss/kl"] = (kl_sum, micro_normalizer)
        token_metrics = {**token_metrics, f"kl/{config.kl_loss_estimator}": kl_token_losses}
    elif config.kl_loss_coeff != 0:
        raise ValueError(f"kl_loss_coeff={config.kl_loss_coeff} needs ref_logprobs")

    metrics["loss/total"] = (total_sum, micro_normalizer)
    num_tokens = jnp.sum(mask).astype(jnp.float32)
    for name, per_token in token_metrics.items():
        metrics[name] = (masked_sum(per_token, mask), num_tokens)
    metrics = {name: (jax.lax.stop_gradient(s), c) for name, (s, c) in metrics.items()}
    return safe_divide(total_sum, normalizer), metrics


def sum_metrics(first: MetricSums, second: MetricSums) -> MetricSums:
    """Adds the (sum, count) pairs of two micro-batches."""
    return {
        name: (first[name][0] + second[name][0], first[name][1] + second[name][1]) for name in first
    }


def finalize_metrics(metrics: Mapping[str, tuple[ArrayLike, ArrayLike]]) -> dict[str, jax.Array]:
    """sum / count for every metric (0 where the count is 0)."""
    return {
        name: safe_divide(as_float(total), as_float(count))
        for name, (total, count) in metrics.items()
    }
