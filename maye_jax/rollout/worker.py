"""The torch-side rollout worker: `python -m maye_jax.rollout.worker --backend hf|vllm --model DIR`.

It runs in its own process, usually in its own virtual environment (vLLM pins its own torch and
transformers), with the project on PYTHONPATH; it imports no JAX. The trainer starts it through
`client.WorkerEngine`, which passes one end of a socket pair as `--fd` and chooses its devices
through the environment (e.g. CUDA_VISIBLE_DEVICES=7 while the trainer uses 0-6). Messages follow
protocol.py; weights arrive through the shared-memory segment of shm.py.

Backends (same protocol, same outputs; logprobs as SPEC §3 defines them):
- `hf`: transformers `generate` with our own seeded sampler (hf_backend.py);
- `vllm`: an offline vllm.LLM engine (vllm_backend.py);
- `null`: maps and verifies weights only (benchmarks, protocol tests; below).

After each sync the worker checks that the engine holds the new values of the RMSNorm weights in
the segment (they are stored unchanged by both engines), so a load that silently did nothing is
an error, not a stale rollout.

Multi-host: shared memory is host-local. A worker serves the trainer process on its own host: in
a multi-host run, each host that runs a worker has its local trainer process gather the trainable
parameters to its host memory (replicated, e.g. `multihost_utils.process_allgather` of the HF
arrays, or a fully replicated sharding before `device_get`) and write its own segment; workers
never read weights across hosts. A setup with rollouts on one host only needs the gather on that
host's process alone; the other hosts skip `sync_weights`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from maye_jax.rollout import protocol
from maye_jax.rollout.backend_common import is_norm_weight, log, torch_view
from maye_jax.rollout.shm import SegmentError, SegmentReader, SegmentView


class NullBackend:
    """Maps and verifies weights only (benchmarks, protocol tests). With `device` (engine args
    `{"device": "cuda"}`), it also copies every tensor into a torch tensor of its own on that
    device, allocated on the first sync and overwritten by later ones, as an engine's weight
    load would (benchmarks/gpu_sync.py)."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.values: dict[str, Any] = {}

    def load_weights(self, view: SegmentView) -> None:
        views = {name: torch_view(a, view.dtypes[name]) for name, a in view.tensors.items()}
        if self.device is None:
            self.values = views
            return
        import torch

        for name, source in views.items():
            target = self.values.get(name)
            if target is None or target.shape != source.shape or target.dtype != source.dtype:
                target = self.values[name] = torch.empty_like(source, device=self.device)
            target.copy_(source)
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def engine_values(self, names):
        return {
            name: self.values[name].float().cpu().numpy() for name in names if name in self.values
        }

    def close(self) -> None:
        self.values = {}


# ---------------------------------------------------------------------------------------------
# The request loop


class Worker:
    def __init__(self, backend, backend_name: str):
        self.backend = backend
        self.backend_name = backend_name
        self.reader = SegmentReader()
        self.version: int | None = None
        self.segment_directory: str | None = None

    def handle(self, header: dict, buffers: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
        op = header["op"]
        if op == "sync":
            return self.sync(header), []
        if op in ("generate", "score") and header.get("version") != self.version:
            raise RuntimeError(
                f"{op} asks for weights version {header.get('version')}, worker holds {self.version}"
            )
        if op == "generate":
            prompts = [protocol.decode_prompt(p, buffers) for p in header["prompts"]]
            sampling = protocol.decode_sampling(header["sampling"])
            completions = self.backend.generate(
                prompts, sampling, int(header["step"]), int(header.get("first_index", 0))
            )
            out = protocol.BufferList()
            encoded = [
                [
                    dict(
                        tokens=out.add(np.asarray(c.token_ids, np.int32), "int32"),
                        logprobs=out.add(np.asarray(c.logprobs, np.float32), "float32"),
                        text=c.text,
                        finish_reason=c.finish_reason,
                    )
                    for c in row
                ]
                for row in completions
            ]
            stats = dict(getattr(self.backend, "last_stats", {}))  # engine calls, cached tokens
            reply = dict(ok=True, version=self.version, completions=encoded, stats=stats)
            return reply, out.arrays
        if op == "score":
            items = [
                (protocol.decode_prompt(item, buffers), buffers[item["response"]])
                for item in header["items"]
            ]
            scores = self.backend.score(items, float(header["temperature"]))
            return dict(ok=True, version=self.version, logprobs=list(range(len(scores)))), scores
        raise ValueError(f"unknown op {op!r}")

    def sync(self, header: dict) -> dict:
        started = time.perf_counter()
        self.segment_directory = os.path.dirname(header["path"])
        view = self.reader.read(header["path"], int(header["version"]), header["checksum"])
        read_seconds = time.perf_counter() - started
        if self.backend_name == "vllm":  # it may read the segment directory itself
            self.backend.load_weights(view, self.segment_directory)
        else:
            self.backend.load_weights(view)
        load_seconds = time.perf_counter() - started - read_seconds
        probes = [name for name in view.tensors if is_norm_weight(name)]
        engine = self.backend.engine_values(probes)
        stale = [
            name
            for name in probes
            if name not in engine
            or not np.array_equal(engine[name], _as_float32(view.tensors[name], view.dtypes[name]))
        ]
        if stale:
            raise SegmentError(f"engine does not hold version {view.version} of {stale[:5]}")
        del view
        self.version = int(header["version"])
        return dict(
            ok=True,
            version=self.version,
            checksum=header["checksum"],
            num_tensors=int(header["num_tensors"]),
            probed=len(probes),
            seconds=time.perf_counter() - started,
            read_seconds=read_seconds,  # map + checksum + views of the segment
            load_seconds=load_seconds,  # the engine's copy into its own tensors
        )

    def close(self) -> None:
        self.reader.close()
        self.backend.close()


def _as_float32(array: np.ndarray, safetensors_dtype: str) -> np.ndarray:
    if safetensors_dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def _set_parent_death_signal() -> None:
    """Linux: SIGTERM this worker when the trainer process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def parse_cpus(spec: str) -> set[int]:
    """ "1", "0,2", "2-3" -> the CPU ids."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def make_backend(name: str, model_dir: str, dtype: str, engine_args: dict, max_batch_rows: int):
    if name == "hf":
        from maye_jax.rollout.hf_backend import HFBackend

        return HFBackend(model_dir, dtype, max_batch_rows)
    if name == "vllm":
        from maye_jax.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, dtype, engine_args)
    if name == "null":
        return NullBackend(**engine_args)
    raise ValueError(f"unknown backend {name!r}")


class Leftovers:
    """What this worker removes when it ends without the trainer's goodbye: the weight segment
    (the trainer named it at start, so even a trainer killed before the first sync is
    covered) and, when the trainer is gone (killed: the kernel sent SIGTERM), the log folder
    the trainer made for it. Idempotent; runs from the SIGTERM handler and at exit, so a
    signal arriving during the exit's cleanup still completes it."""

    def __init__(self, parent_pid: int | None, segment_dir: str | None, log_dir: str | None):
        self.parent_pid = parent_pid
        self.segment_dir = segment_dir
        self.log_dir = log_dir
        self.shutdown_requested = False  # the trainer said goodbye: it removes its own files
        # The trainer's end of the socket closed without a goodbye. A dying process closes its
        # files before its children are handed to a new parent, so this can come first.
        self.connection_closed = False

    def trainer_gone(self) -> bool:
        reparented = self.parent_pid is not None and os.getppid() != self.parent_pid
        return reparented or self.connection_closed

    def wait_for_trainer_exit(self, sock: socket.socket | None, seconds: float) -> None:
        """After a SIGTERM: the kernel sends it when the thread that started this worker ends,
        which in a process being killed can be before the process is gone (and this worker
        handed to a new parent). Waits until it is gone, or `seconds` (a live trainer that
        stops this worker on purpose removes the folders itself)."""
        deadline = time.monotonic() + seconds
        while not self.trainer_gone() and time.monotonic() < deadline:
            if sock is not None and _peer_closed(sock):
                self.connection_closed = True
                return
            time.sleep(0.02)

    def remove(self, segment_directory: str | None = None) -> None:
        from maye_jax.rollout.shm import remove_segment_directory

        if not self.shutdown_requested:
            for directory in {self.segment_dir, segment_directory} - {None}:
                remove_segment_directory(directory)
        if self.log_dir and self.trainer_gone():
            remove_segment_directory(self.log_dir)


def _peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("hf", "vllm", "null"), required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the trainer")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--engine-args", default="{}", help="JSON: extra vllm.LLM arguments")
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--cpus", default="", help="pin to these CPUs, e.g. 1 or 2-3")
    parser.add_argument("--parent-pid", type=int, default=None, help="the trainer's pid")
    parser.add_argument("--segment-dir", default=None, help="removed if the trainer dies")
    parser.add_argument("--log-dir", default=None, help="removed if the trainer dies")
    args = parser.parse_args(argv)
    leftovers = Leftovers(args.parent_pid, args.segment_dir, args.log_dir)
    worker, sock = None, None

    def on_sigterm(signum, frame):
        leftovers.wait_for_trainer_exit(sock, seconds=2.0)
        leftovers.remove(worker.segment_directory if worker is not None else None)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    _set_parent_death_signal()
    if args.cpus:  # before torch starts its thread pools
        os.sched_setaffinity(0, parse_cpus(args.cpus))
    if leftovers.trainer_gone():  # it died before the death signal was armed
        leftovers.remove()
        return 143
    sock = socket.socket(fileno=args.fd)
    sock.set_inheritable(False)  # engine subprocesses must not keep the trainer's socket open
    try:
        started = time.perf_counter()
        backend = make_backend(
            args.backend, args.model, args.dtype, json.loads(args.engine_args), args.max_batch_rows
        )
        worker = Worker(backend, args.backend)
        log(f"{args.backend} backend ready in {time.perf_counter() - started:.1f} s")
        protocol.send_message(
            sock, dict(ok=True, op="ready", backend=args.backend, model=args.model, pid=os.getpid())
        )
        while True:
            try:
                header, buffers = protocol.recv_message(sock)
            except protocol.ConnectionClosed:
                log("trainer closed the connection")
                leftovers.connection_closed = True
                break
            if header.get("op") == "shutdown":
                leftovers.shutdown_requested = True
                protocol.send_message(sock, dict(ok=True))
                break
            try:
                reply, out = worker.handle(header, buffers)
            except Exception as error:  # reported to the trainer, which raises it
                log(f"{header.get('op')} failed: {error!r}")
                traceback.print_exc()
                reply, out = dict(ok=False, error=repr(error), traceback=traceback.format_exc()), []
            protocol.send_message(sock, reply, out)
    except Exception as error:
        log(f"fatal: {error!r}")
        traceback.print_exc()
        try:
            protocol.send_message(
                sock, dict(ok=False, error=repr(error), traceback=traceback.format_exc())
            )
        except OSError:
            pass
        return 1
    finally:
        # the trainer unlinks its segment; if it vanished without saying goodbye, do it here
        leftovers.remove(worker.segment_directory if worker is not None else None)
        if worker is not None:
            worker.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
