"""From sequence scores and log-probabilities to per-token advantages (SPEC §3).

Everything here is a pure function of arrays: jit-compatible (no Python control flow on traced
values; names, configs and shapes are static), callable on NumPy inputs, tested against NumPy loops
in `tests/maye_jax/rl/test_advantages.py`. The losses that consume the advantages live in
`maye_jax/rl/losses.py`.

Shapes: `B` responses in the batch, `T` padded response length. A `response_mask` is `[B, T]`,
true on the response's tokens (up to and including the first stop token) and false on the right
padding after it; a row may be all padding. Values at padded positions are never read: they may be
garbage (even inf or NaN) and every `[B, T]` output is exactly 0 there.

The paper's Reinforce++ (`reinforce_pp`, the default estimator):

    kl_t = k3(logp_ref_t - logp_t)                    (only if kl_reward_coeff != 0)
    r_t  = -kl_reward_coeff * kl_t  (+ score at the last valid token)
    G_t  = sum_{k >= t} gamma^(k - t) r_k
    A_t  = whiten(G) over all valid tokens of the batch (+ mean added back if shift_mean)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from maye_jax.config.options import declared_default

KL_CLAMP = declared_default("rl.kl_clamp")
"""Default clamp of the token KL estimates (`rl.kl_clamp`): clipped to [-KL_CLAMP, KL_CLAMP]."""

KL_ESTIMATORS = ("k1", "k2", "k3")

LOG_RATIO_CLAMP = 20.0
"""A log-ratio that goes into `exp` is clipped to [-20, 20] first (PPO's token ratio, the k3
estimate, the truncated IS weight; verl clips the same three there). exp(20) ~ 5e8 is finite
with room to spare in fp32 (exp overflows above ~88), so no finite input can give an inf ratio
and a NaN gradient (0 x inf) on a token whose loss is clamped or clipped anyway. k1 and k2 take
no `exp` and are not clipped; GSPO's sequence ratio has its own bound
(`losses.GSPO_LOG_RATIO_MAX`)."""

KlClamp = float | tuple[float, float] | None
"""`c` clamps to [-c, c], `(low, high)` to [low, high], None disables clamping."""


def as_float(values: ArrayLike) -> jax.Array:
    """`values` as a floating array of at least float32 precision."""
    values = jnp.asarray(values)
    return values.astype(jnp.promote_types(values.dtype, jnp.float32))


def as_mask(response_mask: ArrayLike) -> jax.Array:
    """`response_mask` (bool, 0/1 int or float) as a bool array."""
    return jnp.asarray(response_mask).astype(bool)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 where the denominator is 0 (with finite gradients)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0.0)


def clamp_log_ratio(log_ratio: jax.Array) -> jax.Array:
    """`log_ratio` clipped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (before any `exp`); a clipped
    token gets no gradient through it, as the peers' clamps do."""
    return jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clamp_values(values: jax.Array, clamp: KlClamp) -> jax.Array:
    """Clips `values` to the bounds that `clamp` describes (see `KlClamp`)."""
    if clamp is None:
        return values
    if isinstance(clamp, tuple):
        low, high = clamp
    else:
        low, high = -clamp, clamp
    if low > high:
        raise ValueError(f"clamp bounds must satisfy low <= high, got ({low}, {high})")
    return jnp.clip(values, low, high)


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------


def kl_estimate(
    logprobs: ArrayLike,  # [...]
    ref_logprobs: ArrayLike,  # [...]
    kind: str = "k3",
    clamp: KlClamp = KL_CLAMP,
) -> jax.Array:  # [...]
    """Per-token estimate of KL(policy || reference) from sampled-token log-probabilities.

    With `log_ratio = logprobs - ref_logprobs` (samples drawn from the policy):
      - k1: `log_ratio` (unbiased, high variance, can be negative);
      - k2: `0.5 * log_ratio**2` (biased, always >= 0);
      - k3: with `d = ref_logprobs - logprobs`, `exp(d) - 1 - d` (unbiased, always >= 0).
    k3's log-ratio is first clipped to [-20, 20] (`LOG_RATIO_CLAMP`, as verl's k3), so its `exp`
    never overflows and every finite input has a finite gradient (0 beyond the clip); k1 and k2
    use the log-ratio as it is (as verl's), so with `clamp=None` they are exact at any size. The
    result is then clamped elementwise (default [-10, 10], as the original).
    """
    log_ratio = as_float(logprobs) - as_float(ref_logprobs)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * jnp.square(log_ratio)
    elif kind == "k3":
        ref_minus_policy = -clamp_log_ratio(log_ratio)
        kl = jnp.expm1(ref_minus_policy) - ref_minus_policy  # exp(d) - 1 - d, accurate near d = 0
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")
    return clamp_values(kl, clamp)


# --------------------------------------------------------------------------------------------------
# Rewards and returns
# --------------------------------------------------------------------------------------------------


def last_valid_index(response_mask: ArrayLike) -> jax.Array:  # [B] int32
    """Index of each row's last valid token (its EOS position), -1 for an all-padding row."""
    mask = as_mask(response_mask)
    positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask, positions, -1), axis=-1)


def token_rewards(
    scores: ArrayLike,  # [B]
    kl: ArrayLike | None,  # [B, T], or None for no KL reward
    response_mask: ArrayLike,  # [B, T]
    kl_reward_coeff: float = 0.0,
) -> jax.Array:  # [B, T]
    """Per-token rewards: `r_t = -kl_reward_coeff * kl_t` on valid tokens, plus the sequence score
    at the last valid token (the EOS position, or the last token of a truncated response).

    A row with no valid token gets no reward at all: its score is not placed anywhere (there is
    no token to hold it), so it contributes nothing to returns, whitening statistics or the loss.
    Padded positions are 0. `kl=None` means no KL term (the paper's runs use coeff 0).
    """
    mask = as_mask(response_mask)
    scores = as_float(scores)
    if kl is None:
        rewards = jnp.zeros(mask.shape, scores.dtype)
    else:
        rewards = jnp.where(mask, -kl_reward_coeff * as_float(kl), 0.0)
    positions = jnp.arange(mask.shape[-1])
    is_last_token = positions[None, :] == last_valid_index(mask)[:, None]  # [B, T]
    return rewards + jnp.where(is_last_token, scores[:, None], 0.0)


def discounted_returns(
    rewards: ArrayLike,  # [B, T]
    response_mask: ArrayLike,  # [B, T]
    gamma: float = 1.0,
) -> jax.Array:  # [B, T]
    """Reward-to-go `G_t = sum_{k >= t, k valid} gamma^(k - t) r_k`, 0 at padded positions.

    A reverse `lax.scan` over time: `G_t = r_t + gamma * G_{t+1}` on valid tokens. Padded
    positions carry the running return through unchanged, so for a mask with holes the discount
    counts valid tokens only (with right padding, the only layout we produce, this is exactly the
    formula above).
    """
    mask = as_mask(response_mask)
    rewards = jnp.where(mask, as_float(rewards), 0.0)

    def step(future_return, rewards_and_mask_at_t):  # future_return: [B]
        reward_t, valid_t = rewards_and_mask_at_t
        return_t = jnp.where(valid_t, reward_t + gamma * future_return, future_return)
        return return_t, jnp.where(valid_t, return_t, 0.0)

    initial_return = jnp.zeros(rewards.shape[0], rewards.dtype)
    _, returns_by_time = jax.lax.scan(step, initial_return, (rewards.T, mask.T), reverse=True)
    return returns_by_time.T


# --------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------


def masked_sum(values: ArrayLike, mask: ArrayLike, axis: int | None = None) -> jax.Array:
    """Sum of `values` where `mask` is true (garbage at masked-out positions is ignored)."""
    return jnp.sum(jnp.where(as_mask(mask), as_float(values), 0.0), axis=axis)


def masked_mean(values: ArrayLike, mask: ArrayLike, axis: int | None = None) -> jax.Array:
    """Mean of `values` over the positions where `mask` is true; 0 where there are none."""
    count = jnp.sum(as_mask(mask), axis=axis)
    return safe_divide(masked_sum(values, mask, axis=axis), count)


def masked_var(values: ArrayLike, mask: ArrayLike, unbiased: bool = True) -> jax.Array:
    """Variance of `values` over all positions where `mask` is true (a scalar).

    `unbiased=True` applies Bessel's correction (divides by count - 1) as torchtune/the original
    do; with a count of 0 or 1 (no spread to estimate) the result is 0 instead of inf/NaN.
    """
    mask = as_mask(mask)
    values = as_float(values)
    count = jnp.sum(mask)
    centered = jnp.where(mask, values - masked_mean(values, mask), 0.0)
    sum_of_squares = jnp.sum(jnp.square(centered))
    if not unbiased:
        return safe_divide(sum_of_squares, count)
    return jnp.where(count > 1, sum_of_squares / jnp.maximum(count - 1, 1), 0.0)


def masked_whiten(
    values: ArrayLike,  # [B, T]
    mask: ArrayLike,  # [B, T]
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> jax.Array:  # [B, T]
    """Whitens `values` with the mean and unbiased variance of all valid positions of the array.

    `(x - mean) / sqrt(var + eps)`, then `+ mean` if `shift_mean` (torchtune's default, which the
    original MAYE inherits: the advantages keep the returns' mean, so with 0/1 accuracy scores
    they stay mostly positive). `shift_mean=False` gives zero-mean advantages. 0 at masked-out
    positions.

    Beware when copying settings between frameworks: verl's and TRL's `shift_mean=True` means
    the opposite ("subtract the mean", i.e. zero-mean advantages, which is `shift_mean=False`
    here); here, as in MAYE and torchtune, True means "add the mean back".
    """
    mask = as_mask(mask)
    values = as_float(values)
    mean = masked_mean(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(masked_var(values, mask) + eps)
    if shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


def masked_whiten_across_processes(
    values: np.ndarray,  # [B, T] this process's rows
    mask: np.ndarray,  # [B, T]
    *,
    shift_mean: bool,
    eps: float,
    global_sum,  # array -> its sum over every process (multihost.global_sum)
) -> np.ndarray:  # [B, T]
    """`masked_whiten` with the statistics of every process's rows together: the mean from
    global sums and counts, then (a second pass) the variance from the global sum of squared
    deviations from that mean, Bessel-corrected, so the result does not depend on how the
    rows are split between processes."""
    mask = np.asarray(mask, bool)
    values = np.asarray(values, np.float64)
    total, count = global_sum(np.asarray([np.where(mask, values, 0.0).sum(), mask.sum()]))
    mean = total / count if count else 0.0
    squares = global_sum(np.asarray([np.where(mask, np.square(values - mean), 0.0).sum()]))[0]
    var = squares / (count - 1) if count > 1 else 0.0
    whitened = (values - mean) / np.sqrt(var + eps)
    if shift_mean:
        whitened = whitened + mean
    return np.where(mask, whitened, 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------------

# The estimators whose last step whitens over the whole batch (`AdvantageConfig.whiten`).
WHITENING_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")
# The estimators of sequence scores alone: a KL reward (`kl_reward_coeff`) has no place in them.
SCORE_ONLY_ESTIMATORS = ("grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """Options of the advantage estimators (hashable, so it can be a static jit argument); the
    defaults are the `rl.*` options' (maye_jax/config/options.py).

    gamma, kl_reward_coeff, kl_estimator, kl_clamp: token rewards and returns (reinforce_pp*).
    whiten, shift_mean, whiten_eps: the final global whitening (reinforce_pp*). shift_mean=True
      adds the mean back after whitening (MAYE, torchtune); verl/TRL's `shift_mean=True` means
      the opposite (zero-mean advantages), i.e. `shift_mean=False` here.
    grpo_eps, grpo_scale_by_std: GRPO's `(score - mean) / (std + eps)`; `scale_by_std=False` is
      Dr.GRPO (`score - mean`).
    """

    gamma: float = declared_default("rl.gamma")
    kl_reward_coeff: float = declared_default("rl.kl_reward_coeff")
    kl_estimator: str = declared_default("rl.kl_estimator")
    kl_clamp: KlClamp = KL_CLAMP
    whiten: bool = declared_default("rl.whiten")
    shift_mean: bool = declared_default("rl.shift_mean")
    whiten_eps: float = declared_default("rl.whiten_eps")
    grpo_eps: float = declared_default("rl.grpo_eps")
    grpo_scale_by_std: bool = declared_default("rl.grpo_scale_by_std")


AdvantageEstimator = Callable[..., jax.Array]
"""`fn(*, scores [B], response_mask [B, T], logprobs [B, T] | None, ref_logprobs [B, T] | None,
num_samples_per_prompt: int, config: AdvantageConfig) -> advantages [B, T]` (0 on padding)."""

_ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator adding an estimator under `name`, usable by `compute_advantages(name, ...)`."""

    def decorator(estimator: AdvantageEstimator) -> AdvantageEstimator:
        if name in _ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADVANTAGE_ESTIMATORS[name] = estimator
        return estimator

    return decorator


def advantage_estimator_names() -> tuple[str, ...]:
    return tuple(sorted(_ADVANTAGE_ESTIMATORS))


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    if name not in _ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {', '.join(advantage_estimator_names())}"
        )
    return _ADVANTAGE_ESTIMATORS[name]


def compute_advantages(
    name: str,
    *,
    scores: ArrayLike,  # [B]
    response_mask: ArrayLike,  # [B, T]
    logprobs: ArrayLike | None = None,  # [B, T], needed only for a KL reward
    ref_logprobs: ArrayLike | None = None,  # [B, T], needed only for a KL reward
    num_samples_per_prompt: int = 1,
    config: AdvantageConfig = AdvantageConfig(),  # noqa: B008 (frozen, immutable)
    global_sum: Callable[[np.ndarray], np.ndarray] | None = None,
) -> jax.Array | np.ndarray:  # [B, T]
    """Per-token advantages from the estimator registered as `name` (0 on padded positions).

    The samples of one prompt are contiguous: rows `[i * n, (i + 1) * n)` with
    `n = num_samples_per_prompt` form prompt `i`'s group, and `B` must be a multiple of `n`.

    `global_sum` (several processes, each with its own rows: `multihost.global_sum`) makes the
    whitening of the whitening estimators use every process's rows
    (`masked_whiten_across_processes`); groups stay on one process, so nothing else changes.
    """
    estimator = get_advantage_estimator(name)
    scores = as_float(scores)
    mask = as_mask(response_mask)
    if scores.ndim != 1 or mask.ndim != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"expected scores [B] and response_mask [B, T], got {scores.shape} and {mask.shape}"
        )
    if num_samples_per_prompt < 1 or scores.shape[0] % num_samples_per_prompt:
        raise ValueError(
            f"num_samples_per_prompt={num_samples_per_prompt} must be >= 1 and divide the batch "
            f"size {scores.shape[0]} (the samples of a prompt are contiguous rows)"
        )
    across = global_sum is not None and config.whiten and name in WHITENING_ESTIMATORS
    advantages = estimator(
        scores=scores,
        response_mask=mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        num_samples_per_prompt=num_samples_per_prompt,
        config=dataclasses.replace(config, whiten=False) if across else config,
    )
    if not across:
        return advantages
    return masked_whiten_across_processes(
        np.asarray(advantages),
        np.asarray(mask),
        shift_mean=config.shift_mean,
        eps=config.whiten_eps,
        global_sum=global_sum,
    )


def _scores_by_group(scores: jax.Array, num_samples_per_prompt: int, estimator: str) -> jax.Array:
    """`scores` [B] as [B // n, n] prompt groups; estimators with a group baseline need n >= 2."""
    if num_samples_per_prompt < 2:
        raise ValueError(
            f"advantage estimator {estimator!r} compares the samples of a prompt and needs "
            f"num_samples_per_prompt >= 2, got {num_samples_per_prompt}"
        )
    return scores.reshape(-1, num_samples_per_prompt)


def _equal_score_groups(groups: jax.Array) -> jax.Array:  # [prompts, 1] bool
    """True for a prompt group whose raw scores are all exactly equal (max == min).

    Such a group carries no signal and gets advantage exactly 0. The test is exact equality of
    the scores, not a small std: the fp32 mean of scores that are not exact (16 x 0.7, or 1.0
    minus a language penalty) can be one ulp off, which GRPO's division by (std + eps) would
    blow up to ~0.1; a genuinely small difference between scores keeps its advantage.
    """
    return jnp.max(groups, axis=1, keepdims=True) == jnp.min(groups, axis=1, keepdims=True)


def _broadcast_over_tokens(sequence_advantages: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, sequence_advantages.reshape(-1)[:, None], 0.0)  # [B, T]


def _reject_kl_reward(config: AdvantageConfig, estimator: str) -> None:
    if config.kl_reward_coeff != 0:
        raise ValueError(
            f"advantage estimator {estimator!r} uses sequence scores only; set kl_reward_coeff=0 "
            f"and use kl_loss_coeff for a KL penalty (got kl_reward_coeff={config.kl_reward_coeff})"
        )


def _returns_advantages(
    scores: jax.Array,
    mask: jax.Array,
    logprobs: ArrayLike | None,
    ref_logprobs: ArrayLike | None,
    config: AdvantageConfig,
) -> jax.Array:
    """Token rewards (score + optional KL reward) -> discounted returns -> optional whitening."""
    kl = None
    if config.kl_reward_coeff != 0:
        if logprobs is None or ref_logprobs is None:
            raise ValueError("kl_reward_coeff != 0 needs both logprobs and ref_logprobs")
        # Padding is masked before the estimate so garbage there cannot overflow exp().
        kl = kl_estimate(
            jnp.where(mask, as_float(logprobs), 0.0),
            jnp.where(mask, as_float(ref_logprobs), 0.0),
            kind=config.kl_estimator,
            clamp=config.kl_clamp,
        )
    rewards = token_rewards(scores, kl, mask, config.kl_reward_coeff)
    returns = discounted_returns(rewards, mask, config.gamma)
    if not config.whiten:
        return returns
    return masked_whiten(returns, mask, shift_mean=config.shift_mean, eps=config.whiten_eps)


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_advantages(
    *, scores, response_mask, logprobs, ref_logprobs, num_samples_per_prompt, config
) -> jax.Array:
    """The paper's Reinforce++ (SPEC §3): returns of the token rewards, whitened over the batch."""
    del num_samples_per_prompt  # one response per prompt; groups play no role
    return _returns_advantages(scores, response_mask, logprobs, ref_logprobs, config)


@register_advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    *, scores, response_mask, logprobs, ref_logprobs, num_samples_per_prompt, config
) -> jax.Array:
    """Reinforce++ on baselined scores: each score minus its prompt group's mean score (exactly 0
    for a group whose scores are all equal; the returns are then whitened as usual)."""
    groups = _scores_by_group(scores, num_samples_per_prompt, "reinforce_pp_baseline")
    baselined = groups - jnp.mean(groups, axis=1, keepdims=True)
    baselined = jnp.where(_equal_score_groups(groups), 0.0, baselined).reshape(-1)
    return _returns_advantages(baselined, response_mask, logprobs, ref_logprobs, config)


@register_advantage_estimator("grpo")
def grpo_advantages(
    *, scores, response_mask, logprobs, ref_logprobs, num_samples_per_prompt, config
) -> jax.Array:
    """GRPO: `(score - group mean) / (group std + grpo_eps)` on every valid token.

    The std is the unbiased (n - 1) sample std, as the GRPO paper's reference implementations
    (trl, verl: `torch.std`) use. `grpo_scale_by_std=False` gives Dr.GRPO's `score - group mean`.
    A group whose samples all score exactly the same gets advantage exactly 0 (see
    `_equal_score_groups`). Ignores whitening options.
    """
    del logprobs, ref_logprobs
    _reject_kl_reward(config, "grpo")
    groups = _scores_by_group(scores, num_samples_per_prompt, "grpo")  # [prompts, n]
    advantages = groups - jnp.mean(groups, axis=1, keepdims=True)
    if config.grpo_scale_by_std:
        group_std = jnp.std(groups, axis=1, ddof=1, keepdims=True)
        advantages = safe_divide(advantages, group_std + config.grpo_eps)  # 0/0 -> 0 if eps = 0
    advantages = jnp.where(_equal_score_groups(groups), 0.0, advantages)
    return _broadcast_over_tokens(advantages, response_mask)


@register_advantage_estimator("rloo")
def rloo_advantages(
    *, scores, response_mask, logprobs, ref_logprobs, num_samples_per_prompt, config
) -> jax.Array:
    """RLOO: score minus the mean score of the prompt's other n - 1 samples, on every valid token
    (exactly 0 for a group whose scores are all equal)."""
    del logprobs, ref_logprobs
    _reject_kl_reward(config, "rloo")
    groups = _scores_by_group(scores, num_samples_per_prompt, "rloo")  # [prompts, n]
    others_mean = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (num_samples_per_prompt - 1)
    advantages = jnp.where(_equal_score_groups(groups), 0.0, groups - others_mean)
    return _broadcast_over_tokens(advantages, response_mask)
