"""The trainer's weight sync to a rollout worker: HF layout made on the host or on the device.

    python benchmarks/trainer_sync.py [--hidden 1024] [--layers 8] [--repeats 3]
        [--worker_dtype bfloat16]

The rollouts' sync (`Rollouts.sync` -> `WorkerEngine.load_policy`) sends the trainable weights
(fp32 master weights, Flax [in, out] kernels) to a worker that holds them in its own dtype (bf16 for a GPU vLLM) in HF layout ([out, in]).
`models.hf_mapping.hf_tensors_for_sync` picks one of two ways by backend; both are measured
here in one run, each into its own `WorkerEngine("null")` (the worker maps the segment and
verifies version and checksum; the first sync, which allocates the segment, is not timed):

- host path (the baseline; the CPU choice): every tensor fetched to the host in its fp32, the
  kernels transposed while being copied into the segment (torch's blocked transpose), fp32 bytes
  sent (the worker casts them on load: not counted here);
- device path (the accelerator choice, `device_hf_tensors`): transpose and cast to the worker's
  dtype in one jitted call on the device, then a plain copy per tensor, each fetched while the
  next ones transfer (`shm._Prefetch`);
- the device path in fp32, to separate the layout from the dtype.

On the CPU backend the "device" is host memory, so the device path adds a pass (and XLA's CPU
transpose is slow): measured 0.64x here, hence the host path on CPUs. On a GPU the transfer
over the host link dominates and bf16 halves it: `benchmarks/gpu_sync.py` measures both paths.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from maye_jax.models.configs import ModelConfig
from maye_jax.models.hf_mapping import (
    device_hf_tensors,
    hf_name_for,
    hf_tensors_for_sync,
    iter_hf_tensors,
)
from maye_jax.models.qwen_vl import build_model
from maye_jax.rollout.client import WorkerEngine
from maye_jax.tiny import tiny_hf_config
from maye_jax.training.train_state import TrainableConfig, split_model

GB = 1e9


def timed_syncs(engine: WorkerEngine, make_arrays, repeats: int) -> list[float]:
    engine.sync_weights(make_arrays(), version=1)  # allocates and lays out the segment
    times = []
    for version in range(2, repeats + 2):
        started = time.perf_counter()
        engine.sync_weights(make_arrays(), version=version)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker_dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()

    hf = tiny_hf_config(
        "qwen2_vl",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        intermediate_size=4 * args.hidden,
    )
    model = build_model(ModelConfig.from_hf(hf), seed=0)  # fp32 master weights
    _, trainable, _ = split_model(model, TrainableConfig())
    names = set(trainable)
    hf_names = {hf_name_for(n) for n in names}
    fp32_bytes = sum(v.size * 4 for v in trainable.values())
    worker_dtype = jnp.dtype(args.worker_dtype)
    chosen = hf_tensors_for_sync(model, names, dtype=worker_dtype)
    picked = "device" if any(isinstance(v, jax.Array) for v in chosen.values()) else "host"
    del chosen
    print(
        f"{jax.devices()[0].platform}: {len(names)} trainable tensors, "
        f"{fp32_bytes / GB:.2f} GB in fp32; worker dtype {args.worker_dtype}; "
        f"hf_tensors_for_sync picks the {picked} path here"
    )

    def host_path():
        return {n: a for n, a in iter_hf_tensors(model) if n in hf_names}

    def device_path(dtype):
        return lambda: device_hf_tensors(model, names, dtype=dtype)

    results = {}
    for label, make in (
        ("host path (fp32, host transpose)", host_path),
        (f"device path ({args.worker_dtype})", device_path(worker_dtype)),
        ("device path (float32)", device_path(jnp.float32)),
    ):
        engine = WorkerEngine("null", timeout_s=600)
        try:
            times = timed_syncs(engine, make, args.repeats)
            sent = engine.last_sync["bytes"]
        finally:
            engine.close()
        results[label] = float(np.median(times))
        print(
            f"  {label:<34} {results[label]:7.3f} s median of {args.repeats}  "
            f"({sent / GB:.2f} GB written, {sent / results[label] / GB:.2f} GB/s)"
        )
    baseline = results["host path (fp32, host transpose)"]
    print("== ratio (host path time / this path's time; > 1: faster than the baseline)")
    for label, seconds in results.items():
        print(f"  {label:<34} {baseline / seconds:5.2f}x")


if __name__ == "__main__":
    main()
