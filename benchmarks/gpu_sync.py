"""Weight sync of the 3B and 7B LLM weights from JAX device arrays to a torch process on the same
GPU through shared memory: seconds and GB/s of each stage (issue 7).

    python benchmarks/gpu_sync.py [--sizes=3b,7b] [--dtype=bfloat16] [--repeats=3]
        [--worker_device=auto] [--out=FILE.json]

The weights: every LLM tensor (embeddings, decoder layers, final norm, lm_head when untied: what
the RL loop trains) at the published shapes, random, as JAX device arrays in the Flax layout and
in fp32, like the train state's master weights; they are sent in `--dtype` (bf16 by default). The
receiver: the project's rollout worker (`python -m maye_jax.rollout.worker`, started by
`WorkerEngine`) with its `null` backend, which maps the segment, verifies version and checksum,
builds torch views and copies every tensor into a torch tensor of its own on `--worker_device`
(`cuda` when JAX runs on a GPU, else `cpu`), then checks the norm weights it holds.

Stages, each timed on its own (median of `repeats` after a first sync that allocates the
segment and the worker's tensors):
  1. prepare: a jitted cast to `--dtype` + transpose to the HF layout on the device (kernels
     [in, out] -> [out, in]), new arrays every time (as after every update);
  2. device -> host: `jax.device_get` of all of them (copies started together);
  3. host -> shm: `WeightSegment.write` (copy into the mapped segment + checksum);
  4. worker read: map + checksum + torch views;  5. worker load: copy into its GPU tensors.
End to end, the path the trainer takes on an accelerator (`hf_tensors_for_sync`): prepare, then
`WorkerEngine.sync_weights` on the device arrays (each fetched while the next ones transfer) up
to the worker's reply. Baseline, measured in the same run: `jax.device_get` of one large (1 GiB)
array. Goal: 7B end to end < 3 s. For comparison (`--host_path_sizes`, 3B by default), the path
the trainer takes on the CPU backend: fp32 weights fetched, kernels transposed on the host while
copied into the segment (`hf_views_on_host`), fp32 bytes sent.

Memory: the 7B weights need ~15 GB of /dev/shm in bf16 (30 GB in fp32); a size that does not fit
the free space (or 2.2 times its bytes of available host memory: a host copy and the segment) is
skipped and says so. On the device: fp32 master + the sent copy; the worker's tensors beside.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch

import argparse  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maye_jax.models.hf_mapping import hf_layout_on_device, hf_views_on_host  # noqa: E402
from maye_jax.models.qwen_vl import build_model  # noqa: E402
from maye_jax.rollout.client import WorkerEngine  # noqa: E402
from maye_jax.rollout.shm import SHM_ROOT  # noqa: E402
from maye_jax.training.train_state import TrainableConfig, split_model  # noqa: E402

STAGES = ("prepare", "device_to_host", "shm_write", "worker_read", "worker_load")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3b,7b", help="comma-separated (tiny for a CPU check)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker_device", default="auto", help="auto: cuda on a GPU, else cpu")
    parser.add_argument("--baseline_bytes", type=int, default=0, help="0: 1 GiB (GPU), 16 MiB")
    parser.add_argument(
        "--shm_root",
        default=SHM_ROOT,
        help=f"where the segment lives ({SHM_ROOT}); 'auto': {SHM_ROOT}, or /tmp if too small",
    )
    parser.add_argument(
        "--host_path_sizes",
        default="3b,tiny",
        help="sizes at which the CPU-backend path (fp32, host transpose) is measured too",
    )
    parser.add_argument("--out", default="")
    return parser.parse_args(argv)


def device_get_baseline(num_bytes: int, repeats: int) -> dict:
    """GB/s of `jax.device_get` of one array; a new array each time (JAX caches host copies)."""
    x = jnp.zeros((num_bytes // 2,), jnp.bfloat16)
    bump = jax.jit(lambda v, i: v + i.astype(v.dtype))
    times = []
    for index in range(max(2, repeats) + 1):
        fresh = bump(x, jnp.int32(index)).block_until_ready()
        started = time.perf_counter()
        np.asarray(jax.device_get(fresh))
        if index:  # the first one is a warm-up
            times.append(time.perf_counter() - started)
        del fresh
    seconds = float(np.median(times))
    return dict(bytes=num_bytes, seconds=seconds, gbs=num_bytes / seconds / common.GB)


def llm_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Flax names and shapes of the trainable LLM tensors (no memory used)."""
    model = build_model(common.model_config(size), abstract=True)
    _, params, _ = split_model(model, TrainableConfig())
    return {name: tuple(value.shape) for name, value in params.items()}


def available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_weights(shapes: dict, seed: int) -> dict[str, jax.Array]:
    """Random fp32 master weights in the Flax layout, made on the device."""

    def init(key):
        keys = jax.random.split(key, len(shapes))
        return {
            name: 0.02 * jax.random.normal(k, shape, jnp.float32)
            for k, (name, shape) in zip(keys, shapes.items())
        }

    return jax.block_until_ready(jax.jit(init)(jax.random.key(seed)))


def make_prepare(dtype):
    """The trainer's device path (`hf_layout_on_device`: HF names, layouts and `dtype` in one
    jitted call), on weights refreshed first (`v + 0`, not timed) so that every call makes new
    arrays, as after an update, and no host copy cached by an earlier fetch is reused."""
    refresh = jax.jit(lambda weights: {n: v + 0 for n, v in weights.items()})
    name = jnp.dtype(dtype).name

    def prepare(weights, timed=None):
        fresh = jax.block_until_ready(refresh(weights))
        started = time.perf_counter()
        out = hf_layout_on_device(fresh, name)
        if timed is not None:
            timed.append(started)
        return out

    return prepare, refresh


def host_path(weights, refresh, args, root: str, repeats: int) -> dict:
    """The trainer's CPU-backend path on this device, for comparison: the fp32 master weights
    fetched to the host, kernels transposed while copied into the segment (`hf_views_on_host`),
    fp32 bytes sent, into a worker of its own (its segment holds fp32)."""
    engine = WorkerEngine(
        "null", engine_args={"device": args.worker_device_resolved}, timeout_s=900
    )
    engine.segment.root = root
    times = []
    try:
        for version in range(1, repeats + 2):
            fresh = jax.block_until_ready(refresh(weights))
            started = time.perf_counter()
            engine.sync_weights(hf_views_on_host(fresh), version=version)
            if version > 1:  # the first sync allocates the segment and the worker's tensors
                times.append(time.perf_counter() - started)
            del fresh
            gc.collect()
    finally:
        engine.close()
    return dict(seconds=float(np.median(times)), seconds_all=times)


def sync_size(size: str, args, baseline: dict) -> dict:
    dtype = jnp.dtype(args.dtype)
    shapes = llm_shapes(size)
    num_bytes = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    needed = num_bytes * 1.02 + 2**26
    root = args.shm_root
    if root == "auto":
        root = SHM_ROOT if shutil.disk_usage(SHM_ROOT).free >= needed else "/tmp"
    free_shm = shutil.disk_usage(root).free
    host = available_host_bytes()
    result = dict(size=size, dtype=args.dtype, tensors=len(shapes), bytes=num_bytes)
    result.update(segment_root=root, shm_free_bytes=free_shm, host_available_bytes=host)
    if root != SHM_ROOT:
        result["note"] = (
            f"{SHM_ROOT} has {shutil.disk_usage(SHM_ROOT).free / common.GB:.1f} GB free, too "
            f"small: the segment is a file in {root} (page cache of its file system, not tmpfs)"
        )
        common.log(f"NOTE {size}: {result['note']}")
    common.log(
        f"{size}: {len(shapes)} LLM tensors, {common.gb(num_bytes)} ({args.dtype}); "
        f"{root} free {free_shm / common.GB:.1f} GB, host available "
        f"{'n/a' if host is None else f'{host / common.GB:.1f} GB'}"
    )
    if free_shm < needed:
        result["skipped"] = (
            f"{root} has {free_shm / common.GB:.1f} GB free, the {size} weights need "
            f"{num_bytes / common.GB:.1f} GB: too small"
        )
    elif host is not None and host < 2.2 * num_bytes:
        result["skipped"] = (
            f"host memory available {host / common.GB:.1f} GB < 2.2 x the {size} weights "
            f"({num_bytes / common.GB:.1f} GB: a host copy and the segment)"
        )
    if "skipped" in result:
        common.log(f"SKIPPED {size}: {result['skipped']}")
        return result

    weights = make_weights(shapes, seed=0)
    prepare, refresh = make_prepare(dtype)
    device = args.worker_device
    if device == "auto":
        device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
    result["worker_device"] = args.worker_device_resolved = device
    engine = WorkerEngine("null", engine_args={"device": device}, timeout_s=900)
    engine.segment.root = root  # read when the first sync lays the segment out
    try:
        hf = jax.block_until_ready(prepare(weights))
        started = time.perf_counter()
        engine.sync_weights(hf, version=1)
        result["first_sync_seconds"] = time.perf_counter() - started
        del hf
        common.log(
            f"  first sync (allocates the segment and the worker's tensors): "
            f"{result['first_sync_seconds']:.2f} s"
        )
        stages = {name: [] for name in STAGES}
        stages.update(worker_total=[], staged_total=[], end_to_end=[])
        version = 1
        for _ in range(max(1, args.repeats)):
            # staged: each stage alone
            began = []
            hf = jax.block_until_ready(prepare(weights, began))
            stages["prepare"].append(time.perf_counter() - began[0])
            started = time.perf_counter()
            host_arrays = jax.device_get(hf)
            stages["device_to_host"].append(time.perf_counter() - started)
            del hf
            version += 1
            engine.sync_weights(host_arrays, version=version)
            parts = engine.last_sync
            stages["shm_write"].append(parts["write_seconds"])
            stages["worker_read"].append(parts["worker_read_seconds"])
            stages["worker_load"].append(parts["worker_load_seconds"])
            stages["worker_total"].append(parts["worker_seconds"])
            stages["staged_total"].append(
                stages["prepare"][-1] + stages["device_to_host"][-1] + parts["total_seconds"]
            )
            del host_arrays
            gc.collect()
            # end to end: what the trainer runs
            version += 1
            began = []
            hf = prepare(weights, began)
            engine.sync_weights(hf, version=version)
            stages["end_to_end"].append(time.perf_counter() - began[0])
            del hf
            gc.collect()
    finally:
        engine.close()
    fp32_bytes = sum(math.prod(s) for s in shapes.values()) * 4
    if size not in args.host_path_sizes.split(","):
        result["host_path"] = dict(skipped="not asked for (--host_path_sizes)")
    elif shutil.disk_usage(root).free < fp32_bytes * 1.02 + 2**26 or (
        host is not None and host < 2.2 * fp32_bytes
    ):
        result["host_path"] = dict(
            skipped=f"the fp32 segment and host copy ({common.gb(fp32_bytes)} each) do not fit"
        )
    else:
        try:
            result["host_path"] = host_path(weights, refresh, args, root, max(1, args.repeats))
        except Exception as error:  # noqa: BLE001 - recorded; the device path still stands
            result["host_path"] = dict(error=f"{type(error).__name__}: {error}"[:2000])
    del weights
    gc.collect()

    medians = {name: float(np.median(times)) for name, times in stages.items()}
    result["seconds"] = medians
    result["seconds_all"] = stages
    result["gbs"] = {name: num_bytes / s / common.GB for name, s in medians.items() if s > 0}
    result["end_to_end_over_device_get"] = (
        num_bytes / medians["end_to_end"] / common.GB / baseline["gbs"]
    )
    if "seconds" in result["host_path"]:
        result["host_path_over_end_to_end"] = result["host_path"]["seconds"] / medians["end_to_end"]
        common.log(
            f"  host path (fp32, host transpose) {common.secs(result['host_path']['seconds'])}: "
            f"the device path is {result['host_path_over_end_to_end']:.2f}x faster"
        )
    result["peak_bytes"] = common.peak_bytes()
    common.log(
        f"  end to end {common.secs(medians['end_to_end'])} = "
        f"{result['gbs']['end_to_end']:.2f} GB/s "
        f"({result['end_to_end_over_device_get']:.0%} of device_get)"
    )
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    report = common.Report(args.out, "gpu_sync", args)
    baseline_bytes = args.baseline_bytes or (
        common.GIB if jax.devices()[0].platform == "gpu" else 16 * 2**20
    )
    baseline = device_get_baseline(baseline_bytes, args.repeats)
    report.set("baseline_device_get", baseline)
    common.log(
        f"baseline: device_get of one {baseline_bytes / 2**20:.0f} MiB array at "
        f"{baseline['gbs']:.2f} GB/s"
    )
    results = {}
    for size in args.sizes.split(","):
        try:
            results[size] = sync_size(size, args, baseline)
        except Exception as error:  # noqa: BLE001 - recorded; the next size still runs
            results[size] = dict(size=size, error=f"{type(error).__name__}: {error}"[:3000])
            common.log(f"FAILED {size}: {results[size]['error']}")
        report.set("sizes", results)
    report.finish()

    table = [
        ("device", report.data["environment"]["device_kind"]),
        ("device_get baseline", f"{baseline['gbs']:.2f} GB/s ({baseline_bytes / 2**20:.0f} MiB)"),
    ]
    for size, r in results.items():
        if "seconds" not in r:
            table.append((size, r.get("skipped") or r.get("error", "no result")))
            continue
        s, rate = r["seconds"], r["gbs"]
        table.append(
            (
                f"{size} ({common.gb(r['bytes'])} {r['dtype']})",
                f"end to end {common.secs(s['end_to_end'])} = {rate['end_to_end']:.2f} GB/s "
                f"({r['end_to_end_over_device_get']:.0%} of device_get)"
                + ("; goal < 3 s: " + ("met" if s["end_to_end"] < 3 else "MISSED"))
                * size.endswith("7b"),
            )
        )
        for stage in (*STAGES, "staged_total"):
            table.append((f"  {stage}", f"{common.secs(s[stage])}, {rate.get(stage, 0):.2f} GB/s"))
        host = r.get("host_path", {})
        table.append(
            (
                "  host path (fp32)",
                f"{common.secs(host['seconds'])}: end to end is "
                f"{r['host_path_over_end_to_end']:.2f}x faster"
                if "seconds" in host
                else host.get("skipped") or host.get("error", "not measured"),
            )
        )
    common.print_table("weight sync: JAX device arrays -> shm -> torch worker", table)
    failed = any("error" in r for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
