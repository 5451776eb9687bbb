"""The trainer's side of the rollout worker: `WorkerEngine`, a RolloutEngine in another process.

    engine = WorkerEngine("vllm", model_dir, python=".venv-vllm/bin/python",
                          env={"VLLM_CPU_KVCACHE_SPACE": "1"}, devices="7")
    engine.sync_weights(named_hf_arrays, version=step)      # -> checksum the worker verified
    completions = engine.generate(prompts, Sampling(n=1, temperature=1.0), step=step)
    engine.close()

The worker (worker.py) is started with `python -m maye_jax.rollout.worker` in its own process
group, with the project on PYTHONPATH, its stdout and stderr going to a log file, and one end of
a socket pair as its channel (protocol.py). Weights go through one shared-memory segment
(shm.py) that is allocated on the first sync and rewritten in place afterwards; the frozen
tensors (`frozen_names` exactly, when given; else those under `frozen_prefixes`, the vision
tower) are written by the first sync only.

A generation can also run while the trainer works (`submit_generate`, then `.result()` of the
returned `PendingGeneration`): the worker answers one request at a time, so while one is in
flight any other request (a sync, a score) is refused rather than queued behind it.

The vLLM worker preloads tcmalloc when one is installed (`find_tcmalloc`): vLLM's CPU backend
asks for it in LD_PRELOAD, and without it every step page-faults on fresh allocations. `cpus`
pins the worker (and vLLM's OpenMP threads) to those CPUs, e.g. one core of two while the
trainer holds the other.

Failures are raised here, never swallowed: the worker exiting or being killed
(WorkerDiedError), not answering within `timeout_s` (WorkerTimeoutError, the worker is killed),
an engine error (WorkerRequestError, with the worker's traceback), or a sync whose version or
checksum does not come back as sent (SyncError). Each message carries the last lines of the
worker's log. Generation requests name the weights version the trainer last synced; the worker
refuses any other, so a rollout can never silently use stale weights. The segment is unlinked
and the worker stopped on `close()`, at interpreter exit and on SIGTERM.

Nothing outlives the run: a worker whose trainer was killed (SIGKILL; it gets SIGTERM from the
kernel) removes the segment and its log folder (`/tmp/maye-worker-<trainer pid>-*`) itself; a
worker that cannot be started (WorkerStartError, e.g. a wrong `python`) leaves no socket or
folder; and what a SIGKILL of both leaves is removed when the next worker engine starts (only
folders of these names whose process is gone).

This module imports no JAX: `sync_weights` takes any mapping of HF names to arrays that
`numpy.asarray` accepts (JAX arrays are fetched one at a time while being written).

Over ~500 lines on purpose: the worker's life (start, requests, timeouts, its log, shutdown)
is one protocol, read and changed together.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maye_jax import checkout
from maye_jax.checkout import env_with_checkout
from maye_jax.rollout import protocol
from maye_jax.rollout.engine import Completion, Prompt, Sampling
from maye_jax.rollout.shm import (
    FROZEN_PREFIXES,
    WeightSegment,
    cleanup_stale_segments,
    register_cleanup,
    unregister_cleanup,
)
from maye_jax.rollout.stale import remove_stale_folders

POLL_SECONDS = 0.2


class WorkerError(RuntimeError):
    """A rollout worker failed; the message ends with the worker's last log lines."""


class WorkerDiedError(WorkerError):
    pass


class WorkerTimeoutError(WorkerError):
    pass


class WorkerRequestError(WorkerError):
    pass


class SyncError(WorkerError):
    pass


class WorkerStartError(WorkerError):
    pass


LOG_DIR_PREFIX = "maye-worker-"


def remove_stale_worker_folders() -> list[str]:
    """Log folders and segments whose trainer process is gone (a SIGKILL of trainer and worker
    alike); returns what was removed."""
    return remove_stale_folders(tempfile.gettempdir(), LOG_DIR_PREFIX) + cleanup_stale_segments()


class WorkerEngine:
    """A rollout engine (`hf` or `vllm` backend) running in a worker process."""

    def __init__(
        self,
        backend: str = "hf",
        model_dir: str | os.PathLike = "",
        *,
        python: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        devices: str | Sequence[int] | None = None,
        dtype: str = "float32",
        engine_args: Mapping[str, Any] | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        timeout_s: float = 600.0,
        start_timeout_s: float = 900.0,
        frozen_prefixes: Iterable[str] = FROZEN_PREFIXES,
        frozen_names: Iterable[str] | None = None,
        frozen_params: Iterable[str] = (),
        max_batch_rows: int = 64,
        max_num_batched_tokens: int | None = None,
        images_per_prompt: int = 1,
        cpus: str | None = None,
        log_lines: int = 40,
    ):
        import json

        self.backend = backend
        self.dtype = dtype
        self.frozen_params = frozenset(frozen_params)  # Flax names, for `load_policy`
        self.timeout_s = timeout_s
        self.log_lines = log_lines
        self.version: int | None = None
        self.last_sync: dict[str, float] = {}
        self.last_generate: dict[str, float] = {}  # the backend's stats of the last generate
        self._pending: PendingGeneration | None = None
        self._frozen_sent = False
        self._closed = False
        self._proc: subprocess.Popen | None = None
        self.segment = (
            WeightSegment(frozen_prefixes)
            if frozen_names is None
            else WeightSegment(frozen_prefixes=(), frozen_names=frozen_names)
        )
        remove_stale_worker_folders()
        self._log_dir = tempfile.mkdtemp(prefix=f"{LOG_DIR_PREFIX}{os.getpid()}-")
        self.log_path = os.path.join(self._log_dir, "worker.log")

        child_env = env_with_checkout({**os.environ, **(env or {})})
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        if devices is not None:
            if not isinstance(devices, str):
                devices = ",".join(str(d) for d in devices)
            child_env["CUDA_VISIBLE_DEVICES"] = devices
        engine_args = dict(engine_args or {})
        if backend == "vllm":  # shorthands for the vllm.LLM arguments every run sets
            for name, value in (
                ("gpu_memory_utilization", gpu_memory_utilization),
                ("max_model_len", max_model_len),
                ("max_num_batched_tokens", max_num_batched_tokens),
            ):
                if value is not None:
                    engine_args.setdefault(name, value)
            # vLLM refuses a prompt with more images than this limit (and sizes its profiling
            # run by it): the most images one record of the run's data holds
            engine_args.setdefault(
                "limit_mm_per_prompt", {"image": max(1, images_per_prompt), "video": 0}
            )
            child_env = vllm_worker_env(child_env, python or sys.executable, cpus)
        self._sock, child_sock = socket.socketpair()
        command = [
            str(python or sys.executable),
            "-m",
            "maye_jax.rollout.worker",
            f"--backend={backend}",
            f"--model={model_dir}",
            f"--fd={child_sock.fileno()}",
            f"--dtype={dtype}",
            f"--engine-args={json.dumps(engine_args)}",
            f"--max-batch-rows={max_batch_rows}",
            # what the worker removes if this process dies without closing it
            f"--parent-pid={os.getpid()}",
            f"--segment-dir={self.segment.directory}",
            f"--log-dir={self._log_dir}",
        ] + ([f"--cpus={cpus}"] if cpus else [])
        self._cleanup_token = register_cleanup(self._terminate)
        try:
            with open(self.log_path, "wb") as log_file:
                self._proc = subprocess.Popen(
                    command,
                    pass_fds=(child_sock.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    cwd=str(checkout.ROOT),
                    start_new_session=True,  # its own group: close() reaches engine children
                )
        except (OSError, subprocess.SubprocessError) as error:
            child_sock.close()
            self._terminate()
            raise WorkerStartError(
                f"{backend} worker could not be started with {command[0]!r}: {error}"
            ) from error
        child_sock.close()
        try:
            self.info = self._receive(start_timeout_s, "start")
        except BaseException:
            self._terminate()
            raise

    # -- RolloutEngine ------------------------------------------------------------------------

    def load_policy(self, model, version: int) -> None:
        """Samples from `model` (a Flax module) from now on: its parameters in HF names and
        layout, in the worker's dtype, through `sync_weights`; the frozen ones (`frozen_params`,
        Flax names) with the first sync only. (The run's `Rollouts` loads a version once.)"""
        from maye_jax.models.hf_mapping import flax_param_paths, hf_tensors_for_sync

        names = set(flax_param_paths(model))
        if self._frozen_sent:
            names -= self.frozen_params
        arrays = hf_tensors_for_sync(model, names, dtype=self.dtype)
        self.sync_weights(arrays, version)

    def sync_weights(self, named_hf_arrays: Mapping[str, Any] | Iterable, version: int) -> str:
        """Writes the weights into the segment and has the worker load them; returns the
        checksum both sides computed. The first call must hold every tensor; later calls
        need only the trainable ones (frozen tensors in them are skipped, never fetched)."""
        started = time.perf_counter()
        arrays = named_hf_arrays if isinstance(named_hf_arrays, Mapping) else dict(named_hf_arrays)
        record = self.segment.write(arrays, int(version), include_frozen=not self._frozen_sent)
        reply, _ = self._request(
            dict(
                op="sync",
                path=record.path,
                version=record.version,
                checksum=record.checksum,
                data_bytes=record.data_bytes,
                num_tensors=record.num_tensors,
            ),
            [],
            f"sync of version {version}",
        )
        if reply.get("version") != record.version or reply.get("checksum") != record.checksum:
            raise SyncError(
                self._with_log(
                    f"worker reported version {reply.get('version')} / checksum "
                    f"{reply.get('checksum')}, trainer wrote {record.version} / {record.checksum}"
                )
            )
        self._frozen_sent = self._frozen_sent or record.includes_frozen
        self.version = record.version
        self.last_sync = dict(
            write_seconds=record.write_seconds,
            worker_seconds=float(reply.get("seconds", 0.0)),
            worker_read_seconds=float(reply.get("read_seconds", 0.0)),
            worker_load_seconds=float(reply.get("load_seconds", 0.0)),
            total_seconds=time.perf_counter() - started,
            bytes=float(record.data_bytes),
            tensors=float(record.num_tensors),
        )
        return record.checksum

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, *, step: int = 0, first_index: int = 0
    ) -> list[list[Completion]]:
        return self.submit_generate(prompts, sampling, step=step, first_index=first_index).result()

    def submit_generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, *, step: int = 0, first_index: int = 0
    ) -> PendingGeneration:
        """Sends a generate request with the weights version last synced and returns at once;
        `.result()` waits for the completions (each records that version)."""
        buffers = protocol.BufferList()
        header = dict(
            op="generate",
            version=self.version,
            step=int(step),
            first_index=int(first_index),
            sampling=protocol.encode_sampling(sampling),
            prompts=[protocol.encode_prompt(prompt, buffers) for prompt in prompts],
        )
        what = f"generate (step {step})"
        self._send(header, buffers.arrays, what)
        self._pending = PendingGeneration(self, what, time.monotonic() + self.timeout_s)
        return self._pending

    def _finish_generate(self, pending: PendingGeneration) -> list[list[Completion]]:
        try:
            reply, arrays = self._receive(
                max(pending.deadline - time.monotonic(), 0.0), pending.what, with_buffers=True
            )
        finally:
            self._pending = None
        self.last_generate = dict(reply.get("stats", {}))
        version = reply.get("version")
        return [
            [
                Completion(
                    token_ids=arrays[c["tokens"]].tolist(),
                    logprobs=arrays[c["logprobs"]].tolist(),
                    text=c["text"],
                    finish_reason=c["finish_reason"],
                    weights_version=version,
                )
                for c in row
            ]
            for row in reply["completions"]
        ]

    @property
    def in_flight(self) -> bool:
        """True while a submitted generation has not been collected."""
        return self._pending is not None

    def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[Sequence[int]],
        temperature: float = 1.0,
    ) -> list[np.ndarray]:
        """Teacher forcing: per prompt, log_softmax(logits / T) of each given response token."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        buffers = protocol.BufferList()
        items = []
        for prompt, response in zip(prompts, responses):
            item = protocol.encode_prompt(prompt, buffers)
            item["response"] = buffers.add(np.asarray(response).reshape(-1), "int32")
            items.append(item)
        header = dict(op="score", version=self.version, temperature=float(temperature), items=items)
        reply, arrays = self._request(header, buffers.arrays, "score")
        return [arrays[index] for index in reply["logprobs"]]

    def close(self) -> None:
        """Stops the worker (politely, then by force) and unlinks the segment."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    protocol.send_message(self._sock, dict(op="shutdown"))
                    self._receive(30.0, "shutdown")
                    self._proc.wait(timeout=30.0)
                except (WorkerError, OSError, subprocess.TimeoutExpired):
                    pass
        finally:
            self._terminate()

    def __enter__(self) -> WorkerEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- internals ----------------------------------------------------------------------------

    def _terminate(self, force: bool = False) -> None:
        """Stops the worker's process group if it still runs (SIGTERM, or SIGKILL when `force`
        or after 10 s); unlinks the segment; idempotent."""
        self._closed = True
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc.pid, signal.SIGKILL if force else signal.SIGTERM)
            try:
                self._proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                _signal_group(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)  # engine children left behind, if any
        self.segment.close()
        try:
            self._sock.close()
        except OSError:
            pass
        shutil.rmtree(self._log_dir, ignore_errors=True)
        unregister_cleanup(self._cleanup_token)

    def _request(self, header: dict, buffers: list, what: str) -> tuple[dict, list]:
        self._send(header, buffers, what)
        reply, arrays = self._receive(self.timeout_s, what, with_buffers=True)
        return reply, arrays

    def _send(self, header: dict, buffers: list, what: str) -> None:
        if self._closed:
            raise WorkerError(f"{what}: the worker engine is closed")
        if self._pending is not None:
            raise WorkerError(
                f"{what}: {self._pending.what} is still in flight; collect its result first"
            )
        try:
            protocol.send_message(self._sock, header, buffers)
        except OSError as error:
            self._raise_dead(what, error)

    def _receive(self, timeout_s: float, what: str, with_buffers: bool = False):
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = self._log_tail()
                self._terminate(force=True)
                raise WorkerTimeoutError(
                    f"{self.backend} worker gave no answer to {what} within {timeout_s:.0f} s "
                    f"(killed)\n--- last worker log lines ---\n{tail}"
                )
            readable, _, _ = select.select([self._sock], [], [], min(POLL_SECONDS, remaining))
            if readable:
                self._sock.settimeout(max(remaining, 1.0))
                try:
                    reply, arrays = protocol.recv_message(self._sock)
                except (protocol.ConnectionClosed, OSError) as error:
                    self._raise_dead(what, error)
                finally:
                    try:
                        self._sock.settimeout(None)
                    except OSError:
                        pass
                if not reply.get("ok", False):
                    raise WorkerRequestError(
                        self._with_log(
                            f"{self.backend} worker failed during {what}: {reply.get('error')}\n"
                            f"{reply.get('traceback', '')}"
                        )
                    )
                return (reply, arrays) if with_buffers else reply
            if self._proc.poll() is not None:
                self._raise_dead(what, None)

    def _raise_dead(self, what: str, error: BaseException | None):
        try:
            code = self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        tail = self._log_tail()
        self._terminate()
        cause = f"exit code {code}" if code is not None else f"connection lost ({error!r})"
        if code is not None and code < 0:
            cause = f"killed by signal {-code}"
        raise WorkerDiedError(
            f"{self.backend} worker (pid {self._proc.pid}) died during {what}: {cause}\n"
            f"--- last worker log lines ---\n{tail}"
        ) from error

    def _with_log(self, message: str) -> str:
        return f"{message}\n--- last worker log lines ---\n{self._log_tail()}"

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as file:
                file.seek(0, os.SEEK_END)
                file.seek(max(0, file.tell() - 64 * 1024))
                lines = file.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no worker log)"
        return "\n".join(lines[-self.log_lines :])


class PendingGeneration:
    """A generation running in the worker; `result()` waits for it (at most the engine's
    `timeout_s` from the submission) and returns its completions, once."""

    def __init__(self, engine: WorkerEngine, what: str, deadline: float):
        self.engine = engine
        self.what = what
        self.deadline = deadline
        self._result: list[list[Completion]] | None = None

    def result(self) -> list[list[Completion]]:
        if self._result is None:
            self._result = self.engine._finish_generate(self)
        return self._result


TCMALLOC_NAMES = ("libtcmalloc_minimal.so*", "libtcmalloc.so*")
SYSTEM_LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_tcmalloc(python, system_dirs=SYSTEM_LIBRARY_DIRS) -> Path | None:
    """A tcmalloc shared library for the worker's LD_PRELOAD: the one vLLM bundles in its
    environment (`vllm/libs`), else the system's (e.g. Debian's libtcmalloc-minimal4); None
    when neither is installed."""
    env = Path(python).absolute().parent.parent
    dirs = sorted(env.glob("lib/python3*/site-packages/vllm/libs")) + [Path(d) for d in system_dirs]
    for directory in dirs:
        for pattern in TCMALLOC_NAMES:
            found = sorted(directory.glob(pattern))
            if found:
                return found[0]
    return None


def vllm_worker_env(env: Mapping[str, str], python, cpus: str | None) -> dict[str, str]:
    """The vLLM worker's environment: tcmalloc first in LD_PRELOAD when one is installed (and
    none is preloaded yet), vLLM's OpenMP threads bound to `cpus` when the worker is pinned."""
    env = dict(env)
    tcmalloc = find_tcmalloc(python)
    preload = env.get("LD_PRELOAD", "")
    if tcmalloc is not None and "libtcmalloc" not in preload:
        env["LD_PRELOAD"] = ":".join(filter(None, [str(tcmalloc), preload]))
    if cpus:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpus)
    return env


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
