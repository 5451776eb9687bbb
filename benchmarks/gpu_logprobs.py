"""The chunked logprob pass (policy + reference) at Qwen2.5-VL-3B size: tokens/s and peak
memory against the logits chunk size (issue 7).

    python benchmarks/gpu_logprobs.py [--size=3b] [--rows=16] [--chunks=256,512,1024]
        [--prompt=1024] [--response=2048] [--image_tokens=400] [--repeats=3] [--out=FILE.json]

What runs is what `maye_jax.rl.trajectory` runs to build a trajectory: for one forward batch of
`rows` full-length rows (the paper's forward_batch_size 112 over 7 GPUs is 16 rows per GPU),
`sequences.response_logprobs` (the decoder over prompt + response, then `models.logprobs`'s
chunked log-softmax over the response positions, so [rows, chunk, vocab] logits exist one chunk
at a time) under the policy (fp32 master weights, cast to bf16 where used) and then under the
reference model (its bf16 copy), sharing the frozen tower's image features, computed once.
Weights are random at the published shapes, made on the device.

Per chunk size: seconds of the pass (policy + reference, median of `repeats` after a warm-up),
tokens/s (rows x (prompt + response) / seconds), the forward's model FLOP rate against the bf16
matmul rate measured in the same run (forward FLOPs per token and model: 2 x LLM parameters +
2 x layers x hidden x sequence, the causal attention), XLA's memory estimate of each compiled
pass (temporaries are where the chunk shows) and the allocator's peak (GPU only; chunk sizes run
in increasing order, and the peak only grows, so it is the peak up to that chunk size).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (sets the GPU allocator's memory fraction before JAX)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from maye_jax.data.sequences import image_features, response_logprobs  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_size_flags(parser)
    parser.add_argument("--rows", type=int, default=0, help="rows per forward (0: 16, tiny 4)")
    parser.add_argument(
        "--chunks", default="", help="chunk sizes (default 256,512,1024; tiny 16,64)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul_size", type=int, default=0, help="0: 8192 on GPU, 256 on CPU")
    parser.add_argument(
        "--attention", choices=("xla", "cudnn"), default="xla", help="models/layers.py"
    )
    return parser.parse_args(argv)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "chunk_size"))
def logprob_pass(graphdef, state, arrays, features, *, prompt_len: int, chunk_size: int):
    """trajectory._logprobs with the model split: the response logprobs [rows, R]."""
    model = nnx.merge(graphdef, state)
    return response_logprobs(model, arrays, features, prompt_len=prompt_len, chunk_size=chunk_size)


def benchmark(args, report) -> list[tuple[str, str]]:
    config = common.model_config(args.size)
    lengths = common.lengths_for(args.size, args.prompt, args.response, args.image_tokens)
    tiny = args.size == "tiny"
    rows = args.rows or (4 if tiny else 16)
    chunks = [int(c) for c in (args.chunks or ("16,64" if tiny else "256,512,1024")).split(",")]

    matmul = common.matmul_baseline(args.matmul_size)
    report.set("baseline_matmul", matmul)
    common.log(f"baseline: bf16 matmul {matmul['size']}^3 at {matmul['tflops']:.4g} TFLOP/s")

    started = time.perf_counter()
    model_def, params, frozen = common.random_params(
        config, seed=args.seed, attention=args.attention
    )
    reference = jax.jit(lambda p: {n: v.astype(jnp.bfloat16) for n, v in p.items()})(params)
    policy_model = model_def.merge(params, frozen)
    graphdef, policy_state = nnx.split(policy_model)
    _, reference_state = nnx.split(model_def.merge(reference, frozen))
    jax.block_until_ready((policy_state, reference_state))
    num_params = sum(math.prod(v.shape) for v in params.values())
    report.set(
        "model",
        dict(
            size=args.size,
            llm_params=num_params,
            attention=args.attention,
            init_seconds=time.perf_counter() - started,
        ),
    )
    common.log(f"model {args.size}: {common.count(num_params)} LLM params (policy fp32, ref bf16)")

    batch = common.random_sequences(config, lengths, rows, args.seed)
    arrays = batch.device_arrays()
    vision = arrays.pop("vision", None)
    features = None
    if vision is not None:
        features = nnx.jit(image_features)(policy_model, vision)  # as trajectory._features
    tokens = rows * lengths.total
    forward_flops = tokens * (
        2 * num_params + 2 * config.text.num_layers * config.text.hidden_size * lengths.total
    )

    def measure_chunk(chunk: int) -> dict:
        started = time.perf_counter()
        compiled = {
            name: logprob_pass.lower(
                graphdef, state, arrays, features, prompt_len=batch.prompt_len, chunk_size=chunk
            ).compile()
            for name, state in (("policy", policy_state), ("reference", reference_state))
        }
        compile_seconds = time.perf_counter() - started

        def both():
            out = (
                compiled["policy"](policy_state, arrays, features),
                compiled["reference"](reference_state, arrays, features),
            )
            return jax.block_until_ready(out)

        timing = common.median_seconds(both, args.repeats)
        seconds = timing["median"]
        return dict(
            chunk=chunk,
            rows=rows,
            tokens=tokens,
            seconds=seconds,
            seconds_all=timing["times"],
            tokens_per_second=tokens / seconds,
            forward_tflops_per_second=2 * forward_flops / seconds / 1e12,
            fraction_of_matmul=2 * forward_flops / seconds / (matmul["tflops"] * 1e12),
            compile_seconds=compile_seconds,
            memory_estimate={name: common.compiled_memory(c) for name, c in compiled.items()},
            logits_chunk_bytes=rows * chunk * config.text.vocab_size * 4,
            peak_bytes_so_far=common.peak_bytes(),
        )

    results = []
    for chunk in sorted(chunks):
        try:
            result = measure_chunk(chunk)
        except Exception as error:
            if not common.is_out_of_memory(error):
                raise
            # larger chunks need more: the out-of-memory error is this chunk's result
            results.append(dict(chunk=chunk, error=common.error_record(error)))
            report.set("chunks", results)
            common.log(f"chunk {chunk}: out of memory; larger chunks not tried")
            break
        results.append(result)
        report.set("chunks", results)
        common.log(
            f"chunk {chunk}: {result['seconds']:.3f} s per pass (policy + reference), "
            f"{result['tokens_per_second']:,.0f} tokens/s, temporaries "
            f"{common.gib(result['memory_estimate']['policy'].get('temp_bytes'))} (policy)"
        )

    table = [
        ("device", report.data["environment"]["device_kind"]),
        ("bf16 matmul baseline", f"{matmul['tflops']:.4g} TFLOP/s"),
        ("forward batch", f"{rows} rows x {lengths.total} tokens = {tokens} tokens"),
    ]
    for r in results:
        if "error" in r:
            table.append((f"chunk {r['chunk']}", f"out of memory: {r['error']['message'][:200]}"))
            continue
        table.append(
            (
                f"chunk {r['chunk']}",
                f"{r['seconds']:.3f} s, {r['tokens_per_second']:,.0f} tok/s, "
                f"{r['fraction_of_matmul']:.1%} of matmul, pass peak est. "
                f"{common.gib(r['memory_estimate']['policy'].get('peak_estimate_bytes'))}, "
                f"device peak so far {common.gib(r['peak_bytes_so_far'])}",
            )
        )
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    report = common.Report(args.out, "gpu_logprobs", args)
    with common.failure_recorded(report):
        table = benchmark(args, report)
    report.finish()
    common.print_table(f"chunked logprob pass (policy + reference), {args.size}", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
