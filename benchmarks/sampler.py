"""Rollout throughput: the in-process JAX sampler vs transformers' `generate`, same tiny model.

    python benchmarks/sampler.py [--num_prompts=8 --new_tokens=64 --vocab_size=151936 ...]

Both engines get the same weights (fp32), the same prompts (left-padded, one image each) and the
same sampling distribution (temperature 1, no top-k / top-p, no repetition penalty). Each is run
once to warm up (JAX compiles), then `--repeats` times; the best time counts. Tokens are the
generated tokens actually returned (up to and including a stop token).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.models.hf_mapping import load_hf_tensors  # noqa: E402
from maye_jax.models.qwen_vl import build_model  # noqa: E402
from maye_jax.rollout.engine import Prompt, Sampling  # noqa: E402
from maye_jax.rollout.jax_sampler import JaxSampler  # noqa: E402
from maye_jax.tiny import tiny_hf_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("family", "qwen2_5_vl", ["qwen2_vl", "qwen2_5_vl"], "Model family.")
flags.DEFINE_integer("num_prompts", 8, "Prompts per generate call (n = 1 each).")
flags.DEFINE_integer("new_tokens", 64, "max_tokens of every request.")
flags.DEFINE_integer("vocab_size", 151936, "Vocabulary of the tiny model (151936 = Qwen's).")
flags.DEFINE_integer("hidden_size", 64, "Hidden size of the tiny model.")
flags.DEFINE_integer("num_layers", 2, "Decoder layers of the tiny model.")
flags.DEFINE_integer("repeats", 3, "Timed runs per engine (the best counts).")
flags.DEFINE_integer("seed", 0, "Seed of the model and the prompts.")


def make_prompts(config: ModelConfig, num_prompts: int, seed: int) -> list[Prompt]:
    """Text of different lengths around one image (grid 1x8x8 = 16 image tokens)."""
    rng = np.random.default_rng(seed)
    grid = (1, 8, 8)
    image = (
        [config.vision_start_token_id]
        + [config.image_token_id] * (grid[1] * grid[2] // config.vision.spatial_merge_size**2)
        + [config.vision_end_token_id]
    )
    text_ids = min(1000, config.vision_start_token_id)  # ordinary text ids, below the specials
    prompts = []
    for index in range(num_prompts):
        before = rng.integers(0, text_ids, size=3 + index)
        after = rng.integers(0, text_ids, size=10)
        ids = np.concatenate([before, image, after]).astype(np.int32)
        pixels = rng.standard_normal((int(np.prod(grid)), config.vision.patch_dim))
        prompts.append(Prompt(ids, pixels.astype(np.float32), np.array([grid])))
    return prompts


def hf_generate(hf, config: ModelConfig, prompts: list[Prompt], sampling: Sampling) -> int:
    """One transformers generate call on the left-padded batch; returns the tokens generated."""
    length = max(len(p.prompt_token_ids) for p in prompts)
    input_ids = np.zeros((len(prompts), length), np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt.prompt_token_ids) :] = prompt.prompt_token_ids
        attention_mask[row, length - len(prompt.prompt_token_ids) :] = 1
    stop_ids = list(sampling.stop_token_ids)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(input_ids),
            attention_mask=torch.tensor(attention_mask),
            mm_token_type_ids=torch.tensor((input_ids == config.image_token_id).astype(np.int64)),
            pixel_values=torch.tensor(np.concatenate([p.pixel_values for p in prompts])),
            image_grid_thw=torch.tensor(np.concatenate([p.image_grid_thw for p in prompts])),
            max_new_tokens=sampling.max_tokens,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            repetition_penalty=1.0,
            eos_token_id=stop_ids,
            pad_token_id=0,
        )[:, length:].tolist()
    return sum(next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row)) for row in out)


def best_time(run, repeats: int) -> tuple[float, int]:
    run()  # warm-up (compilation for JAX)
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        best = min(best, time.perf_counter() - start)
    return best, tokens


def main(argv):
    del argv
    hf = tiny_hf_model(
        FLAGS.family,
        seed=FLAGS.seed,
        vocab_size=FLAGS.vocab_size,
        hidden_size=FLAGS.hidden_size,
        num_layers=FLAGS.num_layers,
    )
    config = ModelConfig.from_hf(hf.config)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    model = load_hf_tensors(build_model(config, abstract=True), state.items())
    prompts = make_prompts(config, FLAGS.num_prompts, FLAGS.seed)
    sampling = Sampling(
        n=1,
        temperature=1.0,
        top_p=1.0,
        max_tokens=FLAGS.new_tokens,
        seed=FLAGS.seed,
        stop_token_ids=(config.text.vocab_size - 1,),
    )
    sampler = JaxSampler(model, config, pad_id=0)

    def jax_run() -> int:
        out = sampler.generate(prompts, sampling)
        return sum(len(c.token_ids) for completions in out for c in completions)

    jax_seconds, jax_tokens = best_time(jax_run, FLAGS.repeats)
    hf_seconds, hf_tokens = best_time(
        lambda: hf_generate(hf, config, prompts, sampling), FLAGS.repeats
    )
    jax_rate, hf_rate = jax_tokens / jax_seconds, hf_tokens / hf_seconds
    print(
        f"model: tiny {FLAGS.family}, hidden {FLAGS.hidden_size}, {FLAGS.num_layers} layers, "
        f"vocab {FLAGS.vocab_size}; {FLAGS.num_prompts} prompts x {FLAGS.new_tokens} new tokens, "
        f"one image each; jax on {jax.devices()[0].platform}, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"jax sampler:     {jax_tokens:5d} tokens in {jax_seconds:.3f} s = {jax_rate:9.1f} tok/s")
    print(f"hf generate:     {hf_tokens:5d} tokens in {hf_seconds:.3f} s = {hf_rate:9.1f} tok/s")
    print(f"ratio (jax / hf): {jax_rate / hf_rate:.2f}x")


if __name__ == "__main__":
    app.run(main)
