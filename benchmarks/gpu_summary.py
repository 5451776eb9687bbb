"""The key figures of the GPU benchmarks' JSON files, one block per file (issue 7).

    python benchmarks/gpu_summary.py DIR          # e.g. the ${OUT:-/tmp/gpu_bench} of gpu_all.sh

Reads only the JSON files (no JAX); a benchmark cut short shows what it measured ("complete"
False).
"""

from __future__ import annotations

import glob
import json
import os
import sys

GIB = 1024**3


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


def _update(data: dict) -> list[str]:
    lines = []
    if "update" in data:
        u = data["update"]
        lines.append(
            f"tokens/s {u['tokens_per_second']:,.0f}, MFU {u['mfu']:.1%} (vs measured matmul "
            f"{data['baseline_matmul']['tflops']:.1f} TFLOP/s), {u['seconds_per_update']:.3f} s "
            f"per update of {u['tokens_per_update']} tokens, peak {_gib(u['peak_bytes'])}"
        )
    if "vision_tower" in data:
        t = data["vision_tower"]
        lines.append(f"vision tower: {t['seconds'] * 1e3:.1f} ms for {t['images']} images")
    if "compile" in data:
        lines.append(f"step peak estimate {_gib(data['compile'].get('peak_estimate_bytes'))}")
    if "memory_estimate" in data:
        e = data["memory_estimate"]
        lines.append(f"memory estimate: resident {_gib(e['resident_estimate_bytes'])}")
    for name, r in data.get("fit", {}).items():
        verdict = "ran" if r.get("ran") else (r.get("error") or r.get("why_not_run", ""))[:120]
        lines.append(
            f"fit {name}: estimate {_gib(r.get('resident_estimate_bytes'))}, fits H200 "
            f"{r.get('fits_h200_estimate')}, {verdict}, peak {_gib(r.get('peak_bytes'))}"
        )
    return lines


def _error(name, record: dict) -> str:
    return f"{name}: {record['type']}{' (out of memory)' * record['out_of_memory']}"


def _logprobs(data: dict) -> list[str]:
    return [
        _error(f"chunk {r['chunk']}", r["error"])
        if "error" in r
        else f"chunk {r['chunk']}: {r['tokens_per_second']:,.0f} tok/s, "
        f"{r['fraction_of_matmul']:.1%} of matmul, pass peak est. "
        f"{_gib(r['memory_estimate']['policy'].get('peak_estimate_bytes'))}, device peak so far "
        f"{_gib(r['peak_bytes_so_far'])}"
        for r in data.get("chunks", [])
    ]


def _sampler(data: dict) -> list[str]:
    return [
        _error(r["case"], r["error"])
        if "error" in r
        else f"{r['case']}: {r['tokens_per_second']:,.0f} tok/s ({r['tokens']} tokens, "
        f"{r['seconds']:.2f} s), {r['fraction_of_roofline']:.1%} of roofline, "
        f"recompiled {r['recompiled']}"
        for r in data.get("cases", [])
    ]


def _sync(data: dict) -> list[str]:
    lines = []
    if "baseline_device_get" in data:
        lines.append(f"device_get baseline {data['baseline_device_get']['gbs']:.2f} GB/s")
    for size, r in data.get("sizes", {}).items():
        if "seconds" not in r:
            lines.append(f"{size}: {r.get('skipped') or r.get('error')}"[:200])
            continue
        stages = ", ".join(f"{k} {v:.3f} s" for k, v in r["seconds"].items())
        lines.append(
            f"{size}: end to end {r['seconds']['end_to_end']:.3f} s = "
            f"{r['gbs']['end_to_end']:.2f} GB/s; {stages}"
        )
    return lines


SUMMARIES = dict(gpu_update=_update, gpu_logprobs=_logprobs, gpu_sampler=_sampler, gpu_sync=_sync)


def summarize(directory: str) -> str:
    blocks = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        try:
            with open(path) as file:
                data = json.load(file)
            summary = SUMMARIES.get(data.get("benchmark"), lambda d: [])
            lines = summary(data)
        except (OSError, ValueError, KeyError, TypeError) as error:
            blocks.append(f"{os.path.basename(path)}: unreadable ({error!r})")
            continue
        env = data.get("environment", {})
        head = (
            f"{os.path.basename(path)} [{env.get('device_kind')}, complete {data.get('complete')}]"
        )
        if "error" in data:
            lines.append(_error("failed", data["error"]) + f": {data['error']['message'][:300]}")
        blocks.append("\n".join([head] + [f"  {line}" for line in lines]))
    return "\n".join(blocks) if blocks else f"no JSON files in {directory}"


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_bench"))
