"""The policy update's achieved FLOP/s against this machine's own matmul rate, in one run.

    python benchmarks/update_mfu.py                 # matmul-bound shapes: hidden 512, vocab 4096
    python benchmarks/update_mfu.py --demo          # the CPU demo's shapes: hidden 128, 152k vocab

One jitted update (`training/update.py`: forward + backward of the PPO-clip + k3-KL loss over a
mini-batch, gradient clipping, AdamW) on a random text-only Qwen2.5-VL decoder in fp32 (by
default with a 7B's proportions: head_dim 128, MLP 5.3x hidden, 2 query heads per KV head; the
demo's shapes are the demo model's own: head_dim 32, MLP 2x hidden), timed as
the median of `steps` updates after a compile. Model FLOPs per update as benchmarks/gpu_update.py
counts them: 6 N T + 6 layers hidden S T (N trainable LLM parameters, embeddings and lm_head
included; S tokens per row; T tokens per update). The baseline: fp32 [n, n] @ [n, n] products
(`--matmul`, 8 dependent products in one program) measured in the same run on the same cores.
Prints both rates and their ratio (the update's "MFU" on this CPU).

At the demo's shapes the 152k-vocabulary logits are most of the work that is not in the count
of 6 N T's spirit: the formula charges the lm_head matmul (2 x 152k x 128 FLOPs per token and
pass) but not the softmax over 152k entries (an exp, a max and a sum per entry, forward and
backward), which on a CPU costs about as much time as the matmul itself.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import fp32_update_step, matmul_baseline, median_seconds, seven_b_proportions  # noqa: E402
from _update_parts import model_flops  # noqa: E402
from update_throughput import make_batch  # noqa: E402

from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.rl.losses import LossConfig  # noqa: E402
from maye_jax.tiny import tiny_hf_config  # noqa: E402
from maye_jax.training.update import UpdateConfig, scans_layers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="the CPU demo's shapes")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=192)
    parser.add_argument("--chunk", type=int, default=512, help="rl.logprob_chunk_size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--matmul", type=int, default=1024)
    parser.add_argument(
        "--scan_layers",
        choices=("auto", "true", "false"),
        default="auto",
        help="UpdateConfig.scan_layers (auto: looped here, on one CPU device)",
    )
    args = parser.parse_args()
    if args.demo:  # configs/demo.py: hidden 128, 4 layers, 152k vocab, 16-row mini-batches
        args.hidden, args.vocab, args.rows = 128, 151936, 16
        args.prompt, args.response, args.chunk = 128, 40, 8
    hf_config = tiny_hf_config(
        "qwen2_5_vl", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers
    )
    config = ModelConfig.from_hf(hf_config)
    if not args.demo:  # a 7B's proportions: head_dim 128, MLP 5.3x hidden, GQA
        config = seven_b_proportions(config)
    update_config = UpdateConfig(
        loss=LossConfig(kl_loss_coeff=0.001),
        logprob_chunk_size=args.chunk,
        scan_layers={"auto": None, "true": True, "false": False}[args.scan_layers],
    )
    _, step, state, frozen = fp32_update_step(config, update_config)
    scanned = scans_layers(update_config, step.layout)
    minibatch = make_batch(config, args, np.random.default_rng(0)).split(1)
    num_params = sum(int(np.prod(v.shape)) for n, v in state.params.items())
    flops = model_flops(num_params, config, args.rows, args.prompt + args.response)

    holder = {"state": state}

    def update() -> None:
        holder["state"], metrics, _ = step(holder["state"], frozen, minibatch)
        jax.block_until_ready(metrics["loss/total"])

    def matmul_rate() -> float:  # fp32 FLOP/s of this machine, now
        return matmul_baseline(args.matmul, repeats=5, dtype=jnp.float32)["tflops"] * 1e12

    update()  # compile
    baseline = matmul_rate()
    seconds = median_seconds(update, args.steps, warmup=0)["median"]
    baseline = (baseline + matmul_rate()) / 2  # before and after the updates
    achieved = flops["total"] / seconds
    print(
        f"update: {num_params / 1e6:.2f}M trainable parameters (hidden {args.hidden}, "
        f"{args.layers} layers, vocab {args.vocab}), {args.rows} rows x {args.prompt}+"
        f"{args.response} tokens, logprob chunk {args.chunk}, layers "
        f"{'scanned' if scanned else 'looped'}, fp32, {os.cpu_count()} CPU cores"
    )
    print(
        f"model FLOPs per update {flops['total'] / 1e9:.2f} G (attention {flops['attention'] / 1e9:.2f} G); "
        f"median {seconds:.3f} s of {args.steps} updates = {achieved / 1e9:.1f} GFLOP/s"
    )
    print(f"fp32 matmul {args.matmul}^3 baseline: {baseline / 1e9:.1f} GFLOP/s")
    print(f"update / matmul rate: {achieved / baseline:.1%}")


if __name__ == "__main__":
    main()
