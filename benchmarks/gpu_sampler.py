"""The in-process JAX sampler at Qwen2.5-VL-3B size: tokens/s against a roofline (issue 7).

    python benchmarks/gpu_sampler.py [--size=3b] [--cases=64x1,16x8] [--max_new=2048]
        [--prompt=1024] [--image_tokens=400] [--repeats=1] [--out=FILE.json]

Each case `PxN` is one `JaxSampler.generate` call (maye_jax/rollout/jax_sampler.py) of P prompts
x N samples at temperature 1 (the paper's rollouts), max `max_new` new tokens, stop tokens as in
the RL loop; every prompt has `prompt` tokens with one image of `image_tokens` tokens. The model
is the policy as the RL loop hands it over (fp32 master weights + bf16 frozen tower; the sampler
casts to bf16 once per call), random weights at the published shapes, made on the device.

Timing: a warm-up call with max_tokens=1 compiles exactly the programs of the timed calls (the
sampler's length bucket is set to the response length, so the cache shape is the same; the
trace counter proves no recompilation), then `repeats` timed calls (median). A call includes
the vision tower, the prefill and the decode loop, which runs until every row has stopped.
Tokens = generated tokens returned (stop token included).

Baseline, measured in the same run: device memory bandwidth (y = 2x on 1 GiB) and the bf16
matmul rate. The roofline of a decode step reads the bf16 LLM weights once and the KV cache
entries in use (prompt + half the decoded tokens on average) at that bandwidth, or does its
FLOPs (2 x LLM params + attention per row) at the matmul rate, whichever is slower; roofline
tokens/s = rows / that time. The sampler attends over the whole allocated cache at every step
(masked), so the full-cache roofline is printed too. Prefill and the tower are not in the roofline.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (sets the GPU allocator's memory fraction before JAX)
import numpy as np  # noqa: E402

from maye_jax.rollout import jax_sampler  # noqa: E402
from maye_jax.rollout.engine import DEFAULT_STOP_TOKEN_IDS, Prompt, Sampling  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_size_flags(parser)
    parser.add_argument("--cases", default="", help="PROMPTSxSAMPLES,... (default 64x1,16x8)")
    parser.add_argument("--max_new", type=int, default=0, help="max new tokens (0: 2048, tiny 16)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per case (median)")
    parser.add_argument("--matmul_size", type=int, default=0, help="0: 8192 on GPU, 256 on CPU")
    return parser.parse_args(argv)


def roofline(config, num_params, rows, prompt_len, cache_len, steps, bandwidth, matmul) -> dict:
    """Tokens/s bound of the decode loop (see the module docstring)."""
    text = config.text
    kv_bytes_per_slot = text.num_layers * text.num_kv_heads * text.head_dim * 2 * 2  # k+v, bf16
    weight_bytes = num_params * 2
    mean_context = prompt_len + steps / 2
    flops = rows * (2 * num_params + 4 * text.num_layers * text.hidden_size * mean_context)
    compute_seconds = flops / (matmul["tflops"] * 1e12)
    out = {}
    for name, slots in (("used_cache", mean_context), ("full_cache", cache_len)):
        step_bytes = weight_bytes + rows * slots * kv_bytes_per_slot
        step_seconds = max(step_bytes / (bandwidth["gbs"] * common.GB), compute_seconds)
        out[name] = dict(
            step_bytes=step_bytes, step_seconds=step_seconds, tokens_per_second=rows / step_seconds
        )
    return out


def benchmark(args, report) -> list[tuple[str, str]]:
    config = common.model_config(args.size)
    tiny = args.size == "tiny"
    lengths = common.lengths_for(args.size, args.prompt, 1, args.image_tokens)
    max_new = args.max_new or (16 if tiny else 2048)
    cases = [
        tuple(int(x) for x in case.split("x"))
        for case in (args.cases or ("4x1,2x2" if tiny else "64x1,16x8")).split(",")
    ]
    stop_ids = (config.text.vocab_size - 1,) if tiny else DEFAULT_STOP_TOKEN_IDS

    bandwidth = common.memory_bandwidth_baseline()
    matmul = common.matmul_baseline(args.matmul_size)
    report.set("baseline_bandwidth", bandwidth)
    report.set("baseline_matmul", matmul)
    common.log(
        f"baselines: memory {bandwidth['gbs']:.4g} GB/s, bf16 matmul {matmul['tflops']:.4g} TFLOP/s"
    )

    started = time.perf_counter()
    model_def, params, frozen = common.random_params(config, seed=args.seed)
    num_params = sum(math.prod(v.shape) for v in params.values())
    length_bucket = -(-max_new // 128) * 128
    sampler = jax_sampler.JaxSampler(
        model_def.merge(params, frozen),
        config,
        pad_id=common.pad_id_of(config),
        length_bucket=length_bucket,  # = the response length for max_new, so a 1-token warm-up
    )  # compiles the same programs
    report.set(
        "model",
        dict(size=args.size, llm_params=num_params, init_seconds=time.perf_counter() - started),
    )
    rng = np.random.default_rng(args.seed)

    def measure_case(num_prompts: int, samples: int) -> dict:
        prompts = []
        for _ in range(num_prompts):
            prompt = common.random_prompt(config, lengths, rng)
            prompts.append(
                Prompt(
                    prompt["input_ids"], prompt.get("pixel_values"), prompt.get("image_grid_thw")
                )
            )
        sampling = Sampling(n=samples, temperature=1.0, max_tokens=max_new, stop_token_ids=stop_ids)
        started = time.perf_counter()
        sampler.generate(prompts, dataclasses.replace(sampling, max_tokens=1))
        warmup_seconds = time.perf_counter() - started
        traces = dict(jax_sampler.TRACE_COUNTS)
        outputs, times = [], []
        for repeat in range(max(1, args.repeats)):
            started = time.perf_counter()
            out = sampler.generate(prompts, sampling, step=repeat)
            times.append(time.perf_counter() - started)
            outputs.append(out)
        seconds = float(np.median(times))
        lengths_out = [len(c.token_ids) for row in outputs[-1] for c in row]
        tokens = sum(lengths_out)
        rows = num_prompts * samples
        steps = max(lengths_out)
        bound = roofline(
            config,
            num_params,
            rows,
            lengths.prompt,
            lengths.prompt + length_bucket,
            steps,
            bandwidth,
            matmul,
        )
        rate = tokens / seconds
        result = dict(
            case=f"{num_prompts}x{samples}",
            prompts=num_prompts,
            samples=samples,
            rows=rows,
            max_new=max_new,
            tokens=tokens,
            decode_steps=steps,
            finished_by_stop=sum(n < max_new for n in lengths_out),
            seconds=seconds,
            seconds_all=times,
            tokens_per_second=rate,
            warmup_seconds=warmup_seconds,
            recompiled=dict(jax_sampler.TRACE_COUNTS) != traces,
            roofline=bound,
            fraction_of_roofline=rate / bound["used_cache"]["tokens_per_second"],
            fraction_of_full_cache_roofline=rate / bound["full_cache"]["tokens_per_second"],
            peak_bytes_so_far=common.peak_bytes(),
        )
        return result

    results = []
    for num_prompts, samples in cases:
        try:
            result = measure_case(num_prompts, samples)
        except Exception as error:
            if not common.is_out_of_memory(error):
                raise
            result = dict(case=f"{num_prompts}x{samples}", error=common.error_record(error))
            results.append(result)
            report.set("cases", results)
            common.log(f"{result['case']}: out of memory")
            continue
        results.append(result)
        report.set("cases", results)
        common.log(
            f"{result['case']}: {result['tokens']} tokens in {result['seconds']:.2f} s = "
            f"{result['tokens_per_second']:,.0f} tok/s ({result['fraction_of_roofline']:.1%} of "
            f"the roofline; warm-up {result['warmup_seconds']:.1f} s)"
        )

    table = [
        ("device", report.data["environment"]["device_kind"]),
        ("memory bandwidth baseline", f"{bandwidth['gbs']:.4g} GB/s"),
        ("bf16 matmul baseline", f"{matmul['tflops']:.4g} TFLOP/s"),
        ("prompt", f"{lengths.prompt} tokens ({lengths.image_tokens} image), max_new {max_new}"),
    ]
    for r in results:
        if "error" in r:
            table.append((r["case"], f"out of memory: {r['error']['message'][:200]}"))
            continue
        table.append(
            (
                f"{r['case']} ({r['rows']} rows)",
                f"{r['tokens_per_second']:,.0f} tok/s, {r['seconds']:.2f} s, "
                f"{r['fraction_of_roofline']:.1%} of roofline "
                f"({r['fraction_of_full_cache_roofline']:.1%} full-cache), "
                f"recompiled {r['recompiled']}, peak {common.gib(r['peak_bytes_so_far'])}",
            )
        )
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    report = common.Report(args.out, "gpu_sampler", args)
    with common.failure_recorded(report):
        table = benchmark(args, report)
    report.finish()
    common.print_table(f"JAX sampler, {args.size}", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
