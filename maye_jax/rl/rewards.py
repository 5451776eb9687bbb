"""Rule-based rewards (SPEC §2): accuracy via math-verify in killable workers, language, registry.

Accuracy compares the response's last ``\\boxed{...}`` with the solution's last boxed value using
math-verify's LaTeX extraction only (never its expression parser, which evaluates Python-like input
such as ``9**9**9**9``). The comparisons run in killable worker subprocesses (rl/verifier.py): one
over its time limit scores 0. This module imports no JAX.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

from maye_jax.rl.penalties import apply_length_penalty, overlong_penalty
from maye_jax.rl.verifier import VerifierPool, close, default_num_workers, shared_pool

__all__ = [
    "CHAR_CLASSES",
    "RewardFn",
    "VerifierPool",
    "accuracy_reward",
    "accuracy_rewards",
    "close",
    "compute_rewards",
    "default_num_workers",
    "get_reward",
    "ground_truth",
    "language_reward",
    "last_boxed",
    "normalize_answer",
    "register_reward",
    "reward_names",
]

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
        pool = pool or shared_pool(num_workers)
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


def register_reward(name: str, *, replace: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Registers ``fn(responses, solutions, *, answers, **options) -> list[float]`` as ``name``
    (a users' function from `rewards.functions` is registered as one: rl/user_rewards.py; it
    takes the rows' ``records`` too and may return several named components). ``replace``: a
    users' function of that name registered again (another run in this process named another
    file)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if (name in _REWARDS and not replace) or name in (
            "total",
            "overlong",
        ):  # "overlong": compute_rewards
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
    records: Sequence[dict] | None = None,
    weights: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Each enabled reward per response (a users' function's components under their own names),
    plus ``total``: their sum, each times its reward's weight (``weights``; 1.0 unless given).

    ``options[name]`` holds keyword options of reward ``name`` (e.g. ``{"accuracy":
    {"timeout_s": 5.0}, "language": {"char_class": "cjk"}}``). With ``finished_with_eos`` given,
    ``total`` gets apply_length_penalty (``response_lengths`` then required). ``overlong``
    (``{"max_tokens", "buffer_len", "penalty_factor"}`` of ``penalties.overlong_penalty``) adds
    the ``overlong`` component to the total, after the length penalty (maye_jax/rl/penalties.py).
    """
    options, weights = options or {}, weights or {}
    rewards: dict[str, list[float]] = {}
    total = [0.0] * len(responses)
    for name in names:
        fn = get_reward(name)
        kwargs = dict(options.get(name, {}))
        if getattr(fn, "needs_records", False):  # a users' function (rl/user_rewards.py)
            kwargs["records"] = records
        values = fn(responses, solutions, answers=answers, **kwargs)
        weight = float(weights.get(name, 1.0))
        for key, component in (values if isinstance(values, dict) else {name: values}).items():
            rewards[key] = component
            total = [t + weight * v for t, v in zip(total, component, strict=True)]
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
