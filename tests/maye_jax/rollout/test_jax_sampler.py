"""The in-process JAX sampler: greedy equals transformers' generate, sampled logprobs equal the
trainer's teacher-forced ones, stop tokens, seeds, batching, truncation, weight sync."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from maye_jax.data.sequences import make_sequence_batch, score_batch
from maye_jax.rollout import jax_sampler
from maye_jax.rollout.engine import Prompt, Sampling
from maye_jax.rollout.jax_sampler import JaxSampler
from maye_jax.rollout.sampling_ops import sample_from_weights, sample_tokens, truncation_mask
from tests.models.conftest import hf_and_flax

NEW_TOKENS = 12


def _prompts(config, seed: int = 0) -> list[Prompt]:
    """Row 0: two images of different sizes; row 1: one image; row 2: text only (all different
    lengths, so the batch is left-padded)."""
    rng = np.random.default_rng(seed)
    merge = config.vision.spatial_merge_size
    text = lambda n: list(rng.integers(0, config.image_token_id - 20, size=n))

    def image(grid):
        tokens = grid[1] * grid[2] // merge**2
        return (
            [config.vision_start_token_id]
            + [config.image_token_id] * tokens
            + [config.vision_end_token_id]
        )

    def pixels(grids):
        patches = sum(int(np.prod(g)) for g in grids)
        return rng.standard_normal((patches, config.vision.patch_dim)).astype(np.float32)

    grids0, grids1 = [(1, 8, 8), (1, 4, 6)], [(1, 6, 10)]
    return [
        Prompt(
            np.array(text(3) + image(grids0[0]) + text(2) + image(grids0[1]) + text(4)),
            pixels(grids0),
            np.array(grids0),
        ),
        Prompt(np.array(text(2) + image(grids1[0]) + text(5)), pixels(grids1), np.array(grids1)),
        Prompt(np.array(text(7))),
    ]


def _hf_greedy(hf, config, prompts, stop_id, max_new_tokens):
    """transformers' greedy generate on the left-padded batch; rows cut after the first stop."""
    length = max(len(p.prompt_token_ids) for p in prompts)
    input_ids = np.zeros((len(prompts), length), np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt.prompt_token_ids) :] = prompt.prompt_token_ids
        attention_mask[row, length - len(prompt.prompt_token_ids) :] = 1
    with_images = [p for p in prompts if p.image_grid_thw is not None]
    with torch.no_grad():
        generated = hf.generate(
            input_ids=torch.tensor(input_ids),
            attention_mask=torch.tensor(attention_mask),
            mm_token_type_ids=torch.tensor((input_ids == config.image_token_id).astype(np.int64)),
            pixel_values=torch.tensor(np.concatenate([p.pixel_values for p in with_images])),
            image_grid_thw=torch.tensor(np.concatenate([p.image_grid_thw for p in with_images])),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=stop_id,
            pad_token_id=0,
        )[:, length:].tolist()
    rows = []
    for row in generated:
        rows.append(row[: row.index(stop_id) + 1] if stop_id in row else row)
    return rows


@pytest.fixture(scope="module")
def qwen25():
    """(hf, flax model, config, sampler) for the untied Qwen2.5-VL tiny model."""
    hf, model, config = hf_and_flax("qwen2_5_vl", False)
    return hf, model, config, JaxSampler(model, config, pad_id=0)


def _sampling(config, **kwargs) -> Sampling:
    defaults = dict(max_tokens=NEW_TOKENS, stop_token_ids=(config.text.vocab_size - 1,))
    return Sampling(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    "family, tied", [("qwen2_vl", True), ("qwen2_5_vl", False), ("qwen3_vl", True)]
)
def test_greedy_equals_transformers_generate(family, tied):
    hf, model, config = hf_and_flax(family, tied)
    prompts = _prompts(config)
    # Stop at the 6th token of row 0's unconstrained greedy output, so rows stop at different
    # steps (and some run to max_tokens).
    free = _hf_greedy(hf, config, prompts, config.text.vocab_size - 1, NEW_TOKENS)
    stop_id = free[0][5]
    expected = _hf_greedy(hf, config, prompts, stop_id, NEW_TOKENS)
    sampler = JaxSampler(model, config, pad_id=0)
    out = sampler.generate(
        prompts, _sampling(config, temperature=0.0, stop_token_ids=(stop_id,), seed=1)
    )
    assert [c[0].token_ids for c in out] == expected
    assert out[0][0].finish_reason == "stop" and len(out[0][0].token_ids) <= 6
    for completions, row in zip(out, expected):
        reason = "stop" if row[-1] == stop_id else "length"
        assert completions[0].finish_reason == reason
        assert len(completions[0].logprobs) == len(row)


@pytest.mark.parametrize(
    "temperature, top_p, top_k", [(1.0, 1.0, -1), (0.6, 0.9, 20)], ids=["t1", "t0.6-topp-topk"]
)
def test_sampled_logprobs_equal_teacher_forced(qwen25, temperature, top_p, top_k):
    _, model, config, sampler = qwen25
    prompts = _prompts(config)
    sampling = _sampling(config, n=2, temperature=temperature, top_p=top_p, top_k=top_k, seed=7)
    out = sampler.generate(prompts, sampling, step=3)
    rows = [(p, c) for p, completions in zip(prompts, out) for c in completions]
    batch = make_sequence_batch(
        [
            dict(
                input_ids=p.prompt_token_ids,
                pixel_values=p.pixel_values,
                image_grid_thw=p.image_grid_thw,
            )
            for p, _ in rows
        ],
        [c.token_ids for _, c in rows],
        config,
        pad_id=0,
    )
    reference = np.asarray(
        score_batch(
            model, batch.device_arrays(), prompt_len=batch.prompt_len, temperature=temperature
        )
    )
    lengths = [len(c.token_ids) for _, c in rows]
    assert min(lengths) >= 1 and sum(lengths) > 2 * len(rows)
    for row, (_, completion) in enumerate(rows):
        # 1e-4: the decode loop attends over its KV cache one token at a time, the teacher-forced
        # pass over the whole sequence at once: fp32 sums in another order (a wrong position,
        # mask or temperature moves a logprob by 1e-2 or more).
        np.testing.assert_allclose(
            completion.logprobs, reference[row, : len(completion.token_ids)], atol=1e-4, rtol=0
        )


def test_stop_token_ends_completion_and_nothing_follows(qwen25):
    _, model, config, _ = qwen25

    class Tokenizer:
        def decode(self, ids, skip_special_tokens):
            assert skip_special_tokens
            return " ".join(map(str, ids))

    sampler = JaxSampler(model, config, Tokenizer(), pad_id=0)
    prompts = _prompts(config)
    free = sampler.generate(prompts, _sampling(config, n=2, seed=11))
    assert all(
        c.finish_reason == "length" and len(c.token_ids) == NEW_TOKENS for cs in free for c in cs
    )
    stop_id = free[1][0].token_ids[4]
    stopped = sampler.generate(prompts, _sampling(config, n=2, seed=11, stop_token_ids=(stop_id,)))
    for old_completions, new_completions in zip(free, stopped):
        for old, new in zip(old_completions, new_completions):
            if stop_id in old.token_ids:
                end = old.token_ids.index(stop_id) + 1
                assert new.finish_reason == "stop" and new.token_ids[-1] == stop_id
            else:
                end = NEW_TOKENS
                assert new.finish_reason == "length"
            assert new.token_ids == old.token_ids[:end]
            np.testing.assert_allclose(new.logprobs, old.logprobs[:end], atol=1e-6)
            assert new.text == " ".join(map(str, new.token_ids))
    assert len(stopped[1][0].token_ids) <= 5


def test_samples_distinct_reproducible_and_independent_of_batching(qwen25):
    _, model, config, sampler = qwen25
    prompts = _prompts(config)
    sampling = _sampling(config, n=4, seed=5)
    out = sampler.generate(prompts, sampling, step=2)
    for completions in out:
        assert len({tuple(c.token_ids) for c in completions}) == 4
    assert sampler.generate(prompts, sampling, step=2) == out
    assert sampler.generate(prompts, sampling, step=3)[0] != out[0]
    # Prompt 0 alone (smaller batch), and one prompt per chunk (max_rows = n): same samples.
    alone = sampler.generate(prompts[:1], sampling, step=2)
    chunked = JaxSampler(model, config, pad_id=0, max_rows=4).generate(prompts, sampling, step=2)
    for other in (alone, chunked):
        for mine, theirs in zip(other, out):
            for a, b in zip(mine, theirs):
                assert a.token_ids == b.token_ids
                np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_near_greedy_and_top_k_1_sampling_equal_greedy(qwen25):
    _, _, config, sampler = qwen25
    prompts = _prompts(config)
    greedy = sampler.generate(prompts, _sampling(config, temperature=0.0))
    near = sampler.generate(prompts, _sampling(config, n=2, temperature=0.01, top_p=0.001))
    top_1 = sampler.generate(prompts, _sampling(config, n=2, temperature=1.0, top_k=1, seed=9))
    for g, near_completions, top_1_completions in zip(greedy, near, top_1):
        assert max(g[0].logprobs) < -1.0  # the tiny model is far from confident at T = 1
        for c in near_completions:
            assert c.token_ids == g[0].token_ids
            assert max(c.logprobs) <= 0 and min(c.logprobs) > -1.0  # log_softmax(logits / 0.01)
        for c in top_1_completions:  # same tokens, and the logprobs are the untruncated T=1 ones
            assert c.token_ids == g[0].token_ids
            np.testing.assert_allclose(c.logprobs, g[0].logprobs, atol=1e-5)


def test_one_compilation_per_bucket(qwen25):
    _, _, config, sampler = qwen25
    prompts = _prompts(config, seed=3)
    sampler.generate(prompts[:2], _sampling(config, temperature=0.0, max_tokens=5))
    before = dict(jax_sampler.TRACE_COUNTS)
    # Different prompts and max_tokens, same buckets: nothing new is traced.
    other = _prompts(config, seed=4)
    sampler.generate(other[:2], _sampling(config, temperature=0.0, max_tokens=9))
    assert dict(jax_sampler.TRACE_COUNTS) == before


def test_sync_weights_replaces_named_parameters(qwen25):
    hf, model, config, _ = qwen25
    sampler = JaxSampler(model, config, pad_id=0)
    prompts = _prompts(config)[2:]
    sampling = _sampling(config, temperature=0.0)
    before = sampler.generate(prompts, sampling)
    head = hf.lm_head.weight.detach().numpy()
    checksum = sampler.sync_weights({"lm_head.weight": -head}, version=1)
    assert len(checksum) == 8 and sampler.weights_version == 1
    assert sampler.generate(prompts, sampling) != before
    assert sampler.sync_weights({"lm_head.weight": head}, version=2) != checksum
    assert sampler.generate(prompts, sampling) == before
    with pytest.raises(KeyError, match="not.a.tensor"):
        sampler.sync_weights({"not.a.tensor": head}, version=3)


def test_load_policy_swaps_the_model_and_stamps_its_version(qwen25):
    """The in-process sync: the weights are swapped (no copy) and completions record the
    version (whether a version needs loading is the run's Rollouts', test_overlap.py)."""
    hf, model, config, _ = qwen25
    sampler = JaxSampler(model, config, pad_id=0)
    prompts, sampling = _prompts(config)[2:], _sampling(config, temperature=0.0)
    before = sampler.generate(prompts, sampling)
    negated = JaxSampler(model, config, pad_id=0)
    negated.sync_weights({"lm_head.weight": -hf.lm_head.weight.detach().numpy()}, version=1)
    other = nnx.merge(negated._graphdef, negated._state)
    sampler.load_policy(other, 7)
    swapped = sampler.generate(prompts, sampling)
    assert sampler.weights_version == 7 and swapped != before
    assert {c.weights_version for row in swapped for c in row} == {7}
    sampler.load_policy(model, 8)
    assert sampler.generate(prompts, sampling) == before


def test_truncation_keeps_top_k_then_nucleus():
    probs = jnp.array([[0.05, 0.5, 0.1, 0.2, 0.15]], jnp.float32)
    truncate = jax.jit(truncation_mask, static_argnames=("use_top_k", "use_top_p"))

    def kept(top_k, top_p, row=probs):
        mask = truncate(row, jnp.int32(top_k), jnp.float32(top_p), use_top_k=True, use_top_p=True)
        return np.flatnonzero(np.asarray(mask)[0]).tolist()

    assert kept(-1, 1.0) == [0, 1, 2, 3, 4]
    assert kept(-1, 0.7) == [1, 3]  # 0.5 + 0.2 reaches 0.7
    assert kept(-1, 0.71) == [1, 3, 4]
    assert kept(-1, 0.001) == [1]
    assert kept(3, 1.0) == [1, 3, 4]
    assert kept(2, 0.75) == [1, 3]  # after top-k: 0.714, 0.286 -> 0.714 < 0.75
    assert kept(2, 0.7) == [1]
    assert kept(2, 1.0, jnp.array([[0.3, 0.4, 0.3]])) == [0, 1, 2]  # ties at the k-th are kept
    # Draws stay inside the kept set and follow its renormalised probabilities; the logprob is
    # the pre-truncation one.
    keys = jax.random.split(jax.random.key(0), 4000)
    sample = jax.jit(functools.partial(sample_tokens, greedy=False, use_top_k=True))
    tokens, logprobs = sample(
        jnp.repeat(jnp.log(probs), 4000, axis=0),
        keys,
        jnp.float32(1.0),
        jnp.int32(3),
        jnp.float32(1.0),
    )
    tokens = np.asarray(tokens)
    frequencies = np.bincount(tokens, minlength=5) / len(tokens)
    # 0.03: 4000 draws give each frequency a standard deviation of at most 0.008 (binomial);
    # the dropped tokens' frequency is exactly 0.
    np.testing.assert_allclose(frequencies, [0, 0.5 / 0.85, 0, 0.2 / 0.85, 0.15 / 0.85], atol=0.03)
    np.testing.assert_allclose(
        np.asarray(logprobs), np.log(np.asarray(probs)[0, tokens]), atol=1e-6
    )


def test_inverse_cdf_draws_follow_the_weights_across_blocks():
    """Evenly spaced uniforms through the inverse CDF: each token's count is within one of its
    expected count, and zero-weight tokens (including a trailing partial block) never appear."""
    rng = np.random.default_rng(0)
    vocab, draws = 2100, 3000  # blocks of 1024: two full blocks and a partial one
    weights = np.zeros(vocab, np.float32)
    ids = np.concatenate([[1, 1023, 1024, 2099], rng.choice(vocab, 26, replace=False)])
    weights[ids] = rng.uniform(0.1, 1.0, size=len(ids))
    weights[0] = 0.0
    uniform = (np.arange(draws) + 0.5) / draws
    tokens = np.asarray(
        jax.jit(sample_from_weights)(
            jnp.broadcast_to(jnp.asarray(weights), (draws, vocab)),
            jnp.asarray(uniform, jnp.float32),
        )
    )
    counts = np.bincount(tokens, minlength=vocab)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(weights))
    # Evenly spaced uniforms through an exact inverse CDF: a count is off its expectation only by
    # where the grid falls inside the token's interval (less than one draw, 1.01 with rounding).
    np.testing.assert_allclose(counts, draws * weights / weights.sum(), atol=1.01)


@pytest.mark.parametrize("vocab", [151936, 1000, 997])  # 128 x 1187; 500 x 2; prime: fallback
def test_greedy_tokens_are_the_first_maximum_and_logprobs_the_log_softmax(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((6, vocab)).astype(np.float32)
    logits[1, [5, vocab - 3]] = 9.0  # ties in different blocks: the first wins
    logits[2, [vocab // 2, vocab // 2 + 1]] = 9.0  # ties inside one block
    logits[3, vocab - 1] = 9.0  # the last id
    logits[4] = 0.0  # all equal: id 0
    logits[5, 0] = -np.inf
    tokens, logprobs = jax.jit(lambda x: sample_tokens(x, None, 1.0, 0, 1.0, greedy=True))(
        jnp.asarray(logits)
    )
    expected = np.argmax(logits, axis=-1)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert list(expected[1:5]) == [5, vocab // 2, vocab - 1, 0]
    reference = jnp.take_along_axis(jnp.asarray(logits), jnp.asarray(expected)[:, None], axis=-1)[
        :, 0
    ] - jax.nn.logsumexp(jnp.asarray(logits), axis=-1)
    np.testing.assert_array_equal(np.asarray(logprobs), np.asarray(reference))
