"""Rollout throughput: the in-process JAX sampler vs vLLM (the CPU build in `.venv-vllm`, the
project's vLLM worker), same tiny model, same prompts, same sampling settings.

    python benchmarks/sampler_vs_vllm.py [--hidden_size=256 --num_layers=4 --new_tokens=128
        --shapes=8x8,64x1 --dtypes=float32,bfloat16 --repeats=3]

The model: a random Qwen2-VL (hidden 256, 4 decoder layers, the real 151,936-token vocabulary,
`initializer_range` 0.02, so sampling is near-uniform and rows rarely stop early), saved as an
HF directory that both engines load. Prompts: the MAYE chat prompt of a geometry question with
one 56x56 image each (~110 tokens). Each shape is prompts x samples per prompt (8x8: 8 prompts,
8 samples each, as the demo's GRPO step; 64x1: 64 prompts); temperature 1, no top-k/top-p,
`new_tokens` new tokens at most. Each engine is warmed up once (compiles, engine caches), then
run `repeats` times, alternating; the best time counts. Tokens are those returned. Also: the
JAX sampler's milliseconds per decode step in fp32, greedy (T=0) against sampling (T=1), 64
rows.

The ratio is for this tiny model, where the 152k-vocabulary head and the sampling over it are
most of a decode step; it does not carry over to 7B, where the decoder layers dominate and
vLLM's paged attention and kernels matter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from maye_jax.data.processor import load_processor  # noqa: E402
from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.qwen_ids import PAD_ID  # noqa: E402
from maye_jax.rollout.client import WorkerEngine, find_tcmalloc  # noqa: E402
from maye_jax.rollout.engine import Prompt, Sampling  # noqa: E402
from maye_jax.rollout.factory import vllm_python  # noqa: E402
from maye_jax.rollout.jax_sampler import JaxSampler  # noqa: E402
from maye_jax.storage.model_folders import load_model  # noqa: E402
from maye_jax.tiny import tiny_hf_model  # noqa: E402

QUESTION = (
    "<image>In the rectangle ABCD shown in the figure, AB = {a} and BC = {b}. Point E lies on "
    "side CD. Find the area of triangle ABE and the perimeter of the rectangle."
)


def make_model_dir(root: Path, hidden: int, layers: int) -> Path:
    model_dir = root / "model"
    hf = tiny_hf_model("qwen2_vl", seed=0, vocab_size=151936, hidden_size=hidden, num_layers=layers)
    hf.save_pretrained(str(model_dir))
    load_processor(family="qwen2_vl").save_pretrained(model_dir)
    return model_dir


def make_prompts(model_dir: Path, count: int) -> list[Prompt]:
    processor = load_processor(model_dir, family="qwen2_vl")
    rng = np.random.default_rng(0)
    prompts = []
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
        encoded = processor.encode(image, QUESTION.format(a=2 + index % 7, b=3 + index % 5))
        prompts.append(
            Prompt(encoded["input_ids"], encoded["pixel_values"], encoded["image_grid_thw"])
        )
    return prompts


def best_of(runs: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """{name: (best seconds, tokens)} of alternating runs after one warm-up each."""
    for run in runs.values():
        run()
    best = {name: (float("inf"), 0) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens = run()
            seconds = time.perf_counter() - started
            if seconds < best[name][0]:
                best[name] = (seconds, tokens)
    return best


def count(completions) -> int:
    return sum(len(c.token_ids) for row in completions for c in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--shapes", default="8x8,64x1", help="prompts x samples, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    python = vllm_python()
    root = Path(tempfile.mkdtemp(prefix="maye-bench-vllm-"))
    model_dir = make_model_dir(root, args.hidden_size, args.num_layers)
    prompts = make_prompts(model_dir, max(p for p, _ in shapes))
    lengths = [len(p.prompt_token_ids) for p in prompts]
    print(
        f"model: tiny qwen2_vl, hidden {args.hidden_size}, {args.num_layers} layers, vocab "
        f"151936; prompts of {min(lengths)}-{max(lengths)} tokens with one image; "
        f"{args.new_tokens} new tokens, T=1; {os.cpu_count()} CPU cores; vLLM tcmalloc "
        f"preload: {find_tcmalloc(python) or 'not installed'}"
    )
    model, hf_config = load_model(model_dir)
    config = ModelConfig.from_hf(hf_config)
    for dtype in args.dtypes.split(","):
        sampler = JaxSampler(
            load_model(model_dir, dtype=jnp.dtype(dtype))[0] if dtype != "float32" else model,
            config,
            pad_id=PAD_ID,
        )
        engine = WorkerEngine(
            "vllm",
            model_dir,
            python=python,
            env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"},
            dtype=dtype,
            engine_args=dict(enforce_eager=True, max_model_len=1024),
            timeout_s=1800,
        )
        try:
            for num_prompts, n in shapes:
                chosen = prompts[:num_prompts]
                sampling = Sampling(n=n, temperature=1.0, max_tokens=args.new_tokens, seed=1)
                best = best_of(
                    {
                        "jax": lambda s=sampler, c=chosen, k=sampling: count(s.generate(c, k)),
                        "vllm": lambda e=engine, c=chosen, k=sampling: count(e.generate(c, k)),
                    },
                    args.repeats,
                )
                (jax_s, jax_t), (vllm_s, vllm_t) = best["jax"], best["vllm"]
                cached = engine.last_generate.get("cached_prompt_tokens", 0)
                print(
                    f"{dtype:8s} {num_prompts}x{n}: JAX {jax_t} tokens in {jax_s:.2f} s = "
                    f"{jax_t / jax_s:7.1f} tok/s | vLLM {vllm_t} tokens in {vllm_s:.2f} s = "
                    f"{vllm_t / vllm_s:7.1f} tok/s (prompt tokens from its prefix cache: "
                    f"{cached}) | JAX / vLLM {jax_t / jax_s / (vllm_t / vllm_s):.2f}x"
                )
        finally:
            engine.close()
    # Greedy against sampling, per decode step (the greedy argmax used to cost more), fp32.
    sampler = JaxSampler(model, config, pad_id=PAD_ID)
    rows = prompts[:64]
    steps = {}
    for name, temperature in (("sampling T=1", 1.0), ("greedy T=0", 0.0)):
        sampling = Sampling(n=1, temperature=temperature, max_tokens=args.new_tokens, seed=1)
        seconds, tokens = best_of(
            {name: lambda s=sampling: count(sampler.generate(rows, s))}, args.repeats
        )[name]
        steps[name] = seconds / args.new_tokens * 1000
        print(f"JAX fp32 {name}: {seconds:.2f} s, {tokens} tokens: {steps[name]:.1f} ms/step")
    print(f"greedy / sampling time per step: {steps['greedy T=0'] / steps['sampling T=1']:.2f}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()
