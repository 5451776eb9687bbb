"""Step 3 of MAYE: from prompts and sampled responses to everything the update needs.

Queries and responses are concatenated in the layout of `maye_jax/sequences.py`, masks and
M-RoPE positions recomputed on the host, the frozen vision tower run once for the batch, and
the policy (`logprobs_old`, SPEC §3: recomputed by the trainer) and reference log-probabilities
computed in chunks of `forward_batch_size` rows. Rewards are scored on the decoded texts
(`score_responses`, which dynamic sampling calls before the trajectory to drop prompt groups).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from maye_jax.data.records import Record
from maye_jax.data.sequences import (
    SequenceBatch,
    batch_logprobs,
    make_sequence_batch,
    response_bucket,
    response_len_buckets,
    tower_features,
)
from maye_jax.models.configs import ModelConfig
from maye_jax.models.shapes import round_up
from maye_jax.rl import rewards as rewards_lib
from maye_jax.rollout.engine import Completion


@dataclasses.dataclass(frozen=True)
class TrajectoryConfig:
    """Options of step 3 (`Settings.trajectory_config()` builds it from the run's config).

    reward_names / reward_options / reward_weights: the enabled rewards, each one's keyword
    options, and the weights of users' functions in the total (the others: 1.0);
    penalty: None (off) or {min_response_length, reward_penalty} of the original's no-EOS /
    too-short penalty; overlong: None (off) or {max_tokens, buffer_len, penalty_factor} of
    DAPO's additive overlong penalty (maye_jax/rl/penalties.py); temperature: of the sampling
    distribution (logprobs of log_softmax(logits / T)); forward_batch_size: rows per logprob
    forward; chunk_size: sequence chunk of the logits; rows_multiple: the batch's rows round up
    to this (the PPO mini-batch); max_tokens: the longest response; response_len_buckets: R,
    the response columns, is the smallest of `response_len_buckets(max_tokens, this)` that holds
    the batch's longest response (each logprob chunk narrows to its own; 1: always max_tokens
    rounded up to 8); prompt_multiple: P rounds up to this, so the steps compile once per
    (prompt, response) bucket."""

    reward_names: tuple[str, ...] = ("accuracy", "language")
    reward_options: Mapping[str, Mapping] = dataclasses.field(default_factory=dict)
    reward_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    penalty: Mapping[str, float] | None = None
    overlong: Mapping[str, float] | None = None
    temperature: float = 1.0
    forward_batch_size: int = 112
    chunk_size: int = 512
    rows_multiple: int = 1
    max_tokens: int = 2048
    response_len_buckets: int = 1
    prompt_multiple: int = 64

    @property
    def response_buckets(self) -> tuple[int, ...]:
        return response_len_buckets(self.max_tokens, self.response_len_buckets)


@dataclasses.dataclass
class Trajectory:
    batch: SequenceBatch  # host arrays, rows = prompts x samples (+ padding rows)
    features: jax.Array | None  # [N, D] frozen tower output of the batch
    num_rows: int  # real rows (the rest of the batch is padding)
    logprobs_old: np.ndarray  # [B, R] float32
    ref_logprobs: np.ndarray  # [B, R] float32
    rollout_logprobs: np.ndarray  # [B, R] float32, from the rollout engine
    scores: np.ndarray  # [B] total reward (0 on padding rows)
    reward_components: dict[str, np.ndarray]  # name -> [B]
    correct: np.ndarray  # [B] bool, accuracy reward == 1
    response_lengths: np.ndarray  # [B] int
    finished: np.ndarray  # [B] bool, ended with a stop token
    texts: list[str]
    prompt_ids: list[str]
    # For a tower that trains inside the update (`update.micro_batch_images`): the prompt of
    # each row (-1 on padding rows) and each prompt's (pixel_values, image_grid_thw) or None.
    row_prompt: np.ndarray  # [B] int
    prompt_images: list[tuple[np.ndarray, np.ndarray] | None]


def forward_logprobs(
    model,
    batch: SequenceBatch,
    features,
    *,
    temperature: float,
    forward_batch_size: int,
    chunk_size: int,
    response_buckets: Sequence[int] | None = None,
) -> np.ndarray:
    """Response logprobs [B, R] in row chunks (features index the whole batch's tower output).
    `response_buckets`: the rows go through in order of response length, and each chunk
    computes only the response columns of the smallest bucket that holds its longest response
    (the rest are padding, 0), so a few long responses cost one wide chunk, not every chunk."""
    rows = batch.input_ids.shape[0]
    step = min(forward_batch_size, rows)
    lengths = batch.response_mask.sum(axis=1)
    bucketed = response_buckets is not None and len(response_buckets) > 1
    order = np.argsort(lengths, kind="stable") if bucketed else np.arange(rows)
    out = np.zeros(batch.response_mask.shape, np.float32)
    for start in range(0, rows, step):
        chunk_rows = order[start : start + step]
        width = batch.response_len
        if bucketed:
            longest = max(int(lengths[chunk_rows].max()), 1)
            width = min(response_bucket(longest, response_buckets), width)
        out[chunk_rows, :width] = np.asarray(
            batch_logprobs(
                model,
                batch.device_take(chunk_rows, response_len=width),
                features,
                prompt_len=batch.prompt_len,
                temperature=temperature,
                chunk_size=chunk_size,
            )
        )
    return out


def score_responses(
    records: Sequence[Record],
    completions: Sequence[Sequence[Completion]],
    options: TrajectoryConfig,
) -> dict[str, list[float]]:
    """Each reward component and `total` per response, rows prompt-major (all samples of
    records[0], then records[1], ...), with the configured length penalties."""
    row_records = [record for record, samples in zip(records, completions) for _ in samples]
    samples = [completion for group in completions for completion in group]
    return rewards_lib.compute_rewards(
        list(options.reward_names),
        [completion.text for completion in samples],
        [r.reward_solution for r in row_records],
        answers=[r.answer for r in row_records],
        options={name: dict(values) for name, values in options.reward_options.items()},
        finished_with_eos=(
            [c.finish_reason == "stop" for c in samples] if options.penalty is not None else None
        ),
        response_lengths=[len(completion.token_ids) for completion in samples],
        **(options.penalty or {}),
        overlong=None if options.overlong is None else dict(options.overlong),
        records=[r.reward_fields() for r in row_records],
        weights=dict(options.reward_weights),
    )


def build_trajectory(
    *,
    policy: nnx.Module,
    reference: nnx.Module | None,
    config: ModelConfig,
    records: Sequence[Record],
    prompts: Sequence[dict],
    completions: Sequence[Sequence[Completion]],
    options: TrajectoryConfig,
    pad_id: int,
    reference_shares_vision: bool = True,
    rewards: Mapping[str, Sequence[float]] | None = None,
    min_prompt_len: int = 1,
    min_response_len: int = 1,
) -> Trajectory:
    """`completions[i]` are the samples of `prompts[i]` (of `records[i]`); rows are laid out
    prompt-major (all samples of prompt 0, then prompt 1, ...), as GRPO/RLOO expect.
    `rewards`: `score_responses` of these rows when already computed (else scored here).
    `min_prompt_len`/`min_response_len`: the longest prompt and response of every process's
    rows, so that all processes lay out their rows with the same P and R.

    When the vision tower is frozen the reference shares it, so its features are reused."""
    o = options
    row_prompts, row_records, responses, rollout_lp, texts, finished = [], [], [], [], [], []
    row_prompt = []
    for prompt_index, (record, prompt, samples) in enumerate(zip(records, prompts, completions)):
        for completion in samples:
            row_prompt.append(prompt_index)
            row_prompts.append(prompt)
            row_records.append(record)
            responses.append(list(completion.token_ids))
            rollout_lp.append(list(completion.logprobs))
            texts.append(completion.text)
            finished.append(completion.finish_reason == "stop")
    num_rows = len(responses)
    batch_size = round_up(num_rows, o.rows_multiple)
    # R and P rounded up to buckets: the steps compile once per (prompt, response) bucket.
    longest = max([len(r) for r in responses] + [1])
    batch = make_sequence_batch(
        row_prompts,
        responses,
        config,
        pad_id=pad_id,
        batch_size=batch_size,
        prompt_multiple=o.prompt_multiple,
        response_len=response_bucket(max(longest, min_response_len), o.response_buckets),
        min_prompt_len=min_prompt_len,
    )
    features = tower_features(policy, batch.device_arrays()["vision"]) if batch.vision else None
    logprobs_old = forward_logprobs(
        policy,
        batch,
        features,
        temperature=o.temperature,
        forward_batch_size=o.forward_batch_size,
        chunk_size=o.chunk_size,
        response_buckets=o.response_buckets,
    )
    if reference is not None:
        ref_features = features
        if batch.vision and not reference_shares_vision:
            ref_features = tower_features(reference, batch.device_arrays()["vision"])
        ref_logprobs = forward_logprobs(
            reference,
            batch,
            ref_features,
            temperature=o.temperature,
            forward_batch_size=o.forward_batch_size,
            chunk_size=o.chunk_size,
            response_buckets=o.response_buckets,
        )
    else:
        ref_logprobs = np.zeros_like(logprobs_old)
    rollout = np.zeros_like(logprobs_old)
    for row, values in enumerate(rollout_lp):
        rollout[row, : len(values)] = values

    lengths = batch.response_mask.sum(axis=1).astype(np.int64)
    components = score_responses(records, completions, o) if rewards is None else rewards
    padded = {
        name: _pad(np.asarray(values, np.float32), batch_size)
        for name, values in components.items()
    }
    accuracy = padded.get("accuracy", np.zeros(batch_size, np.float32))
    return Trajectory(
        batch=batch,
        features=features,
        num_rows=num_rows,
        logprobs_old=logprobs_old,
        ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout,
        scores=padded["total"],
        reward_components={k: v for k, v in padded.items() if k != "total"},
        correct=accuracy >= 1.0,
        response_lengths=lengths,
        finished=_pad(np.asarray(finished), batch_size),
        texts=texts,
        prompt_ids=[r.id for r in row_records],
        row_prompt=_pad(np.asarray(row_prompt, np.int32), batch_size, fill=-1),
        prompt_images=[prompt_images(p) for p in prompts],
    )


def shared_lengths(prompts: Sequence[dict], completions) -> dict[str, int]:
    """Several processes: `build_trajectory`'s min_prompt_len / min_response_len, the longest
    prompt and response of every process's rows, so all lay out their rows with the same P, R."""
    from maye_jax.run import multihost

    longest = [
        max(len(np.asarray(p["input_ids"]).reshape(-1)) for p in prompts),
        max(len(c.token_ids) for samples in completions for c in samples),
    ]
    longest = multihost.allgather_rows(np.asarray([longest])).max(axis=0)
    return dict(min_prompt_len=int(longest[0]), min_response_len=int(longest[1]))


def prompt_images(prompt: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(pixel_values, image_grid_thw) of a processor output, None when it has no image."""
    if prompt.get("image_grid_thw") is None:
        return None
    return np.asarray(prompt["pixel_values"]), np.asarray(prompt["image_grid_thw"]).reshape(-1, 3)


def _pad(values: np.ndarray, size: int, fill=0) -> np.ndarray:
    out = np.full((size,) + values.shape[1:], fill, values.dtype)
    out[: len(values)] = values
    return out
