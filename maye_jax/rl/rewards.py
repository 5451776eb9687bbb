"""Rule-based rewards (SPEC §2): accuracy via math-verify in killable workers, language, registry.

Accuracy compares the response's last ``\\boxed{...}`` with the solution's last boxed value using
math-verify's LaTeX extraction only (never its expression parser, which evaluates Python-like input
such as ``9**9**9**9``). Every comparison runs in a worker subprocess; a comparison that exceeds its
time limit gets its worker killed (SIGKILL, so C-level sympy work stops too), the worker is
replaced, and the response scores 0. math-verify's own ``signal.alarm`` timeouts are disabled.

The workers are plain ``python -c`` subprocesses speaking JSON lines over pipes rather than
multiprocessing children, so they never re-import the trainer's ``__main__`` module (and JAX).
This module imports no JAX.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from subprocess import PIPE

from maye_jax.rl.penalties import apply_length_penalty, overlong_penalty

logger = logging.getLogger(__name__)

_BOXED_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char (\{ \} \\) or a real brace


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Escaped braces (``\\{``, ``\\}``) do not count. Returns None if there is no boxed command
    followed by ``{``, or if the last one is never closed (a truncated response). Linear time.
    """
    search_end = len(text)
    while True:
        start = max(text.rfind(command, 0, search_end) for command in _BOXED_COMMANDS)
        if start < 0:
            return None
        command = next(c for c in _BOXED_COMMANDS if text.startswith(c, start))
        position = start + len(command)
        while position < len(text) and text[position].isspace():
            position += 1
        if position < len(text) and text[position] == "{":
            break
        search_end = start  # e.g. "\boxed 5" or "\boxedfoo": look further left
    depth = 0
    for match in _BRACE_TOKEN.finditer(text, position):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1 : match.start()]
    return None


_DEGREE_SIGN = re.compile(r"(?:\^\s*)?\s*\u00b0")  # "60°", "60 °", "60^°"


def _is_cjk_ideograph(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def normalize_answer(answer: str) -> str:
    """A boxed answer as math-verify can read it: the Unicode degree sign becomes ``^{\\circ}``
    (``60°`` = ``60^\\circ``) and a unit in CJK ideographs at the end is dropped (``20厘米``,
    ``20 平方厘米``, ``60度`` -> ``20``, ``20``, ``60``, as math-verify drops a unit in
    ``\\text{}``). CJK text elsewhere stays (and fails to parse); an answer that is only CJK
    text becomes empty and scores 0. Linear time."""
    answer = _DEGREE_SIGN.sub(lambda _: "^{\\circ}", answer)
    end = len(answer)
    while end and (answer[end - 1].isspace() or _is_cjk_ideograph(answer[end - 1])):
        end -= 1
    return answer[:end].strip()


def ground_truth(solution: str, answer: str | None = None) -> str | None:
    """The gold answer: the solution's last boxed value, else ``answer``, else the bare solution."""
    boxed = last_boxed(solution)
    if boxed is not None:
        return boxed
    if answer is not None and str(answer).strip():
        return str(answer)
    return solution if solution.strip() else None


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


def _serve_verifier(parent_pid: int) -> None:
    """Worker main loop: one JSON task per stdin line, one JSON score per stdout line."""
    _die_with_parent(parent_pid)
    output = os.fdopen(os.dup(1), "w")  # the protocol channel; stray prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silences "timeout disabled"
    _compare_answers("1", "1")  # import and warm up before announcing readiness
    output.write('{"ready": true}\n')
    output.flush()
    for line in sys.stdin.buffer:
        task = json.loads(line)
        try:
            score = _compare_answers(task["predicted"], task["gold"])
        except Exception:  # a parse/compare failure is a wrong answer, not a crash
            score = 0.0
        output.write(json.dumps({"score": score}) + "\n")
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
    project_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [project_root, env.get("PYTHONPATH")]))
    code = f"from maye_jax.rl.rewards import _serve_verifier as serve; serve({os.getpid()})"
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

    def send(self, task_index: int, predicted: str, gold: str, timeout_s: float) -> None:
        message = json.dumps({"predicted": predicted, "gold": gold}) + "\n"  # ASCII-escaped
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
            raise ValueError(f"rewards.VerifierPool: num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [worker.process.pid for worker in self._workers]

    def verify(self, pairs: Sequence[tuple[str, str]], timeout_s: float = 5.0) -> list[float]:
        """Scores ``(predicted, gold)`` answer pairs; a pair over ``timeout_s`` seconds scores 0."""
        with self._lock:
            while len(self._workers) < self.num_workers:
                self._workers.append(_Worker())
            scores = [0.0] * len(pairs)
            pending = deque(range(len(pairs)))
            while pending or any(worker.task_index is not None for worker in self._workers):
                for worker in self._workers:
                    if pending and worker.ready and worker.task_index is None:
                        index = pending.popleft()
                        try:
                            worker.send(index, *pairs[index], timeout_s)
                        except (BrokenPipeError, OSError):
                            pending.appendleft(index)  # the worker died while idle; retry elsewhere
                            self._replace(worker)
                self._wait_and_collect(pairs, scores)
            return scores

    def _wait_and_collect(self, pairs: Sequence[tuple[str, str]], scores: list[float]) -> None:
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
                        "rewards.VerifierPool: a verifier worker exited during start-up with code "
                        f"{worker.process.wait()}; see its stderr above"
                    )
                if worker.task_index is not None:
                    logger.warning(
                        "Verifier worker %d died on response %d; scoring it 0 and replacing it",
                        worker.process.pid,
                        worker.task_index,
                    )
                self._replace(worker)
                continue
            for message in messages:
                if message.get("ready"):
                    worker.ready = True
                elif worker.task_index is not None:
                    scores[worker.task_index] = float(message["score"])
                    worker.task_index = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task_index is not None and now >= worker.deadline:
                predicted = pairs[worker.task_index][0]
                logger.warning(
                    "Verifier timed out on response %d (answer %.80r); scoring it 0, restarting worker",
                    worker.task_index,
                    predicted,
                )
                self._replace(worker)
            elif not worker.ready and now - worker.started_at > self.startup_timeout_s:
                raise RuntimeError(
                    f"rewards.VerifierPool: a worker was not ready after {self.startup_timeout_s} s"
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


def _get_shared_pool(num_workers: int | None) -> VerifierPool:
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


# ----------------------------------------------------------------------------- rewards


def accuracy_rewards(
    responses: Sequence[str],
    solutions: Sequence[str],
    answers: Sequence[str | None] | None = None,
    timeout_s: float = 5.0,
    num_workers: int | None = None,
    max_answer_chars: int = 1000,
    pool: VerifierPool | None = None,
) -> list[float]:
    """Accuracy (1.0/0.0) of each response against its solution, checked in parallel.

    A response without a complete ``\\boxed{}``, or whose boxed answer is longer than
    ``max_answer_chars``, scores 0 without a check; identical answer strings score 1 without one.
    Both answers are normalised first (``normalize_answer``: degree sign, CJK units).
    ``pool`` defaults to the shared pool (resized to ``num_workers`` when given; see close()).
    """
    if len(responses) != len(solutions) or (answers is not None and len(answers) != len(responses)):
        raise ValueError(
            f"rewards.accuracy_rewards: {len(responses)} responses, {len(solutions)} solutions, "
            f"{None if answers is None else len(answers)} answers; expected equal lengths"
        )
    scores = [0.0] * len(responses)
    to_check: list[int] = []
    pairs: list[tuple[str, str]] = []
    for index, (response, solution) in enumerate(zip(responses, solutions, strict=True)):
        predicted = last_boxed(response)
        gold = ground_truth(solution, None if answers is None else answers[index])
        if gold is None:
            logger.warning("Example %d has no ground truth (empty solution and answer)", index)
        if not predicted or not predicted.strip() or gold is None:
            continue
        if len(predicted) > max_answer_chars:
            logger.debug("Response %d: boxed answer of %d chars scores 0", index, len(predicted))
            continue
        if predicted.strip() == gold.strip():
            scores[index] = 1.0
            continue
        predicted, gold = normalize_answer(predicted), normalize_answer(gold)
        if not predicted or not gold:
            continue
        if predicted == gold:
            scores[index] = 1.0
        else:
            to_check.append(index)
            pairs.append((predicted, gold))
    if pairs:
        pool = pool or _get_shared_pool(num_workers)
        for index, score in zip(to_check, pool.verify(pairs, timeout_s), strict=True):
            scores[index] = score
    return scores


def accuracy_reward(
    response: str, solution: str, answer: str | None = None, timeout_s: float = 5.0
) -> float:
    """Accuracy of one response: 1.0 if its last boxed answer equals the ground truth, else 0.0."""
    return accuracy_rewards([response], [solution], [answer], timeout_s=timeout_s)[0]


CHAR_CLASSES: dict[str, re.Pattern[str]] = {
    "cjk": re.compile("[\u4e00-\u9fff]"),  # CJK Unified Ideographs, as the original penalises
    "non_ascii_letters": re.compile(r"[^\W\d_a-zA-Z]"),  # letters outside a-z/A-Z ("non-English")
    "non_ascii": re.compile(r"[^\x00-\x7f]"),
}


def language_reward(response: str, char_class: str | re.Pattern[str] = "cjk") -> float:
    """``-0.1 * (characters of char_class) / len(response)``; 0.0 for an empty response."""
    if not response:
        return 0.0
    if isinstance(char_class, str) and char_class not in CHAR_CLASSES:
        raise KeyError(
            f"rewards.language_reward: unknown char_class {char_class!r}; known: {sorted(CHAR_CLASSES)}"
        )
    pattern = CHAR_CLASSES[char_class] if isinstance(char_class, str) else char_class
    count = sum(1 for _ in pattern.finditer(response))
    return -0.1 * count / len(response)


# ----------------------------------------------------------------------------- registry

RewardFn = Callable[..., list[float]]
_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Registers ``fn(responses, solutions, *, answers, **options) -> list[float]`` as ``name``."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REWARDS or name in ("total", "overlong"):  # "overlong": compute_rewards
            raise ValueError(f"rewards.register_reward: name {name!r} is taken")
        _REWARDS[name] = fn
        return fn

    return decorator


def reward_names() -> tuple[str, ...]:
    return tuple(_REWARDS)


def get_reward(name: str) -> RewardFn:
    """The batch reward function registered as ``name``."""
    if name not in _REWARDS:
        raise KeyError(f"rewards.get_reward: unknown reward {name!r}; known: {sorted(_REWARDS)}")
    return _REWARDS[name]


@register_reward("accuracy")
def _accuracy_batch(responses, solutions, *, answers=None, **options) -> list[float]:
    return accuracy_rewards(responses, solutions, answers, **options)


@register_reward("language")
def _language_batch(responses, solutions, *, answers=None, char_class="cjk") -> list[float]:
    return [language_reward(response, char_class) for response in responses]


def compute_rewards(
    names: Sequence[str],
    responses: Sequence[str],
    solutions: Sequence[str],
    answers: Sequence[str | None] | None = None,
    options: dict[str, dict] | None = None,
    finished_with_eos: Sequence[bool] | None = None,
    response_lengths: Sequence[int] | None = None,
    min_response_length: int = 0,
    reward_penalty: float = -0.1,
    overlong: dict | None = None,
) -> dict[str, list[float]]:
    """Each enabled reward per response, plus ``total`` (their sum).

    ``options[name]`` holds keyword options of reward ``name`` (e.g. ``{"accuracy":
    {"timeout_s": 5.0}, "language": {"char_class": "cjk"}}``). With ``finished_with_eos`` given,
    ``total`` gets apply_length_penalty (``response_lengths`` then required). ``overlong``
    (``{"max_tokens", "buffer_len", "penalty_factor"}`` of ``penalties.overlong_penalty``) adds
    the ``overlong`` component to the total, after the length penalty (maye_jax/rl/penalties.py).
    """
    options = options or {}
    rewards = {
        name: get_reward(name)(responses, solutions, answers=answers, **options.get(name, {}))
        for name in names
    }
    total = [float(sum(values)) for values in zip(*rewards.values(), strict=True)]
    if not rewards:
        total = [0.0] * len(responses)
    if (finished_with_eos is not None or overlong is not None) and response_lengths is None:
        raise ValueError("rewards.compute_rewards: length penalties need response_lengths")
    if finished_with_eos is not None:
        total = [
            apply_length_penalty(score, eos, length, min_response_length, reward_penalty)
            for score, eos, length in zip(total, finished_with_eos, response_lengths, strict=True)
        ]
    if overlong is not None:
        rewards["overlong"] = [overlong_penalty(length, **overlong) for length in response_lengths]
        total = [score + extra for score, extra in zip(total, rewards["overlong"], strict=True)]
    rewards["total"] = total
    return rewards
