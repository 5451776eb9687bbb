"""The jitted policy update at Qwen2.5-VL-3B size on one GPU: tokens/s, MFU, memory (issue 7).

    python benchmarks/gpu_update.py [--size=3b] [--micro_batches=2] [--micro_rows=2]
        [--prompt=1024] [--response=2048] [--image_tokens=400] [--remat=layer|dots|none]
        [--attention=xla|cudnn]
        [--no_scan_layers] [--chunk=512] [--frozen_embeddings] [--steps=5]
        [--profile=DIR] [--out=FILE.json]
    python benchmarks/gpu_update.py --memory_only         # compile only: XLA's memory estimate
    python benchmarks/gpu_update.py --size=7b --fit       # does the 7B step fit (and with what)?

What runs is the project's step (`maye_jax.training.update.make_train_step`): PPO-clip + k3 KL loss
(coefficient 0.001) over the response tokens, exact gradient accumulation over `micro_batches`
micro-batches of `micro_rows` rows (`lax.scan`), global-norm clip and AdamW on fp32 master
weights, bf16 compute, the decoder layers scanned (`UpdateConfig.scan_layers`) and remat per
layer (the paper configs' `model.remat=True`; `--remat=dots` also keeps the projections'
outputs, `--remat=none` turns it off), the einsum attention (`--attention=cudnn`: cuDNN flash
attention through `jax.nn.dot_product_attention`). Weights are random
(the model's initialisers) at the published shapes, made on the device (benchmarks/_common.py).
Every row is a full sequence: a prompt of `prompt` tokens with one image of `image_tokens`
tokens, and a response of `response` tokens. The frozen vision tower runs once per batch outside
the step (as in the RL loop, `sequences.image_features`); it is timed and reported separately.

Model FLOPs per update, the issue's definition:

    6 * N * T  +  6 * layers * hidden * S * T

N = trainable LLM parameters (token embeddings, decoder layers, final norm, and lm_head when
untied: 3.09B at 3B), S = prompt + response tokens per row, T = rows * S tokens per update. The
second term is causal attention: QK^T and AV are 2 matmuls of 2 * S * hidden FLOPs per token
and layer forward, x3 for forward + backward = 12 * layers * hidden * S, halved for causality.
Remat recomputation is not counted.
Note: the formula charges the lm_head matmul on every token; the step computes logits on the
response tokens only (at 3B with 1024 + 2048 tokens this is ~3% of the model FLOPs).
MFU = model FLOPs per second / the bf16 matmul rate measured in the same run (random bf16
8192 x 8192 matmuls).

Memory: the allocator's peak (`peak_bytes_in_use`, GPU only; "n/a" on CPU) and XLA's estimate of
the compiled step (arguments + outputs - donated + temporaries). In the RL loop a bf16 reference
copy of the trainable weights is resident too; its size is reported beside the step's.

The step is first compiled on abstract arrays (no weights): XLA's estimate says whether it fits
this device. If it does not, the benchmark falls back (unless `--no_fallback`) to one row per
micro-batch (same rows per update), then also to frozen embeddings, and says so; the executable
compiled for the estimate is the one that runs, so this costs no second compile.

`--fit`: for each variant (`--fit_variants`, in order) the step is compiled on abstract arrays;
where the estimate fits this device it is also run, with the RL loop's bf16 reference copy
allocated too, and an out-of-memory error is the answer, not a crash. It stops at the first
variant that ran, or (on a smaller GPU) whose estimate fits one H200. Variants: `all` (every LLM
weight trains), `frozen_embeddings` (`model.train_embeddings=False`: embeddings and lm_head
frozen, in bf16), `frozen_embeddings_no_kl` (also kl_loss_coeff=0: no reference model resident,
no ref_logprobs). train_state fixes fp32 master weights (there is no bf16-params option); remat
and the layer scan follow the flags.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (sets the GPU allocator's memory fraction before JAX)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from _trace import print_trace_summary, summarize_trace  # noqa: E402
from _update_parts import Compiled, Variant, model_flops, run_steps, tree_bytes  # noqa: E402

FIT_VARIANTS = ("all", "frozen_embeddings", "frozen_embeddings_no_kl")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_size_flags(parser)
    parser.add_argument("--micro_batches", type=int, default=2, help="micro-batches per update")
    parser.add_argument("--micro_rows", type=int, default=2, help="rows per micro-batch")
    parser.add_argument(
        "--remat",
        choices=("layer", "dots", "none"),
        default="layer",
        help="per layer, keeping only its input (layer), also the projections (dots), or none",
    )
    parser.add_argument(
        "--attention",
        choices=("xla", "cudnn"),
        default="xla",
        help="the decoder's attention: the einsum, or cuDNN flash attention (models/layers.py)",
    )
    parser.add_argument("--no_scan_layers", action="store_true", help="the unrolled layer loop")
    parser.add_argument("--chunk", type=int, default=512, help="UpdateConfig.logprob_chunk_size")
    parser.add_argument("--frozen_embeddings", action="store_true")
    parser.add_argument("--no_fallback", action="store_true", help="run as configured or fail")
    parser.add_argument(
        "--memory_limit_gib", type=float, default=0, help="pretend the device has this (0: its own)"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed updates (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates after compiling")
    parser.add_argument("--tower_repeats", type=int, default=3)
    parser.add_argument("--matmul_size", type=int, default=0, help="0: 8192 on GPU, 256 on CPU")
    parser.add_argument("--profile", default="", help="jax.profiler trace of a few steps here")
    parser.add_argument("--profile_steps", type=int, default=1)
    parser.add_argument("--memory_only", action="store_true", help="compile only, no weights")
    parser.add_argument("--fit", action="store_true", help="try the --fit_variants in order")
    parser.add_argument("--fit_variants", default=",".join(FIT_VARIANTS))
    return parser.parse_args(argv)


def fit_variant(name: str, args) -> Variant:
    if name not in FIT_VARIANTS:
        raise ValueError(f"unknown fit variant {name!r}; known: {FIT_VARIANTS}")
    return Variant(
        name,
        args.micro_batches,
        args.micro_rows,
        train_embeddings=name == "all",
        kl_coeff=0.0 if name.endswith("no_kl") else Variant.kl_coeff,
    )


def benchmark_variants(args) -> list[Variant]:
    """As configured, then the fallbacks that need less memory (same rows per update)."""
    rows = args.micro_batches * args.micro_rows
    configured = Variant(
        "as configured", args.micro_batches, args.micro_rows, not args.frozen_embeddings
    )
    variants = [configured]
    if not args.no_fallback:
        if args.micro_rows > 1:
            variants.append(Variant("1 row per micro-batch", rows, 1, configured.train_embeddings))
        if configured.train_embeddings:
            variants.append(Variant("1 row per micro-batch, frozen embeddings", rows, 1, False))
    return variants


def device_limit(args) -> int | None:
    """Bytes the allocator may use (None: unknown, e.g. on a CPU), or the flag's pretence."""
    if args.memory_limit_gib:
        return int(args.memory_limit_gib * common.GIB)
    return (common.device_memory() or {}).get("bytes_limit")


def fits(estimate_bytes: int, limit: int | None) -> bool:
    return limit is None or estimate_bytes <= 0.97 * limit


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------


def memory_only(args, report) -> list[tuple[str, str]]:
    compiled = Compiled(args, benchmark_variants(args)[0])
    report.set("memory_estimate", compiled.estimate)
    common.log(compiled.describe())
    estimate = compiled.estimate
    return [
        ("trainable params", common.count(estimate["trainable_params"])),
        ("state (params + AdamW mu, nu; fp32)", common.gib(estimate["state_bytes"])),
        ("step temporaries (XLA)", common.gib(estimate.get("temp_bytes"))),
        ("step peak estimate (XLA)", common.gib(estimate.get("peak_estimate_bytes"))),
        ("+ frozen tower", common.gib(estimate["step_resident_estimate_bytes"])),
        ("+ bf16 reference (RL loop)", common.gib(estimate["resident_estimate_bytes"])),
    ]


def fit(args, report) -> list[tuple[str, str]]:
    limit = device_limit(args)
    rows, results = [], {}
    for name in args.fit_variants.split(","):
        try:
            compiled = Compiled(args, fit_variant(name, args))
        except Exception as error:  # noqa: BLE001 - reported, then the next variant
            results[name] = dict(error=common.error_record(error))
            report.set("fit", results)
            rows.append((name, f"compile failed: {type(error).__name__}: {error}"[:300]))
            continue
        common.log(compiled.describe())
        resident = compiled.estimate["resident_estimate_bytes"]
        result = dict(
            compiled.estimate,
            fits_h200_estimate=resident <= common.H200_USABLE_BYTES,
            device_limit_bytes=limit,
        )
        runs_here = fits(resident, limit)
        if runs_here:
            result.update(try_run(compiled, args))
        else:
            result["ran"] = False
            result["why_not_run"] = (
                f"estimate {common.gib(resident)} > 97% of this device's {common.gib(limit)}"
            )
        results[name] = result
        report.set("fit", results)
        if result.get("ran"):
            verdict = f"ran, peak {common.gib(result.get('peak_bytes'))}"
        else:
            verdict = result.get("why_not_run") or result["error"]["message"]
        h200 = "fits" if result["fits_h200_estimate"] else "does not fit"
        rows.append(
            (
                name,
                f"estimate {common.gib(resident)} (one H200, "
                f"{common.gib(common.H200_USABLE_BYTES)} usable: {h200}); {verdict}"[:300],
            )
        )
        del compiled
        gc.collect()
        if result.get("ran") or (not runs_here and result["fits_h200_estimate"]):
            break
    return rows


def try_run(compiled: Compiled, args) -> dict:
    """Allocates everything the RL loop holds during an update (state, frozen tower, bf16
    reference) and runs two updates; an out-of-memory error is returned, not raised."""
    arrays = {}
    try:
        arrays = compiled.allocate(args.seed, with_reference=compiled.variant.kl_coeff != 0)
        _, times, _, finite = run_steps(
            compiled.executable,
            arrays.pop("state"),
            arrays["frozen"],
            arrays["minibatch"],
            2,
        )
        return dict(ran=True, seconds=times, finite=finite, peak_bytes=common.peak_bytes())
    except Exception as error:  # noqa: BLE001 - an out-of-memory error is the answer
        return dict(ran=False, error=common.error_record(error))
    finally:
        arrays.clear()
        gc.collect()


def choose_variant(args, report) -> Compiled:
    """The first benchmark variant whose estimate fits this device (else the last one)."""
    limit = device_limit(args)
    tried = []
    for variant in benchmark_variants(args):
        compiled = Compiled(args, variant)
        common.log(compiled.describe())
        tried.append(compiled.estimate)
        report.set("variants_tried", tried)
        if fits(compiled.estimate["step_resident_estimate_bytes"], limit):
            return compiled
        common.log(f"  does not fit this device ({common.gib(limit)}): trying the next variant")
    return compiled


def profile(args, report, one_step) -> None:
    """A jax.profiler trace of `profile_steps` updates, and the summary of where time went."""
    try:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(args.profile_steps):
                one_step()
    except Exception as error:  # noqa: BLE001 - the figures above stand without the trace
        report.set("profile", dict(error=common.error_record(error)))
        common.log(f"profile failed: {type(error).__name__}: {error}")
        return
    files = [
        os.path.relpath(os.path.join(root, f), args.profile)
        for root, _, names in os.walk(args.profile)
        for f in names
    ]
    summary = summarize_trace(args.profile)
    report.set("profile", dict(directory=args.profile, files=files, summary=summary))
    common.log(f"profile of {args.profile_steps} update(s) written to {args.profile}")


def benchmark(args, report) -> list[tuple[str, str]]:
    matmul = common.matmul_baseline(args.matmul_size)
    report.set("baseline_matmul", matmul)
    common.log(f"baseline: bf16 matmul {matmul['size']}^3 at {matmul['tflops']:.4g} TFLOP/s")

    compiled = choose_variant(args, report)
    variant, config, lengths = compiled.variant, compiled.config, compiled.lengths
    report.set("compile", compiled.estimate)
    arrays = compiled.allocate(args.seed, with_reference=False)
    state, frozen, minibatch = arrays["state"], arrays["frozen"], arrays["minibatch"]
    num_params = compiled.num_params
    report.set(
        "model",
        dict(
            size=args.size,
            trainable_llm_params=num_params,
            frozen_params=sum(v.size for v in frozen.values()),
            state_bytes=tree_bytes(state),
            frozen_bytes=tree_bytes(frozen),
            reference_bytes_in_rl_loop=tree_bytes(state.params) // 2,
            init_seconds=arrays["init_seconds"],
        ),
    )
    common.log(
        f"model {args.size}: {common.count(num_params)} trainable LLM params, state "
        f"{common.gib(tree_bytes(state))}, frozen {common.gib(tree_bytes(frozen))}"
    )
    tower = arrays.get("tower")
    if tower:
        report.set("vision_tower", tower)
        common.log(
            f"frozen vision tower (outside the update, once per batch): {tower['images']} "
            f"images, {tower['patches']} patches in {tower['seconds'] * 1e3:.1f} ms"
        )
    peak_before = common.peak_bytes()
    state, _, _, _ = run_steps(compiled.executable, state, frozen, minibatch, args.warmup)
    state, times, metrics, finite = run_steps(
        compiled.executable, state, frozen, minibatch, args.steps
    )
    seconds = float(np.median(times))
    flops = model_flops(num_params, config, variant.rows, lengths.total)
    achieved = flops["total"] / seconds
    mfu = achieved / (matmul["tflops"] * 1e12)
    result = dict(
        variant=variant.name,
        rows=variant.rows,
        micro_batches=variant.micro_batches,
        micro_rows=variant.micro_rows,
        train_embeddings=variant.train_embeddings,
        seq_len=lengths.total,
        tokens_per_update=flops["tokens"],
        seconds_per_update=seconds,
        seconds_all=times,
        tokens_per_second=flops["tokens"] / seconds,
        model_flops_per_update=flops["total"],
        model_flops_dense=flops["dense"],
        model_flops_attention=flops["attention"],
        model_tflops_per_second=achieved / 1e12,
        mfu=mfu,
        finite=finite,
        loss=float(metrics["loss/total"]),
        peak_bytes_before_step=peak_before,
        peak_bytes=common.peak_bytes(),
        remat=args.remat,
        attention=args.attention,
        scan_layers=not args.no_scan_layers,
    )
    report.set("update", result)

    if args.profile:
        holder = {"state": state}

        def one_step():  # the state is donated: each update takes the previous one's
            holder["state"] = run_steps(compiled.executable, holder["state"], frozen, minibatch, 1)[
                0
            ]

        profile(args, report, one_step)

    table = [
        ("device", report.data["environment"]["device_kind"]),
        ("bf16 matmul baseline", f"{matmul['tflops']:.4g} TFLOP/s"),
        ("trainable LLM params", common.count(num_params)),
        (
            "update",
            f"{variant.rows} rows x {lengths.total} tokens ({variant.micro_batches} x "
            f"{variant.micro_rows}), remat {args.remat}, attention {args.attention}, "
            f"scan {not args.no_scan_layers}, variant: {variant.name}",
        ),
        ("seconds / update (median)", f"{seconds:.3f} s of {len(times)}"),
        ("tokens / s", f"{result['tokens_per_second']:,.0f}"),
        ("model TFLOP/s", f"{achieved / 1e12:.4g}"),
        ("MFU (vs measured matmul)", f"{mfu:.1%} (goal >= 40%)"),
        ("peak device memory", common.gib(result["peak_bytes"])),
        ("step peak estimate (XLA)", common.gib(compiled.estimate.get("peak_estimate_bytes"))),
        ("+ bf16 reference in RL loop", common.gib(tree_bytes(state.params) // 2)),
        ("finite loss / grads", str(finite)),
    ]
    tried = report.data.get("variants_tried", [])
    if len(tried) > 1:
        table.append(
            (
                "fell back (estimates)",
                "; ".join(
                    f"{e['variant']['name']}: {common.gib(e['step_resident_estimate_bytes'])}"
                    for e in tried
                )
                + f" vs this device's {common.gib(device_limit(args))}",
            )
        )
    if tower:
        table.append(
            (
                "vision tower (separate)",
                f"{tower['seconds'] * 1e3:.1f} ms per batch of {tower['images']} images",
            )
        )
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    report = common.Report(args.out, "gpu_update", args)
    with common.failure_recorded(report):
        if args.memory_only:
            title, table = "update memory (compile only)", memory_only(args, report)
        elif args.fit:
            title, table = f"does the {args.size} update fit?", fit(args, report)
        else:
            title, table = f"policy update, {args.size}", benchmark(args, report)
    report.finish()
    common.print_table(title, table)
    if "summary" in report.data.get("profile", {}):
        print_trace_summary(report.data["profile"]["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
