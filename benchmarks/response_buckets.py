"""Response columns bucketed to the longest response (`rl.response_len_buckets`) against fixed
at max_tokens, on a batch with a realistic length spread, in one run.

    python benchmarks/response_buckets.py [--rows=32 --ppo_rows=8 --forward_rows=8
        --max_tokens=2048 --median=350 --sigma=0.6 --cut_fraction=0.02]

Response lengths: log-normal around `median` tokens (`sigma` its log-spread), capped at
max_tokens, and `cut_fraction` of the responses cut at max_tokens (no EOS). The defaults follow
what the paper's runs show, responses of a few hundred tokens with a few cut at 2048; pass the
flags for another spread. The same batch goes through step 3's logprob pass (chunks of
`forward_rows`, rows in order of length) and step 4's updates (mini-batches of `ppo_rows`, shuffled) twice: with the
buckets 256/512/1024/2048 and with R fixed at 2048. Each mode runs once to compile its shapes,
then is timed. Model: a random text-only decoder (hidden 256, 2 layers, a 7B's proportions,
vocab 4096), fp32, on this machine's CPU.

Also counted, without running: the response positions a paper-size step computes (896
responses, forward chunks of 112 rows, mini-batches of 28) under the same spread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _common import fp32_update_step, seven_b_proportions  # noqa: E402

from maye_jax.data.sequences import (  # noqa: E402
    make_sequence_batch,
    response_bucket,
    response_len_buckets,
)
from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.rl.losses import LossConfig  # noqa: E402
from maye_jax.rl.trajectory import forward_logprobs  # noqa: E402
from maye_jax.tiny import tiny_hf_config  # noqa: E402
from maye_jax.training.batch import MinibatchMaker  # noqa: E402
from maye_jax.training.update import UpdateConfig  # noqa: E402


def response_lengths(rows: int, args, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.exp(np.log(args.median) + args.sigma * rng.standard_normal(rows))
    lengths = np.clip(np.round(lengths), 1, args.max_tokens).astype(int)
    lengths[rng.random(rows) < args.cut_fraction] = args.max_tokens
    return lengths


def positions(lengths: np.ndarray, group: int, buckets, by_length: bool) -> int:
    """Response positions computed when each group of rows takes its bucket (`by_length`: the
    rows grouped in order of length, as the logprob pass takes them)."""
    order = np.argsort(lengths, kind="stable") if by_length else np.arange(len(lengths))
    return sum(
        len(chunk) * response_bucket(int(lengths[chunk].max()), buckets)
        for chunk in np.array_split(order, max(1, len(order) // group))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--ppo_rows", type=int, default=8)
    parser.add_argument("--forward_rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--max_tokens", type=int, default=2048)
    parser.add_argument("--median", type=float, default=350)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--cut_fraction", type=float, default=0.02)
    parser.add_argument("--buckets", type=int, default=4, help="rl.response_len_buckets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    buckets = response_len_buckets(args.max_tokens, args.buckets)
    fixed = response_len_buckets(args.max_tokens, 1)

    config = ModelConfig.from_hf(tiny_hf_config("qwen2_5_vl", vocab_size=4096, hidden_size=256))
    config = seven_b_proportions(config)  # head_dim 128, MLP 1344, 2 query heads, 1 KV head
    model, step, state, frozen = fp32_update_step(
        config, UpdateConfig(loss=LossConfig(kl_loss_coeff=0.0))
    )

    rng = np.random.default_rng(args.seed)
    lengths = response_lengths(args.rows, args, args.seed)
    prompts = [{"input_ids": rng.integers(0, 4000, args.prompt)} for _ in range(args.rows)]
    responses = [list(rng.integers(0, 4000, n)) for n in lengths]
    order = rng.permutation(args.rows)  # the PPO mini-batches' shuffle

    def one_step(mode_buckets) -> tuple[float, float]:
        """(logprob pass seconds, update seconds) of the batch with these buckets."""
        longest = int(lengths.max())
        batch = make_sequence_batch(
            prompts,
            responses,
            config,
            pad_id=0,
            prompt_multiple=64,
            response_len=response_bucket(longest, mode_buckets),
        )
        started = time.perf_counter()
        logprobs = forward_logprobs(
            model,
            batch,
            None,
            temperature=1.0,
            forward_batch_size=args.forward_rows,
            chunk_size=512,
            response_buckets=mode_buckets,
        )
        middle = time.perf_counter()
        shape = batch.response_mask.shape
        maker = MinibatchMaker.build(
            batch,
            per_token=dict(
                advantages=rng.standard_normal(shape).astype(np.float32), logprobs_old=logprobs
            ),
            response_buckets=mode_buckets,
        )
        current = holder["state"]
        for start in range(0, args.rows, args.ppo_rows):
            minibatch = maker(order[start : start + args.ppo_rows], 1)
            current, metrics, _ = step(current, frozen, minibatch)
        jax.block_until_ready(metrics["loss/total"])
        holder["state"] = current
        return middle - started, time.perf_counter() - middle

    holder = {"state": state}
    results = {}
    for mode in (buckets, fixed):
        one_step(mode)  # compile every shape this mode uses
    for name, mode in (("bucketed", buckets), ("fixed", fixed)):
        results[name] = one_step(mode)
    print(
        f"batch: {args.rows} responses, lengths median {np.median(lengths):.0f}, mean "
        f"{lengths.mean():.0f}, max {lengths.max()} ({int((lengths == args.max_tokens).sum())} cut "
        f"at {args.max_tokens}); prompt {args.prompt}; logprob chunks of {args.forward_rows} rows, "
        f"mini-batches of {args.ppo_rows}; buckets {buckets}; {os.cpu_count()} CPU cores"
    )
    for name, (logprob_s, update_s) in results.items():
        print(f"{name:9s}: logprob pass {logprob_s:6.2f} s, updates {update_s:6.2f} s")
    (b_lp, b_up), (f_lp, f_up) = results["bucketed"], results["fixed"]
    print(
        f"fixed / bucketed time: logprob pass {f_lp / b_lp:.2f}x, updates {f_up / b_up:.2f}x, "
        f"both {(f_lp + f_up) / (b_lp + b_up):.2f}x"
    )
    paper = response_lengths(896, args, args.seed + 1)
    shuffled = paper[np.random.default_rng(args.seed).permutation(896)]
    for what, rows_group, by_length in (
        ("logprob chunks of 112, rows by length", 112, True),
        ("shuffled mini-batches of 28", 28, False),
    ):
        ours = positions(shuffled, rows_group, buckets, by_length)
        full = 896 * fixed[-1]
        print(
            f"paper-size step (896 responses, {what}): {ours / full:.1%} of the response "
            f"positions of R = {fixed[-1]} (mean response {paper.mean():.0f} tokens)"
        )


if __name__ == "__main__":
    main()
