"""Query + response sequences as static-shape arrays, and their teacher-forced log-probabilities.

Layout of a batch (the same for scoring, trajectories and the policy update):

    column:   0 ............ P-1 | P ............ P+R-1
    row b:    [pad..pad prompt_b] [response_b  pad..pad]

Prompts are left-padded to P columns and responses right-padded to R columns, so every prompt
ends at column P-1 and response token t of every row sits at column P + t. P and R are rounded
up to buckets so a run compiles a bounded number of shapes. All data-dependent metadata
(M-RoPE positions, image-feature placement, packed patches) is computed here on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maye_jax.models.configs import ModelConfig
from maye_jax.models.logprobs import token_logprobs
from maye_jax.models.rope import get_rope_index, prompt_token_types
from maye_jax.models.shapes import bucket, round_up
from maye_jax.models.vision_inputs import image_feature_index, pack_images, pad_rows
from maye_jax.qwen_ids import PAD_ID


@dataclasses.dataclass
class SequenceBatch:
    input_ids: np.ndarray  # [B, P + R] int32
    attention_mask: np.ndarray  # [B, P + R] int32
    positions: np.ndarray  # [3, B, P + R] int32
    image_feature_index: np.ndarray  # [B, P + R] int32, -1 = not an image token
    response_mask: np.ndarray  # [B, R] int32
    prompt_len: int  # P
    vision: dict[str, np.ndarray] | None  # packed patches (models/vision_inputs.py)
    rope_deltas: np.ndarray  # [B] int32, for positions of tokens appended after the prompt

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def device_rows(self, start: int, stop: int, response_len: int | None = None) -> dict:
        """`device_arrays()` of rows [start, stop), without the packed images (which belong to
        the whole batch): positions [3, B, L] keep their row axis second. `response_len`: only
        the first response columns (they must hold every response of these rows)."""
        return self.device_take(np.arange(start, min(stop, len(self.input_ids))), response_len)

    def device_take(self, rows: np.ndarray, response_len: int | None = None) -> dict:
        """`device_rows` of the given rows, in that order."""
        columns = self.prompt_len + (response_len or self.response_len)
        if response_len and self.response_mask[rows, response_len:].any():
            raise ValueError(f"rows {list(rows)} have responses longer than {response_len}")
        arrays = dict(
            input_ids=self.input_ids[rows, :columns],
            attention_mask=self.attention_mask[rows, :columns],
            positions=self.positions[:, rows, :columns],
            image_feature_index=self.image_feature_index[rows, :columns],
            response_mask=self.response_mask[rows, : columns - self.prompt_len],
        )
        return jax.tree_util.tree_map(jnp.asarray, arrays)

    def device_arrays(self) -> dict:
        arrays = dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            positions=self.positions,
            image_feature_index=self.image_feature_index,
            response_mask=self.response_mask,
        )
        if self.vision is not None:
            arrays["vision"] = self.vision
        return jax.tree_util.tree_map(jnp.asarray, arrays)


# The response length R of the RL and SFT steps is rounded up to this: every padding position
# still costs a full-vocabulary logit row (152k x hidden) in each forward and backward.
RESPONSE_LEN_MULTIPLE = 8


def response_len_buckets(max_tokens: int, count: int) -> tuple[int, ...]:
    """The response lengths R an RL step may use, ascending: max_tokens / 2^k for k < count,
    each rounded up to RESPONSE_LEN_MULTIPLE (e.g. 2048, 4 -> 256, 512, 1024, 2048). A batch
    takes the smallest that holds its longest response, so a run compiles at most `count`
    response lengths per prompt bucket."""
    lengths = {
        round_up(max(1, -(-max_tokens // 2**k)), RESPONSE_LEN_MULTIPLE) for k in range(count)
    }
    return tuple(sorted(lengths))


def response_bucket(longest: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` (ascending) that holds `longest` response tokens."""
    for length in buckets:
        if longest <= length:
            return length
    raise ValueError(f"a response of {longest} tokens exceeds the longest bucket {buckets[-1]}")


def make_sequence_batch(
    prompts: Sequence[dict],
    responses: Sequence[Sequence[int]],
    config: ModelConfig,
    *,
    pad_id: int = PAD_ID,
    length_multiple: int = 32,
    min_response_len: int = 1,
    prompt_multiple: int | None = None,
    response_len: int | None = None,
    batch_size: int | None = None,
    min_prompt_len: int = 1,
) -> SequenceBatch:
    """`prompts`: processor outputs (input_ids, pixel_values, image_grid_thw) of each row;
    `responses`: token ids of each row's response (may be empty). `batch_size` pads the batch
    with empty rows (all padding) to a fixed size. Fixed shapes mean fewer compilations of the
    jitted steps: `response_len` fixes R (e.g. to max_tokens), `prompt_multiple` rounds P
    more coarsely than `length_multiple`; P holds at least `min_prompt_len` (several processes
    pass the longest prompt of all, so their batches have one shape)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = batch_size or len(prompts)
    if rows < len(prompts):
        raise ValueError(f"batch_size {rows} < {len(prompts)} rows")
    prompt_ids = [np.asarray(p["input_ids"]).reshape(-1) for p in prompts]
    _check_vocabulary(prompt_ids, responses, pad_id, config.text.vocab_size)
    longest_prompt = max(min_prompt_len, 1, *(len(p) for p in prompt_ids))
    prompt_len = round_up(longest_prompt, prompt_multiple or length_multiple)
    longest = max([len(r) for r in responses] + [min_response_len])
    if response_len is None:
        response_len = round_up(max(longest, 1), length_multiple)
    elif longest > response_len:
        raise ValueError(f"a response has {longest} tokens, more than response_len {response_len}")
    total = prompt_len + response_len
    input_ids = np.full((rows, total), pad_id, np.int32)
    attention_mask = np.zeros((rows, total), np.int32)
    response_mask = np.zeros((rows, response_len), np.int32)
    for row, (ids, response) in enumerate(zip(prompt_ids, responses)):
        input_ids[row, prompt_len - len(ids) : prompt_len] = ids
        attention_mask[row, prompt_len - len(ids) : prompt_len] = 1
        input_ids[row, prompt_len : prompt_len + len(response)] = response
        attention_mask[row, prompt_len : prompt_len + len(response)] = 1
        response_mask[row, : len(response)] = 1
    types = prompt_token_types(input_ids, np.full(rows, prompt_len), config.image_token_id)
    grids = [
        np.asarray(p["image_grid_thw"]).reshape(-1, 3)
        for p in prompts
        if p.get("image_grid_thw") is not None
    ]
    grid_thw = np.concatenate(grids) if grids else None
    positions, rope_deltas = get_rope_index(
        input_ids, attention_mask, types, grid_thw, config.vision.spatial_merge_size
    )
    vision = None
    feature_index = np.full(input_ids.shape, -1, np.int32)
    if grid_thw is not None:
        pixels = np.concatenate(
            [np.asarray(p["pixel_values"]) for p in prompts if p.get("image_grid_thw") is not None]
        )
        # the rows the images fill (several small images share one), rounded to a power of
        # two; rounding the number of images instead left rows of padding for the tower
        packed = pack_images(pixels, grid_thw, config.vision)
        packed = pad_rows(packed, bucket(len(packed.patches), minimum=1))
        vision = packed.arrays()
        feature_index = image_feature_index(types, packed.feature_index)
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        positions=positions,
        image_feature_index=feature_index,
        response_mask=response_mask,
        prompt_len=prompt_len,
        vision=vision,
        rope_deltas=rope_deltas,
    )


def _check_vocabulary(prompt_ids, responses, pad_id: int, vocab_size: int) -> None:
    """An id outside the embedding table would silently embed as NaN under jit: refuse it."""
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad id {pad_id} is outside the model's vocabulary ({vocab_size})")
    for row, (prompt, response) in enumerate(zip(prompt_ids, responses)):
        for name, ids in (("prompt", prompt), ("response", response)):
            ids = np.asarray(ids)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(
                    f"row {row}: {name} token id {int(ids.max())} is outside the "
                    f"model's vocabulary ({vocab_size})"
                )


def image_features(model: nnx.Module, vision: dict | None):
    """The frozen tower's output for a batch; computed once and reused by every forward."""
    if vision is None:
        return None
    return model.encode_images(**vision)


@nnx.jit
def tower_features(model: nnx.Module, vision: dict):
    """Jitted `image_features`: a frozen tower's output for one batch's packed images."""
    return image_features(model, vision)


def response_logprobs(
    model: nnx.Module,
    arrays: dict,
    features,
    *,
    prompt_len: int,
    temperature: float = 1.0,
    chunk_size: int = 512,
    with_entropy: bool = False,
):
    """Teacher-forced logprobs [B, R] (and entropies) of the response tokens.

    Column P-1+t predicts response token t (column P+t).
    """
    hidden = model.hidden_states(
        arrays["input_ids"],
        arrays["positions"],
        arrays["attention_mask"],
        features,
        arrays["image_feature_index"],
    )
    predicting = hidden[:, prompt_len - 1 : -1]
    targets = arrays["input_ids"][:, prompt_len:]
    return token_logprobs(
        predicting,
        model.output_embedding(),
        targets,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )


@nnx.jit(static_argnames=("prompt_len", "temperature", "chunk_size"))
def batch_logprobs(
    model, arrays, features, *, prompt_len: int, temperature: float = 1.0, chunk_size: int = 512
):
    """Jitted `response_logprobs` [B, R], the one compiled wrapper: the trajectory's logprob
    chunks and `score_batch` both call it (`features`: the tower's output for the images the
    rows index, or None)."""
    return response_logprobs(
        model,
        arrays,
        features,
        prompt_len=prompt_len,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def score_batch(model, arrays, *, prompt_len: int, temperature: float = 1.0, chunk_size: int = 512):
    """Image features (the jitted tower) + response logprobs (`batch_logprobs`) for one
    SequenceBatch's device arrays."""
    vision = arrays.get("vision")
    features = None if vision is None else tower_features(model, vision)
    rows = {name: value for name, value in arrays.items() if name != "vision"}
    return batch_logprobs(
        model, rows, features, prompt_len=prompt_len, temperature=temperature, chunk_size=chunk_size
    )
