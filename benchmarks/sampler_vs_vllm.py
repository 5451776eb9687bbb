"""Rollout throughput: the in-process JAX sampler vs vLLM (the CPU build in `.venv-vllm`, the
project's vLLM worker), same model, same prompts, same sampling settings, each run split into
image encoding, prefill and decode.

    python benchmarks/sampler_vs_vllm.py [--preset=tiny|qwen2_vl_2b] [--num_layers=N]
        [--vision_depth=N] [--new_tokens=128] [--shapes=8x8,64x1] [--dtypes=float32,bfloat16]
        [--repeats=3] [--model_dir=DIR] [--trace_dir=DIR] [--vllm_compiled]

Models (random weights, `initializer_range` 0.02, so sampling is near-uniform over the real
151,936-token vocabulary and rows rarely stop early), saved as an HF directory both engines load:
- `tiny` (default): Qwen2-VL, hidden `--hidden_size` (256), `--num_layers` (4) decoder layers,
  a 2-block vision tower of width 32;
- `qwen2_vl_2b`: the published Qwen2-VL-2B widths (text hidden 1536, 12 heads, 2 KV heads,
  MLP 8960, tied embeddings; vision 1280 wide, 16 heads, MLP 5120), `--num_layers` (8) of its
  28 decoder layers and `--vision_depth` (16) of its 32 vision blocks: in fp32 the vLLM worker
  holds about twice its weights (oneDNN's packed copies; 9.9 GB at 8 layers and 32 blocks) and
  the two engines beside other jobs overflowed this 24 GiB machine with all 32 blocks.
  `--model_dir` keeps the saved model for later runs (it is built there once); without it a
  temporary one is removed.
Prompts: the MAYE chat prompt of a geometry question with one 56x56 image each (110 tokens, 4
of them image tokens; 16 patches). Each shape is prompts x samples per prompt (8x8: the demo's
GRPO step; 64x1: 64 distinct prompts); temperature 1, no top-k/top-p, `new_tokens` new tokens.
The vLLM worker runs eagerly (`enforce_eager`; `--vllm_compiled` uses vLLM's default CPU
compilation, as `rollout/factory.py` builds it for the trainer: its start compiled for over 15
minutes on 2 shared cores at the 2B widths). Each engine is warmed up once, then run `repeats`
times, alternating; the best time counts. Tokens are those returned.

The split of each best run (seconds):
- JAX: the sampler's own `last_timings` (each phase waits for its device work): image encoding
  (vision tower + token embeddings), prefill (prompts into the KV cache, rows, token 0), decode;
- vLLM: prefill and decode from its request metrics (scheduled -> last first token -> last
  token). Its vision encoder runs inside that prefill step, so the prompts are also run alone
  (`max_tokens=1`, best of `repeats`, alternating), with their images and without (the image
  tokens replaced by a text token): the difference is its image encoding, the text-only
  prefill its prefill. The JAX sampler's own prefill-alone runs are printed beside as a check.

With `--trace_dir`, one more JAX run per row is traced (`jax.profiler`) and the XLA ops' self
time printed by category and op (benchmarks/_trace.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _trace import print_trace_summary, summarize_trace  # noqa: E402
from PIL import Image  # noqa: E402

from maye_jax.data.processor import load_processor  # noqa: E402
from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.qwen_ids import PAD_ID  # noqa: E402
from maye_jax.rollout.client import WorkerEngine, find_tcmalloc  # noqa: E402
from maye_jax.rollout.engine import Prompt, Sampling  # noqa: E402
from maye_jax.rollout.factory import vllm_python  # noqa: E402
from maye_jax.rollout.jax_sampler import JaxSampler  # noqa: E402
from maye_jax.storage.model_folders import load_model  # noqa: E402
from maye_jax.tiny import preset_hf_config, tiny_hf_model  # noqa: E402

QUESTION = (
    "<image>In the rectangle ABCD shown in the figure, AB = {a} and BC = {b}. Point E lies on "
    "side CD. Find the area of triangle ABE and the perimeter of the rectangle."
)
TEXT_TOKEN_ID = 1040  # replaces the image tokens of the text-only prompts (an ordinary token)
PRESETS = ("tiny", "qwen2_vl_2b")


def build_hf_model(preset: str, hidden_size: int, num_layers: int, vision_depth: int):
    """The preset's random transformers model (fp32)."""
    if preset == "tiny":
        return tiny_hf_model(
            "qwen2_vl",
            seed=0,
            vocab_size=151936,
            hidden_size=hidden_size,
            num_layers=num_layers,
            vision_depth=vision_depth,
        )
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    config = preset_hf_config(preset, num_layers=num_layers, vision_depth=vision_depth)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def make_model_dir(model_dir: Path, args) -> Path:
    """Saves the model (and the processor) in `model_dir`, unless it holds it already."""
    if (model_dir / "config.json").is_file():
        return model_dir
    hf = build_hf_model(args.preset, args.hidden_size, args.num_layers, args.vision_depth)
    hf.save_pretrained(str(model_dir))
    del hf
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


def text_only(prompts: list[Prompt], image_token_id: int) -> list[Prompt]:
    """The same prompts without their images: image tokens become an ordinary text token."""
    return [
        Prompt(np.where(p.prompt_token_ids == image_token_id, TEXT_TOKEN_ID, p.prompt_token_ids))
        for p in prompts
    ]


def best_of(runs: dict, repeats: int) -> dict[str, tuple[float, int, dict]]:
    """{name: (best seconds, tokens, split)} of alternating runs after one warm-up each; each
    run returns (tokens, {phase: seconds}) and the split of its best run is kept."""
    for run in runs.values():
        run()
    best = {name: (float("inf"), 0, {}) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens, split = run()
            seconds = time.perf_counter() - started
            if seconds < best[name][0]:
                best[name] = (seconds, tokens, split)
    return best


def count(completions) -> int:
    return sum(len(c.token_ids) for row in completions for c in row)


def jax_run(sampler: JaxSampler, prompts, sampling):
    def run():
        tokens = count(sampler.generate(prompts, sampling))
        timings = sampler.last_timings
        return tokens, dict(
            encode=timings["encode_seconds"],
            prefill=timings["prefill_seconds"],
            decode=timings["decode_seconds"],
            host=timings["host_seconds"],
        )

    return run


def vllm_run(engine: WorkerEngine, prompts, sampling):
    def run():
        tokens = count(engine.generate(prompts, sampling))
        stats = engine.last_generate
        return tokens, dict(
            prefill=float(stats.get("prefill_seconds", float("nan"))),
            decode=float(stats.get("decode_seconds", float("nan"))),
            cached=int(stats.get("cached_prompt_tokens", 0)),
        )

    return run


def useful_gflop(config: ModelConfig, prompts: list[Prompt], n: int, new_tokens: int) -> dict:
    """Matmul GFLOP of each phase that any engine must do (2 x weights x rows; attention scores,
    a few % at these lengths, left out): each distinct image encoded once, each distinct
    prompt's tokens through every layer, the logits of the first token of every sample, then
    `new_tokens` - 1 decode steps of every sample. An engine's padding or recomputation is
    not counted, so GFLOP/s per phase compares the engines' efficiency."""
    text, vision = config.text, config.vision
    q, kv = text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim
    layer = 2 * (
        text.hidden_size * (2 * q + 2 * kv) + 3 * text.hidden_size * text.intermediate_size
    )
    head = 2 * text.hidden_size * text.vocab_size
    e, merged = vision.embed_dim, vision.embed_dim * vision.spatial_merge_size**2
    block = 2 * (4 * e * e + 2 * e * vision.mlp_hidden_dim)
    merger = 2 * merged * (merged + vision.out_dim)
    patches = sum(int(np.prod(p.image_grid_thw, axis=1).sum()) for p in prompts)
    tokens = sum(len(p.prompt_token_ids) for p in prompts)
    rows = len(prompts) * n
    encode = patches * (2 * vision.patch_dim * e + vision.depth * block)
    encode += patches // vision.spatial_merge_size**2 * merger
    return dict(
        encode=encode / 1e9,
        prefill=(tokens * text.num_layers * layer + rows * head) / 1e9,
        decode=(new_tokens - 1) * rows * (text.num_layers * layer + head) / 1e9,
    )


def trace_jax(sampler, prompts, sampling, directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    with jax.profiler.trace(str(directory)):
        sampler.generate(prompts, sampling)
    print_trace_summary(summarize_trace(str(directory), top=12))


def compare(sampler, engine, prompts, text_prompts, dtype, num_prompts, n, args) -> None:
    chosen, text_chosen = prompts[:num_prompts], text_prompts[:num_prompts]
    sampling = Sampling(n=n, temperature=1.0, max_tokens=args.new_tokens, seed=1)
    best = best_of(
        {
            "jax": jax_run(sampler, chosen, sampling),
            "vllm": vllm_run(engine, chosen, sampling),
        },
        args.repeats,
    )
    # Prefill alone (max_tokens=1), with and without the images: the difference is the image
    # encoding (vLLM's metrics do not separate it).
    prefill_only = Sampling(n=n, temperature=1.0, max_tokens=1, seed=1)
    alone = best_of(
        {
            "jax": jax_run(sampler, chosen, prefill_only),
            "vllm": vllm_run(engine, chosen, prefill_only),
            "jax text": jax_run(sampler, text_chosen, prefill_only),
            "vllm text": vllm_run(engine, text_chosen, prefill_only),
        },
        args.repeats,
    )
    (jax_s, jax_t, jax_split), (vllm_s, vllm_t, vllm_split) = best["jax"], best["vllm"]
    vllm_encode = alone["vllm"][2]["prefill"] - alone["vllm text"][2]["prefill"]
    vllm_split = dict(
        vllm_split,
        encode=vllm_encode,
        prefill=alone["vllm text"][2]["prefill"],
        with_encoder=alone["vllm"][2]["prefill"],
    )
    work = useful_gflop(sampler.config, chosen, n, args.new_tokens)
    rates = {
        name: "  ".join(f"{phase} {work[phase] / split[phase]:.0f}" for phase in work)
        for name, split in (("JAX", jax_split), ("vLLM", vllm_split))
    }
    print(
        f"{dtype:8s} {num_prompts}x{n}: JAX {jax_t} tokens in {jax_s:.2f} s = "
        f"{jax_t / jax_s:7.1f} tok/s | vLLM {vllm_t} tokens in {vllm_s:.2f} s = "
        f"{vllm_t / vllm_s:7.1f} tok/s | JAX / vLLM {jax_t / jax_s / (vllm_t / vllm_s):.2f}x\n"
        f"    JAX  s: encode {jax_split['encode']:.2f}  prefill {jax_split['prefill']:.2f}  "
        f"decode {jax_split['decode']:.2f}  host {jax_split['host']:.2f}  (prefill alone: "
        f"encode {alone['jax'][2]['encode']:.2f} prefill {alone['jax'][2]['prefill']:.2f}; "
        f"text-only prefill {alone['jax text'][2]['prefill']:.2f})\n"
        f"    vLLM s: encode {vllm_encode:.2f}  prefill {vllm_split['prefill']:.2f}  decode "
        f"{vllm_split['decode']:.2f}  (prefill alone: {vllm_split['with_encoder']:.2f} with the "
        f"encoder, {vllm_split['prefill']:.2f} text-only; prompt tokens from its prefix cache: "
        f"{vllm_split['cached']})\n"
        f"    useful GFLOP ({'  '.join(f'{k} {v:.0f}' for k, v in work.items())}) per second: "
        f"JAX {rates['JAX']} | vLLM {rates['vLLM']}",
        flush=True,
    )
    if args.trace_dir:
        trace_jax(sampler, chosen, sampling, Path(args.trace_dir) / f"{dtype}_{num_prompts}x{n}")


def greedy_vs_sampling(sampler, prompts, args) -> None:
    """Greedy against sampling, per decode step (the greedy argmax used to cost more), fp32."""
    rows = prompts[:64]
    steps = {}
    for name, temperature in (("sampling T=1", 1.0), ("greedy T=0", 0.0)):
        sampling = Sampling(n=1, temperature=temperature, max_tokens=args.new_tokens, seed=1)
        seconds, tokens, split = best_of({name: jax_run(sampler, rows, sampling)}, args.repeats)[
            name
        ]
        steps[name] = split["decode"] / args.new_tokens * 1000
        print(f"JAX fp32 {name}: {seconds:.2f} s, {tokens} tokens: {steps[name]:.1f} ms/step")
    print(f"greedy / sampling time per step: {steps['greedy T=0'] / steps['sampling T=1']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--hidden_size", type=int, default=256, help="tiny only")
    parser.add_argument("--num_layers", type=int, default=None, help="tiny 4, qwen2_vl_2b 8")
    parser.add_argument("--vision_depth", type=int, default=None, help="tiny 2, qwen2_vl_2b 16")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--shapes", default="8x8,64x1", help="prompts x samples, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model_dir", default=None, help="keep the saved model here")
    parser.add_argument("--vllm_compiled", action="store_true", help="vLLM's CPU compilation")
    parser.add_argument("--trace_dir", default=None, help="trace one JAX run per row here")
    args = parser.parse_args()
    tiny = args.preset == "tiny"
    args.num_layers = args.num_layers or (4 if tiny else 8)
    args.vision_depth = args.vision_depth or (2 if tiny else 16)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    python = vllm_python()
    temporary = None if args.model_dir else Path(tempfile.mkdtemp(prefix="maye-bench-vllm-"))
    model_dir = make_model_dir(Path(args.model_dir or temporary / "model"), args)
    try:
        run_all(args, shapes, python, model_dir)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def run_all(args, shapes, python, model_dir: Path) -> None:
    prompts = make_prompts(model_dir, max(p for p, _ in shapes))
    lengths = [len(p.prompt_token_ids) for p in prompts]
    model, hf_config = load_model(model_dir)
    config = ModelConfig.from_hf(hf_config)
    text_prompts = text_only(prompts, config.image_token_id)
    width = (
        f"hidden {config.text.hidden_size}, {config.text.num_layers} layers, vision "
        f"{config.vision.depth} blocks of {config.vision.embed_dim}"
    )
    print(
        f"model: {args.preset} qwen2_vl, {width}, vocab {config.text.vocab_size}; prompts of "
        f"{min(lengths)}-{max(lengths)} tokens with one image; {args.new_tokens} new tokens, "
        f"T=1; {os.cpu_count()} CPU cores; vLLM {'compiled' if args.vllm_compiled else 'eager'}, "
        f"tcmalloc preload: {find_tcmalloc(python) or 'not installed'}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    for dtype in args.dtypes.split(","):
        if dtype != "float32":
            model = load_model(model_dir, dtype=jnp.dtype(dtype))[0]
        sampler = JaxSampler(model, config, pad_id=PAD_ID)
        engine_args = dict(max_model_len=1024, disable_log_stats=False)
        if not args.vllm_compiled:
            engine_args["enforce_eager"] = True
        engine = WorkerEngine(
            "vllm",
            model_dir,
            python=python,
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
            dtype=dtype,
            engine_args=engine_args,
            timeout_s=3600,
            start_timeout_s=3600,
        )
        try:
            for num_prompts, n in shapes:
                compare(sampler, engine, prompts, text_prompts, dtype, num_prompts, n, args)
        finally:
            engine.close()
        del sampler
    if args.preset == "tiny":
        model = load_model(model_dir)[0]
        greedy_vs_sampling(JaxSampler(model, config, pad_id=PAD_ID), prompts, args)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; load average after: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
