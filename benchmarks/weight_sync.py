"""Weight-sync bandwidth: JAX arrays -> shared memory -> torch views in a worker process.

    python benchmarks/weight_sync.py [--gigabytes 1.0] [--dtype float32] [--repeats 3]

Measures, in one run and on the same machine:
- `numpy.copyto` of the same number of bytes into an already-touched buffer (the memcpy bound);
- a steady-state `WorkerEngine.sync_weights` with a worker of the `null` backend (it maps the
  segment, verifies version and checksum and builds torch views of every tensor, without an
  engine to copy into): device_get of each JAX array, the copy into the segment, the checksum on
  both sides, and the round trip. Reported as GB/s and as a fraction of memcpy (goal >= 50%);
- the first sync (which allocates and populates the segment), and two ways to go from Flax's
  [in, out] kernels to HF's [out, in]: transposing on the host while copying, or on the device
  (a jitted transpose) before the copy.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from maye_jax.rollout.client import WorkerEngine

GB = 1e9


def make_arrays(total_bytes: int, dtype) -> dict[str, jax.Array]:
    """Decoder-like tensors (4096 x 4096 kernels) plus a small frozen vision part."""
    itemsize = jnp.dtype(dtype).itemsize
    side = 4096
    count = max(1, round(total_bytes / (side * side * itemsize)))
    key = jax.random.key(0)
    arrays = {}
    for index in range(count):
        key, sub = jax.random.split(key)
        arrays[f"model.layers.{index}.mlp.down_proj.weight"] = jax.random.normal(
            sub, (side, side), dtype
        )
    arrays["visual.blocks.0.mlp.fc1.weight"] = jnp.ones((1024, 1024), dtype)
    arrays["model.norm.weight"] = jnp.ones((side,), dtype)
    jax.block_until_ready(list(arrays.values()))
    return arrays


def best_of(repeats: int, run) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def make_memcpy(num_bytes: int, shm_path: str | None = None):
    """numpy.copyto into touched memory (no first-touch page faults in the timing): anonymous
    memory by default, or a file mapping on /dev/shm (tmpfs: 4 KiB pages, no huge pages)."""
    source = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8)
    if shm_path is None:
        target = np.ones(num_bytes, np.uint8)
    else:
        with open(shm_path, "w+b") as file:
            file.truncate(num_bytes)
            target = np.frombuffer(mmap.mmap(file.fileno(), num_bytes), np.uint8)
        os.unlink(shm_path)  # the mapping keeps it alive; nothing is left behind
        target[:] = 1
    return lambda: np.copyto(target, source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0, help="trainable bytes to sync")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16

    arrays = make_arrays(int(args.gigabytes * GB), dtype)
    trainable = {n: a for n, a in arrays.items() if not n.startswith("visual.")}
    trainable_bytes = sum(a.nbytes for a in trainable.values())
    print(
        f"{len(trainable)} trainable tensors, {trainable_bytes / GB:.2f} GB ({args.dtype}); "
        f"devices: {jax.devices()[0].platform}"
    )

    memcpy = make_memcpy(trainable_bytes)
    shm_seconds = best_of(
        args.repeats, make_memcpy(trainable_bytes, f"/dev/shm/maye-bench-{os.getpid()}")
    )
    rows = [("numpy.copyto into a touched /dev/shm mapping", shm_seconds, trainable_bytes)]

    engine = WorkerEngine("null", timeout_s=600)
    try:
        engine.sync_weights(arrays, version=0)
        rows.append(
            (
                "first sync (allocates the segment)",
                engine.last_sync["total_seconds"],
                engine.last_sync["bytes"],
            )
        )
        version = iter(range(1, 1000))
        parts = {}

        def sync_hf_layout():
            engine.sync_weights(trainable, version=next(version))
            parts.update(engine.last_sync)

        # memcpy and sync alternate, so both see the same (shared, noisy) memory bandwidth
        copy_seconds = sync_seconds = write_seconds = worker_seconds = float("inf")
        for _ in range(args.repeats):
            copy_seconds = min(copy_seconds, best_of(1, memcpy))
            seconds = best_of(1, sync_hf_layout)
            if seconds < sync_seconds:
                sync_seconds = seconds
                write_seconds, worker_seconds = parts["write_seconds"], parts["worker_seconds"]
        memcpy_rate = trainable_bytes / copy_seconds / GB
        rows.insert(0, ("numpy.copyto (touched destination)", copy_seconds, trainable_bytes))
        rows.append(("sync: device_get + shm write + worker views", sync_seconds, trainable_bytes))

        flax_layout = {n: jnp.asarray(a.T) for n, a in trainable.items()}  # kernels as [in, out]
        jax.block_until_ready(list(flax_layout.values()))

        def sync_transposed_on_host():
            views = {n: np.asarray(a).T for n, a in flax_layout.items()}
            engine.sync_weights(views, version=next(version))

        transpose = jax.jit(lambda tree: jax.tree.map(lambda a: a.T, tree))

        def sync_transposed_on_device():
            engine.sync_weights(
                jax.block_until_ready(transpose(flax_layout)), version=next(version)
            )

        sync_transposed_on_device()  # compile
        rows.append(
            (
                "sync from Flax layout, transposed on host",
                best_of(args.repeats, sync_transposed_on_host),
                trainable_bytes,
            )
        )
        rows.append(
            (
                "sync from Flax layout, jitted transpose first",
                best_of(args.repeats, sync_transposed_on_device),
                trainable_bytes,
            )
        )
    finally:
        engine.close()

    print(f"\n{'path':48s} {'seconds':>8s} {'GB/s':>7s} {'of memcpy':>10s}")
    for name, seconds, num_bytes in rows:
        rate = num_bytes / seconds / GB
        print(f"{name:48s} {seconds:8.3f} {rate:7.2f} {rate / memcpy_rate:9.0%}")
    steady = trainable_bytes / (write_seconds + worker_seconds) / GB
    print(
        f"\nsteady-state sync: trainer write {write_seconds:.3f} s, worker verify + views "
        f"{worker_seconds:.3f} s; {steady:.2f} GB/s = {steady / memcpy_rate:.0%} of memcpy "
        f"(goal >= 50%)"
    )


if __name__ == "__main__":
    main()
