"""The chunked logprob pass on the CPU: time per chunk size against one chunk of the whole response.

    python benchmarks/logprob_chunks.py [--rows=16] [--response=40] [--hidden=128]
        [--vocab=151936] [--chunks=4,8,16,40] [--repeats=5]

`models.logprobs.token_logprobs` computes the [rows, chunk, vocab] logits of one chunk of the
response at a time (`rl.logprob_chunk_size`). The defaults are the CPU demo's shape: a PPO
mini-batch of 16 rows, 40 response positions, hidden 128 and the real 152k vocabulary, where
these logits are most of the step's work. For each chunk size it times the forward pass (the
trajectory's logprobs) and forward + backward with the entropy metric (the update), best of
`repeats` after a warm-up, and prints each as a ratio to the single-chunk baseline measured in
the same run (> 1: faster than one chunk).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from maye_jax.models.logprobs import token_logprobs  # noqa: E402


def best_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return min(times)


def time_chunk(hidden, weight, targets, chunk: int, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) at this chunk size."""

    # weight and targets are arguments, not closed-over constants that XLA would fold
    def logprobs(h, w, t):
        return token_logprobs(h, w, t, temperature=0.6, chunk_size=chunk)

    def loss(h, w, t):  # the update's shape: gradient of the logprobs, entropy as a metric
        lp, entropy = token_logprobs(h, w, t, temperature=0.6, chunk_size=chunk, with_entropy=True)
        return lp.sum(), jax.lax.stop_gradient(entropy).sum()

    arrays = (hidden, weight, targets)
    forward = best_seconds(jax.jit(logprobs), *arrays, repeats=repeats)
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    backward = best_seconds(step, *arrays, repeats=repeats)
    return forward, backward


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--response", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunks", default="4,8,16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (args.rows, args.response, args.hidden)) * 0.5
    weight = jax.random.normal(keys[1], (args.vocab, args.hidden)) * 0.02
    targets = jax.random.randint(keys[2], (args.rows, args.response), 0, args.vocab)
    chunks = [int(c) for c in args.chunks.split(",")]
    baseline = time_chunk(hidden, weight, targets, args.response, args.repeats)
    print(
        f"{args.rows} rows x {args.response} positions, hidden {args.hidden}, vocab {args.vocab}"
        f" ({jax.devices()[0].platform})"
    )
    print("| chunk | forward s | vs one chunk | fwd+bwd s | vs one chunk |")
    print("|---|---|---|---|---|")
    print(f"| {args.response} (baseline) | {baseline[0]:.3f} | 1.00x | {baseline[1]:.3f} | 1.00x |")
    for chunk in chunks:
        forward, backward = time_chunk(hidden, weight, targets, chunk, args.repeats)
        print(
            f"| {chunk} | {forward:.3f} | {baseline[0] / forward:.2f}x"
            f" | {backward:.3f} | {baseline[1] / backward:.2f}x |"
        )


if __name__ == "__main__":
    main()
