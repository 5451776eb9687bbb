"""The in-process JAX sampler: the default rollout engine (same process, same weights, no copy).

One `generate` call, for each chunk of at most `max_rows` sample rows:
  1. host: the chunk's prompts -> a left-padded prompt batch (maye_jax/sequences.py: M-RoPE
     positions, rope deltas, packed images); rows and lengths rounded up to buckets;
  2. jit `_prompt_embeddings`: the image features (computed once) scattered into the prompt's
     token embeddings;
  3. jit `_prefill`: every prompt once into a KV cache (the last layer runs its attention
     output and MLP for the last position only: only it is sampled from), each prompt's cache
     copied to its n sample rows, response token 0 sampled;
  4. jit `_decode`: one-token decode steps in a `lax.while_loop` that ends as soon as every
     row has stopped (or after max_tokens).
`last_timings` holds the seconds of each phase of the last call.

KV cache of one layer: [rows, P + R, kv_heads, head_dim]; slots 0..P-1 hold the left-padded
prompt (padding slots are masked out), slot P + t holds response token t.

    slot:    0 ........... P-1 | P ..................... P+R-1
    row r:   [pad..pad prompt ] [token 0, token 1, ...  unused]

Response token t of row r has M-RoPE position (valid prompt tokens of r) + t + rope_deltas[r] in
all three components, as transformers generates it. Shapes are static per (prompt rows, P, sample
rows, R, greedy, truncation): rows are powers of two (at least `batch_bucket`), P the longest
prompt rounded up by `shapes.round_up_geometric` (a multiple of `prompt_bucket`, or of 1/8 of
P rounded down to a power of two when that is larger: at most 1/8 padding), R a multiple of
`length_bucket`, so a run compiles a bounded number of programs.

Randomness: the key of sample j of prompt i is `request_seed(seed, step, i, j)` (i: the prompt's
global index, `first_index + ` its position in the call), folded with the
token index at every step, so a completion does not depend on which requests share its batch.
"""

from __future__ import annotations

import collections
import functools
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maye_jax.data.sequences import image_features, make_sequence_batch
from maye_jax.models.configs import ModelConfig
from maye_jax.models.decode_cache import SharedPrefixCache, empty_response_slots
from maye_jax.models.hf_mapping import (
    from_hf_layout,
    hf_name_for,
    logical_shapes,
    normalize_hf_name,
)
from maye_jax.models.qwen_vl import causal_padding_mask
from maye_jax.models.shapes import bucket, round_up, round_up_geometric
from maye_jax.qwen_ids import PAD_ID
from maye_jax.rollout.engine import Completion, Prompt, Sampling, request_seed
from maye_jax.rollout.sampling_ops import sample_tokens

# Number of times each jitted function was traced in this process (one per compiled shape).
TRACE_COUNTS: collections.Counter = collections.Counter()

_NO_TOKEN = -1  # fills the output after a row has finished (never returned)


class JaxSampler:
    """A `RolloutEngine` (maye_jax/rollout/engine.py) that runs the Flax model in this process."""

    def __init__(
        self,
        model: nnx.Module,
        config: ModelConfig,
        tokenizer: Any = None,
        *,
        pad_id: int = PAD_ID,
        prompt_bucket: int = 16,
        length_bucket: int = 128,
        batch_bucket: int = 8,
        max_rows: int | None = 256,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.prompt_bucket = prompt_bucket
        self.length_bucket = length_bucket
        self.batch_bucket = batch_bucket
        self.max_rows = max_rows
        self.weights_version: int | None = None  # None: the model given at construction
        # Seconds of the last `generate` by phase (each phase waits for its device work):
        # host_seconds (prompt batch, packed images), encode_seconds (vision tower + token
        # embeddings), prefill_seconds, decode_seconds, and decode_steps.
        self.last_timings: collections.Counter = collections.Counter()
        self.set_model(model)

    # -- weights ------------------------------------------------------------------------
    def set_model(self, model: nnx.Module) -> None:
        """Samples from `model` from now on (the in-process way to sync: no copy is made)."""
        self._graphdef, self._state = nnx.split(model)

    def load_policy(self, model: nnx.Module, version: int) -> None:
        """The RolloutEngine way to get new weights: `set_model`; completions record `version`
        (whether a version needs loading is the run's `Rollouts`' to know)."""
        self.set_model(model)
        self.weights_version = version

    def sync_weights(self, named_hf_arrays: Mapping[str, np.ndarray], version: int) -> str:
        """Replaces the named parameters (HF names and layouts; a subset, e.g. only the trainable
        ones, is fine) and returns `weights_checksum` of what was loaded."""
        flat = dict(nnx.to_flat_state(self._state))
        by_hf_name = {hf_name_for(".".join(str(p) for p in path)): path for path in flat}
        tied = self.config.tie_word_embeddings
        for raw_name in sorted(named_hf_arrays):
            name = normalize_hf_name(raw_name)
            if tied and name == "lm_head.weight":
                continue
            if name not in by_hf_name:
                raise KeyError(f"sync_weights: unknown tensor {raw_name!r} (version {version})")
            path = by_hf_name[name]
            flax_name = ".".join(str(p) for p in path)
            old = flat[path].get_value()
            value = from_hf_layout(flax_name, np.asarray(named_hf_arrays[raw_name]))
            expected = logical_shapes(self.config)[flax_name]
            if value.shape != expected:
                raise ValueError(
                    f"sync_weights: {raw_name} has shape {np.shape(named_hf_arrays[raw_name])}; "
                    f"the model expects {expected} in our layout (version {version})"
                )
            if old.shape != expected:  # a trainer's padded copy (sharding/rules.storage_shape)
                value = np.pad(value, [(0, o - n) for o, n in zip(old.shape, expected)])
            placed = jax.device_put(value.astype(old.dtype), old.sharding)
            flat[path] = flat[path].replace(placed)
        self._state = nnx.from_flat_state(flat)
        self.weights_version = version
        return weights_checksum(named_hf_arrays)

    def close(self) -> None:
        self._state = None

    # -- sampling -----------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, *, step: int = 0, first_index: int = 0
    ) -> list[list[Completion]]:
        """Per prompt, `sampling.n` completions (SPEC §3 logprobs, stop token included).
        `prompts[i]` draws with the seeds of global prompt index `first_index + i`."""
        _check_sampling(sampling)
        for index, prompt in enumerate(prompts):
            if np.asarray(prompt.prompt_token_ids).size == 0:
                raise ValueError(f"generate: prompt {index} has no tokens")
        per_chunk = max(1, (self.max_rows or len(prompts) * sampling.n) // sampling.n)
        self.last_timings = collections.Counter()
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = list(prompts[start : start + per_chunk])
            results.extend(self._generate_chunk(chunk, first_index + start, sampling, step))
        return results

    def _generate_chunk(
        self, prompts: list[Prompt], first_index: int, sampling: Sampling, step: int
    ) -> list[list[Completion]]:
        n = sampling.n
        started = time.perf_counter()
        longest = max(len(np.asarray(p.prompt_token_ids).reshape(-1)) for p in prompts)
        batch = make_sequence_batch(
            [
                dict(
                    input_ids=p.prompt_token_ids,
                    pixel_values=p.pixel_values,
                    image_grid_thw=p.image_grid_thw,
                )
                for p in prompts
            ],
            [[] for _ in prompts],
            self.config,
            pad_id=self.pad_id,
            length_multiple=1,
            min_prompt_len=round_up_geometric(longest, self.prompt_bucket),
            # n rows per prompt row: at least `batch_bucket` rows in all
            batch_size=bucket(len(prompts), max(1, self.batch_bucket // n)),
        )
        prompt_len = batch.prompt_len
        num_rows = len(batch.input_ids) * n  # row i * n + j: sample j of prompt i
        row_seed = np.zeros(num_rows, np.int32)
        row_active = np.zeros(num_rows, bool)
        for i in range(len(prompts)):
            for j in range(n):
                row_seed[i * n + j] = request_seed(sampling.seed, step, first_index + i, j)
                row_active[i * n + j] = True
        stop_ids = np.full(bucket(len(sampling.stop_token_ids), 4), _NO_TOKEN, np.int32)
        stop_ids[: len(sampling.stop_token_ids)] = sampling.stop_token_ids
        vision = None if batch.vision is None else jax.tree.map(jnp.asarray, batch.vision)
        timings = self.last_timings
        timings["host_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        embeds, deepstack = jax.block_until_ready(
            _prompt_embeddings(
                self._graphdef,
                self._state,
                jnp.asarray(batch.input_ids[:, :prompt_len]),
                jnp.asarray(batch.image_feature_index[:, :prompt_len]),
                vision,
            )
        )
        timings["encode_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        response_len = round_up(max(sampling.max_tokens, 1), self.length_bucket)
        options = dict(
            greedy=sampling.greedy,
            use_top_k=0 < sampling.top_k < self.config.text.vocab_size,
            use_top_p=sampling.top_p < 1.0,
        )
        settings = (
            jnp.float32(max(sampling.temperature, 0.0)),
            jnp.int32(sampling.top_k),
            jnp.float32(sampling.top_p),
            jnp.int32(sampling.max_tokens),
            jnp.asarray(stop_ids),
        )
        rows = jax.block_until_ready(
            _prefill(
                self._graphdef,
                self._state,
                embeds,
                deepstack,
                jnp.asarray(batch.positions[:, :, :prompt_len]),
                jnp.asarray(batch.attention_mask[:, :prompt_len]),
                jnp.asarray(batch.rope_deltas),
                jnp.asarray(row_seed),
                jnp.asarray(row_active),
                settings,
                response_len=response_len,
                **options,
            )
        )
        timings["prefill_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        rows, steps = _decode(self._graphdef, self._state, rows, settings, **options)
        tokens, logprobs, lengths, steps = jax.device_get(
            (rows["tokens"], rows["logprobs"], rows["lengths"], steps)
        )
        timings["decode_seconds"] += time.perf_counter() - started
        timings["decode_steps"] += int(steps)
        stop_set = set(sampling.stop_token_ids)
        out = []
        for i in range(len(prompts)):
            completions = []
            for j in range(n):
                row = i * n + j
                ids = tokens[row, : lengths[row]].tolist()
                completions.append(
                    Completion(
                        token_ids=ids,
                        logprobs=logprobs[row, : lengths[row]].tolist(),
                        text=self._decode(ids),
                        finish_reason="stop" if ids and ids[-1] in stop_set else "length",
                        weights_version=self.weights_version,
                    )
                )
            out.append(completions)
        return out

    def _decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def weights_checksum(named_arrays: Mapping[str, np.ndarray]) -> str:
    """CRC32 over (name, dtype, shape, bytes) of every array, in name order, as 8 hex digits."""
    crc = 0
    for name in sorted(named_arrays):
        array = np.ascontiguousarray(named_arrays[name])
        header = f"{name}|{array.dtype.str}|{array.shape}".encode()
        crc = zlib.crc32(memoryview(array).cast("B"), zlib.crc32(header, crc))
    return f"{crc:08x}"


def _check_sampling(sampling: Sampling) -> None:
    if sampling.n < 1:
        raise ValueError(f"Sampling.n must be >= 1, got {sampling.n}")
    if sampling.max_tokens < 1:
        raise ValueError(f"Sampling.max_tokens must be >= 1, got {sampling.max_tokens}")
    if sampling.temperature < 0:  # 0 is greedy decoding; below it, logits flip sign
        raise ValueError(f"Sampling.temperature must be >= 0, got {sampling.temperature}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"Sampling.top_p must be in (0, 1], got {sampling.top_p}")
    if not sampling.stop_token_ids or min(sampling.stop_token_ids) < 0:
        raise ValueError(f"Sampling.stop_token_ids must be non-negative ids, got {sampling}")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_embeddings(graphdef, state, input_ids, image_feature_index, vision):
    """[prompt rows, P, D] token embeddings with the image features in place, and the DeepStack
    levels [K, prompt rows, P, D] (Qwen3-VL) or None."""
    TRACE_COUNTS["prompt_embeddings"] += 1
    model = nnx.merge(graphdef, state)
    features = image_features(model, vision)
    return model.embed(input_ids, features, None if features is None else image_feature_index)


def _compute_weights(graphdef, state):
    """The model with its float weights cast to the compute dtype once, not at every use inside
    the decode loop (the model casts each weight where it uses it, so the numbers are the same)."""
    compute_dtype = nnx.merge(graphdef, state).dtype
    state = jax.tree.map(
        lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
    )
    return nnx.merge(graphdef, state)


def _emit(rows, settings, logits, index, *, greedy, use_top_k, use_top_p):
    """Samples response token `index` of every row from `logits` [B, V] and records it in
    `rows` (the decode state: see `_prefill`); returns the new state."""
    temperature, top_k, top_p, max_tokens, stop_ids = settings
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rows["keys"], index)
    token, logprob = sample_tokens(
        logits,
        keys,
        temperature,
        top_k,
        top_p,
        greedy=greedy,
        use_top_k=use_top_k,
        use_top_p=use_top_p,
    )
    done = rows["done"]
    stopped = jnp.any(token[:, None] == stop_ids[None, :], axis=1)
    return dict(
        rows,
        tokens=rows["tokens"].at[:, index].set(jnp.where(done, _NO_TOKEN, token)),
        logprobs=rows["logprobs"].at[:, index].set(jnp.where(done, 0.0, logprob)),
        lengths=rows["lengths"] + (~done).astype(jnp.int32),
        done=done | stopped | (index + 1 >= max_tokens),
        last_token=token,
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "response_len", "greedy", "use_top_k", "use_top_p")
)
def _prefill(
    graphdef,
    state,
    embeds,  # [Bp, P, D] prompt embeddings
    deepstack,  # [K, Bp, P, D] the prompt's DeepStack levels (Qwen3-VL), or None
    positions,  # [3, Bp, P] M-RoPE positions of the prompt
    prompt_mask,  # [Bp, P] 1 = prompt token, 0 = left padding
    rope_deltas,  # [Bp]
    row_seed,  # [B] request_seed of each row (B = Bp * n: row i * n + j is sample j of prompt i)
    row_active,  # [B] False for the rows that only pad the batch
    settings,  # (temperature, top_k, top_p, max_tokens, stop ids [S] padded with -1)
    *,
    response_len: int,
    greedy: bool,
    use_top_k: bool,
    use_top_p: bool,
):
    """Every prompt once into its layer caches (shared by its n rows: models/decode_cache.py),
    and response token 0 of every row sampled. Returns the decode state: a dict of per-row
    arrays and the caches."""
    TRACE_COUNTS["prefill"] += 1
    model = _compute_weights(graphdef, state)
    text = model.config.text
    prompt_rows, prompt_len, _ = embeds.shape
    num_rows = row_seed.shape[0]
    samples = num_rows // prompt_rows

    empty = jnp.zeros((prompt_rows, prompt_len, text.num_kv_heads, text.head_dim), model.dtype)
    # Only the last position's hidden state is sampled from (outputs_from: the last layer
    # runs its attention output and MLP for that position only).
    hidden, caches = model.language_model(
        embeds,
        positions,
        causal_padding_mask(prompt_mask),
        kv_caches=[(empty, empty)] * text.num_layers,
        cache_index=0,
        deepstack=deepstack,
        outputs_from=prompt_len - 1,
    )
    first_logits = jnp.repeat(model.logits(hidden)[:, 0], samples, axis=0)  # [B, V]
    prompt_slots = prompt_mask.astype(bool)
    rows = dict(
        caches=[
            SharedPrefixCache(
                prompt_keys=keys,
                prompt_values=values,
                prompt_mask=prompt_slots,
                keys=empty_response_slots(keys, samples, response_len),
                values=empty_response_slots(values, samples, response_len),
            )
            for keys, values in caches
        ],
        prompt_tokens=jnp.repeat(jnp.sum(prompt_slots, axis=1, dtype=jnp.int32), samples),  # [B]
        rope_deltas=jnp.repeat(rope_deltas, samples),  # [B]
        keys=jax.vmap(jax.random.key)(row_seed),
        tokens=jnp.full((num_rows, response_len), _NO_TOKEN, jnp.int32),
        logprobs=jnp.zeros((num_rows, response_len), jnp.float32),
        lengths=jnp.zeros((num_rows,), jnp.int32),
        done=~row_active,
        last_token=jnp.zeros((num_rows,), jnp.int32),
    )
    return _emit(
        rows, settings, first_logits, 0, greedy=greedy, use_top_k=use_top_k, use_top_p=use_top_p
    )


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "greedy", "use_top_k", "use_top_p"),
    donate_argnames=("rows",),
)
def _decode(graphdef, state, rows, settings, *, greedy: bool, use_top_k: bool, use_top_p: bool):
    """One-token decode steps from `_prefill`'s state until every row has stopped or has
    max_tokens. Returns the final state (tokens [B, R] int32, logprobs [B, R] fp32, lengths [B]
    int32 ...) and the number of decode steps run."""
    TRACE_COUNTS["decode"] += 1
    model = _compute_weights(graphdef, state)
    max_tokens = settings[3]
    num_rows, response_len = rows["tokens"].shape

    def keep_going(carry):
        index, rows = carry
        return (index < max_tokens) & ~jnp.all(rows["done"])

    def decode_step(carry):
        """Feeds token index-1 (response slot index-1) and samples token `index`."""
        index, rows = carry
        position = rows["prompt_tokens"] + index - 1 + rows["rope_deltas"]  # [B]
        step_positions = jnp.broadcast_to(position[None, :, None], (3, num_rows, 1))
        response_slots = jnp.broadcast_to(
            jnp.arange(response_len) < index, (num_rows, 1, response_len)
        )
        hidden, caches = model.language_model(
            model.language_model.embed_tokens(rows["last_token"][:, None]),
            step_positions,
            response_slots,  # [B, 1, R]; the prompt slots' mask is in each cache
            kv_caches=rows["caches"],
            cache_index=index - 1,
        )
        rows = _emit(
            dict(rows, caches=caches),
            settings,
            model.logits(hidden)[:, 0],
            index,
            greedy=greedy,
            use_top_k=use_top_k,
            use_top_p=use_top_p,
        )
        return index + 1, rows

    steps, rows = jax.lax.while_loop(keep_going, decode_step, (jnp.int32(1), rows))
    return rows, steps - 1  # the whole state, so each donated buffer is an output's
