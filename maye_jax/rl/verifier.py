"""Killable workers: the answer checks behind the accuracy reward (rl/rewards.py) and the users'
reward functions (rl/user_rewards.py).

Every comparison runs in a worker subprocess; a comparison that exceeds its time limit gets its
worker killed (SIGKILL, so C-level sympy work stops too), the worker is replaced, and the
response scores 0. math-verify's own ``signal.alarm`` timeouts are disabled.

The workers are plain ``python -c`` subprocesses speaking JSON lines over pipes rather than
multiprocessing children, so they never re-import the trainer's ``__main__`` module (and JAX).
They get the trainer's ``sys.path``, so a reward function named ``module:function`` imports
there as it does in the trainer. This module imports no JAX.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from subprocess import PIPE

from maye_jax.checkout import env_with_checkout

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- worker side


def _compare_answers(predicted: str, gold: str) -> float:
    """1.0 if the two LaTeX answers are mathematically equal per math-verify, else 0.0."""
    from math_verify import LatexExtractionConfig, parse, verify

    latex_only = [LatexExtractionConfig()]

    def parse_latex(answer: str) -> list:
        return parse(
            "\\boxed{" + answer + "}",
            extraction_config=latex_only,
            fallback_mode="no_fallback",
            parsing_timeout=None,
        )

    gold_parsed = parse_latex(gold)
    predicted_parsed = parse_latex(predicted)
    if not gold_parsed or not predicted_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, predicted_parsed, timeout_seconds=None) else 0.0


def _die_with_parent(parent_pid: int) -> None:
    """Asks Linux to SIGKILL this worker when its parent dies, so a hung check never outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _run_task(task: dict, functions: dict) -> dict:
    """One task's result: `{"score"}` of a math-verify comparison (a parse or compare failure
    is a wrong answer), or `{"value"}` of a user's reward function on one response (the
    function's result for it, checked by the parent), `{"error"}` when the function raised."""
    if "function" not in task:
        try:
            return {"score": _compare_answers(task["predicted"], task["gold"])}
        except Exception:
            return {"score": 0.0}
    from maye_jax.rl.user_rewards import import_function

    try:
        spec = task["function"]
        if spec not in functions:
            functions[spec] = import_function(spec)
        return {"value": functions[spec]([task["response"]], [task["record"]])[0]}
    except Exception as error:  # scored 0 by the parent, with a warning naming it
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def _serve_verifier(parent_pid: int) -> None:
    """Worker main loop: one JSON task per stdin line, one JSON result per stdout line."""
    _die_with_parent(parent_pid)
    paths = json.loads(os.environ.get("MAYE_TRAINER_SYS_PATH", "[]"))
    sys.path[:0] = [path for path in paths if path not in sys.path]  # the trainer's first
    output = os.fdopen(os.dup(1), "w")  # the protocol channel; stray prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silences "timeout disabled"
    _compare_answers("1", "1")  # import and warm up before announcing readiness
    output.write('{"ready": true}\n')
    output.flush()
    functions: dict = {}  # a user's reward functions, imported once per worker
    for line in sys.stdin.buffer:
        output.write(json.dumps(_run_task(json.loads(line), functions), default=repr) + "\n")
        output.flush()


# ----------------------------------------------------------------------------- parent side


class _Spawner:
    """Starts worker processes from one long-lived thread.

    Linux delivers the parent-death signal when the *thread* that started a child exits, so
    workers are started from this thread (alive as long as the process), not from whichever
    short-lived thread happens to call the pool.
    """

    def __init__(self) -> None:
        self.owner_pid = os.getpid()  # a forked child must start its own spawner
        self._requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="verifier-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            reply, command, env = self._requests.get()
            try:
                reply.put(subprocess.Popen(command, stdin=PIPE, stdout=PIPE, env=env))
            except BaseException as error:  # handed to the caller, raised there
                reply.put(error)

    def start(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._requests.put((reply, command, env))
        result = reply.get()
        if isinstance(result, BaseException):
            raise result
        return result


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _start_worker_process() -> subprocess.Popen:
    global _spawner
    env = env_with_checkout(os.environ)  # a worker imports this checkout even uninstalled
    env["MAYE_TRAINER_SYS_PATH"] = json.dumps([os.path.abspath(p or ".") for p in sys.path])
    code = f"from maye_jax.rl.verifier import _serve_verifier as serve; serve({os.getpid()})"
    with _spawner_lock:
        if _spawner is None or _spawner.owner_pid != os.getpid():
            _spawner = _Spawner()
        spawner = _spawner
    return spawner.start([sys.executable, "-c", code], env)


class _Worker:
    """One verifier subprocess and the bytes read from it so far."""

    def __init__(self) -> None:
        self.process = _start_worker_process()
        self.started_at = time.monotonic()
        self.ready = False
        self.buffer = b""
        self.task_index: int | None = None
        self.deadline = 0.0

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def send(self, task_index: int, task: dict, timeout_s: float) -> None:
        message = json.dumps(task, default=str) + "\n"  # ASCII-escaped
        self.process.stdin.write(message.encode("ascii"))
        self.process.stdin.flush()
        self.task_index = task_index
        self.deadline = time.monotonic() + timeout_s

    def read_messages(self) -> list[dict] | None:
        """Complete messages now readable; None when the worker has exited (EOF)."""
        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class VerifierPool:
    """A small pool of killable math-verify workers; started lazily, safe to call from threads."""

    def __init__(self, num_workers: int = 2, startup_timeout_s: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"verifier.VerifierPool: num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [worker.process.pid for worker in self._workers]

    def verify(self, pairs: Sequence[tuple[str, str]], timeout_s: float = 5.0) -> list[float]:
        """Scores ``(predicted, gold)`` answer pairs; a pair over ``timeout_s`` seconds scores 0."""
        results = self.run(
            [{"predicted": predicted, "gold": gold} for predicted, gold in pairs],
            timeout_s,
            lambda index: f"response {index} (answer {pairs[index][0][:80]!r})",
        )
        return [0.0 if result is None else float(result["score"]) for result in results]

    def run(
        self, tasks: Sequence[dict], timeout_s: float, describe=lambda index: f"task {index}"
    ) -> list[dict | None]:
        """Each task's result message (`_run_task`), or None where its worker ran past
        ``timeout_s`` seconds or died on it (warned, naming ``describe(index)``)."""
        with self._lock:
            while len(self._workers) < self.num_workers:
                self._workers.append(_Worker())
            results: list[dict | None] = [None] * len(tasks)
            pending = deque(range(len(tasks)))
            while pending or any(worker.task_index is not None for worker in self._workers):
                for worker in self._workers:
                    if pending and worker.ready and worker.task_index is None:
                        index = pending.popleft()
                        try:
                            worker.send(index, tasks[index], timeout_s)
                        except (BrokenPipeError, OSError):
                            pending.appendleft(index)  # the worker died while idle; retry elsewhere
                            self._replace(worker)
                self._wait_and_collect(describe, results)
            return results

    def _wait_and_collect(self, describe, results: list[dict | None]) -> None:
        """Waits for results until the nearest deadline; kills and replaces workers past it."""
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.task_index is not None]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
        readable, _, _ = select.select(self._workers, [], [], wait_s)
        for worker in readable:
            messages = worker.read_messages()
            if messages is None:  # exited: crashed, or killed from outside
                if not worker.ready:
                    raise RuntimeError(
                        "verifier.VerifierPool: a verifier worker exited during start-up with code "
                        f"{worker.process.wait()}; see its stderr above"
                    )
                if worker.task_index is not None:
                    logger.warning(
                        "Verifier worker %d died on %s; scoring it 0 and replacing it",
                        worker.process.pid,
                        describe(worker.task_index),
                    )
                self._replace(worker)
                continue
            for message in messages:
                if message.get("ready"):
                    worker.ready = True
                elif worker.task_index is not None:
                    results[worker.task_index] = message
                    worker.task_index = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task_index is not None and now >= worker.deadline:
                logger.warning(
                    "Verifier timed out on %s; scoring it 0, restarting worker",
                    describe(worker.task_index),
                )
                self._replace(worker)
            elif not worker.ready and now - worker.started_at > self.startup_timeout_s:
                raise RuntimeError(
                    f"verifier.VerifierPool: a worker was not ready after {self.startup_timeout_s} s"
                )

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker()

    def close(self) -> None:
        """Kills every worker; the pool restarts them if used again."""
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def default_num_workers() -> int:
    """Half the host's cores, between 1 and 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


_shared_pool: VerifierPool | None = None


def shared_pool(num_workers: int | None) -> VerifierPool:
    """The shared pool; ``num_workers=None`` keeps its current size (default_num_workers())."""
    global _shared_pool
    if _shared_pool is not None and num_workers not in (None, _shared_pool.num_workers):
        _shared_pool.close()
        _shared_pool = None
    if _shared_pool is None:
        _shared_pool = VerifierPool(num_workers or default_num_workers())
    return _shared_pool


def close() -> None:
    """Shuts down the shared verifier pool (also run at interpreter exit)."""
    global _shared_pool
    if _shared_pool is not None:
        _shared_pool.close()
        _shared_pool = None


atexit.register(close)
