"""What a checkpoint's digest costs, and what re-reading the files to hash them would cost.

    python benchmarks/checkpoint_digest.py [--megabytes 400] [--repeats 3]

A stand-in train state of about `--megabytes` (fp32 "params" and two AdamW-like moments, a
step counter) on 8 fake CPU devices, sharded like the trainer's (first axis over the devices).
Measured in one run, best of `--repeats`:
- `TrainCheckpointer.save` (Orbax write + wait, the digest, the listing check) and its parts:
  the on-device content digest and the per-process file listing, both part of the save;
- what the issue ruled out: re-reading the written files from the page cache and hashing them
  (SHA-256, BLAKE2b, CRC-32), and reading them alone;
- on restore: Orbax's restore, and the listing check + content digest added to it.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from maye_jax.storage import digest  # noqa: E402
from maye_jax.storage.train_checkpoints import TrainCheckpointer, abstract_like  # noqa: E402

MB = 1e6


def make_state(megabytes: float) -> dict:
    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
    sharded, replicated = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    rows = max(8, int(megabytes * MB / 3 / 4 / 4096) // 8 * 8)  # three [rows, 4096] fp32 arrays
    key = jax.random.key(0)
    state = {}
    for name in ("params", "mu", "nu"):
        key, sub = jax.random.split(key)
        state[name] = {"w": jax.device_put(jax.random.normal(sub, (rows, 4096)), sharded)}
    state["step"] = jax.device_put(np.int32(7), replicated)
    return jax.block_until_ready(state)


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def read_files(root: Path, update=None) -> int:
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
                if update is not None:
                    update(view[:count])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=400.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = make_state(args.megabytes)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(
        f"state: {state_bytes / MB:.0f} MB on {len(jax.devices())} devices ({jax.devices()[0].platform})"
    )
    digest.content_digests(state)  # compile once

    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = TrainCheckpointer(tmp, keep=args.repeats + 1)
        steps = iter(range(1, 1000))
        save = best_of(args.repeats, lambda: checkpointer.save(next(steps), state, {"n": 1}))
        step_dir = Path(tmp) / "checkpoints" / str(checkpointer.latest_step())
        rows = [
            ("checkpoint save: Orbax write + digest + listing check", save),
            (
                "  content digest on the devices (part of the save)",
                best_of(args.repeats, lambda: digest.content_digests(state)),
            ),
            (
                "  file listing with sizes (part of the save)",
                best_of(args.repeats, lambda: digest.file_sizes(step_dir)),
            ),
        ]
        written = read_files(step_dir)
        rows.append(
            (
                "re-read the files, no hashing (page cache)",
                best_of(args.repeats, lambda: read_files(step_dir)),
            )
        )
        for name in ("sha256", "blake2b"):
            rows.append(
                (
                    f"re-read + {name}",
                    best_of(
                        args.repeats, lambda n=name: read_files(step_dir, hashlib.new(n).update)
                    ),
                )
            )
        crc = [0]

        def crc_update(chunk):
            crc[0] = zlib.crc32(chunk, crc[0])

        rows.append(
            ("re-read + crc32", best_of(args.repeats, lambda: read_files(step_dir, crc_update)))
        )
        abstract = abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
        step = checkpointer.latest_step()
        rows.append(
            (
                "restore (Orbax), unchecked",
                best_of(args.repeats, lambda: checkpointer.restore(step, abstract)),
            )
        )
        rows.append(
            (
                "restore_latest: listing check + restore + content digest",
                best_of(
                    args.repeats,
                    lambda: checkpointer.restore_latest(
                        state, jax.tree.map(lambda x: x.sharding, state)
                    ),
                ),
            )
        )
        checkpointer.close()

    print(f"checkpoint files: {written / MB:.0f} MB\n")
    print("| operation | seconds | MB/s of state |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} s | {state_bytes / MB / seconds:,.0f} |")


if __name__ == "__main__":
    main()
