"""Where the time of a `jax.profiler.trace` went: self time per XLA op, grouped into categories
(benchmarks/gpu_update.py prints it after its table, so the profile that explains the MFU is in
the run's output, not only in the trace files)."""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys

OP_CATEGORIES = (  # first match wins; names are XLA op / kernel names, lower-cased
    ("matmul", ("gemm", "cublas", "cutlass", "dot", "matmul", "conv", "ynn_fusion")),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "nccl")),
    ("copy / layout", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice", "pad")),
    ("other fusion", ("fusion",)),
)
CONTAINER_EVENTS = ("ThunkExecutor::Execute",)  # host-side wrappers around the ops


def _op_category(name: str) -> str:
    lower = name.lower()
    for category, needles in OP_CATEGORIES:
        if any(needle in lower for needle in needles):
            return category
    return "other"


def summarize_trace(directory: str, top: int = 15) -> dict:
    """Where the device time of a `jax.profiler.trace` went: self time (time not spent in a
    nested event) summed per op name, over the device's "XLA Ops" lines (GPU: one event per
    HLO op), else its stream lines (kernels), else any of its lines, else, without a device
    (CPU), the XLA threads of the host. Returns {source, file, wall_seconds, busy_seconds,
    categories, top_ops}."""
    paths = []
    for pattern in ("*.trace.json.gz", "perfetto_trace.json.gz"):
        paths = paths or sorted(glob.glob(os.path.join(directory, "**", pattern), recursive=True))
    if not paths:
        return dict(error=f"no *.trace.json.gz or perfetto_trace.json.gz under {directory}")
    with gzip.open(paths[-1]) as file:
        events = json.load(file).get("traceEvents", [])
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") == "M" and event.get("name") == "process_name":
            processes[event["pid"]] = event["args"]["name"]
        if event.get("ph") == "M" and event.get("name") == "thread_name":
            threads[(event["pid"], event["tid"])] = event["args"]["name"]
    device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}

    def lines_where(keep):
        return {key for key, name in threads.items() if keep(key[0], name)}

    choices = (
        ("device XLA ops", lines_where(lambda pid, n: pid in device_pids and "XLA Ops" in n)),
        ("device streams", lines_where(lambda pid, n: pid in device_pids and "Stream" in n)),
        ("device lines", lines_where(lambda pid, n: pid in device_pids)),
        ("host XLA threads", lines_where(lambda pid, n: n.startswith("tf_XLA"))),
    )
    source, lines = next(((s, keys) for s, keys in choices if keys), ("none", set()))
    by_line: dict = {}
    for event in events:
        key = (event.get("pid"), event.get("tid"))
        if (
            event.get("ph") == "X"
            and key in lines
            and not str(event.get("name")).startswith(CONTAINER_EVENTS)
        ):
            by_line.setdefault(key, []).append(event)
    self_time: dict[str, float] = {}
    start, end = float("inf"), 0.0
    for line_events in by_line.values():
        line_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list] = []  # [end, name, child time]
        for event in line_events:
            begin, duration = float(event["ts"]), float(event.get("dur", 0))
            start, end = min(start, begin), max(end, begin + duration)
            while stack and stack[-1][0] <= begin:
                _close(stack.pop(), self_time)
            if stack:
                stack[-1][2] += duration
            stack.append([begin + duration, event["name"], 0.0, duration])
        while stack:
            _close(stack.pop(), self_time)
    busy = sum(self_time.values())
    categories: dict[str, float] = {}
    for name, micros in self_time.items():
        category = _op_category(name)
        categories[category] = categories.get(category, 0.0) + micros
    ranked = sorted(self_time.items(), key=lambda item: -item[1])[:top]
    return dict(
        source=source,
        file=paths[-1],
        wall_seconds=max(0.0, end - start) / 1e6,
        busy_seconds=busy / 1e6,
        categories={k: v / 1e6 for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        top_ops=[dict(name=n, seconds=t / 1e6, share=t / max(busy, 1e-9)) for n, t in ranked],
    )


def _close(entry: list, self_time: dict[str, float]) -> None:
    _, name, children, duration = entry
    self_time[name] = self_time.get(name, 0.0) + max(0.0, duration - children)


def print_trace_summary(summary: dict) -> None:
    if "error" in summary:
        print(f"trace: {summary['error']}")
        return
    print(
        f"trace ({summary['source']}): busy {summary['busy_seconds']:.3f} s of "
        f"{summary['wall_seconds']:.3f} s between the first and last op"
    )
    busy = max(summary["busy_seconds"], 1e-12)
    for category, seconds in summary["categories"].items():
        print(f"  {category:<16} {seconds:9.4f} s {seconds / busy:6.1%}")
    for op in summary["top_ops"]:
        print(f"    {op['share']:6.1%} {op['seconds']:9.4f} s  {op['name'][:90]}")
    sys.stdout.flush()
