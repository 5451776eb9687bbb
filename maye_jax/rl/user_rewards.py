"""Users' reward functions (`rewards.functions`), beside or instead of the built-in rewards.

    rewards.functions = ("my_rewards.py:format_bonus=0.5", "mypkg.rewards:length_bonus")

Each entry is `path/to/file.py:function` or `module:function`, with an optional `=weight`
(default 1.0; the built-in rewards weigh 1.0). A function is registered in the reward registry
(rl/rewards.py `register_reward`) under its own name and is then called as

    def length_bonus(responses: list[str], records: list[dict]) -> list[float | dict[str, float]]

`records[i]` is the record of `responses[i]`: its row as the data holds it (without image bytes)
with `id`, `question`, `answer` and `solution` set to the record's parts under the data's layout.
Per response it returns a float, or a dict of named float components (`{"format": 1.0, "len":
-0.2}`, logged as `<function>.<name>`). A response's total adds every component times its
function's weight.

The functions run in the verifier's worker processes (rl/verifier.py), one response per call,
with `rewards.timeout_s` per call: a function that raises, runs past its time, or returns no
float scores 0 for that response, with a warning that names the function and the record id and
counts the failures so far; the run goes on. The workers get the trainer's `sys.path`, so
`module:function` imports there as it does here. A function that cannot be imported is refused
when the run's config is checked (`function_problems`). This module imports no JAX.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(?P<target>[^=]+):(?P<name>[A-Za-z_]\w*)(?:=(?P<weight>[^=]+))?$")


def parse_entry(entry: str) -> tuple[str, str, float]:
    """(`target:function` with a file target made absolute, the function's name, its weight) of
    one `rewards.functions` entry; ValueError with the expected form when it is not one."""
    match = _ENTRY.match(entry.strip())
    weight = None
    if match:
        try:
            weight = float(match["weight"]) if match["weight"] is not None else 1.0
        except ValueError:
            weight = None
    if match is None or weight is None or not math.isfinite(weight):
        raise ValueError(
            f"{entry!r}: expected path/to/file.py:function or module:function, optionally "
            "followed by =weight (a number)"
        )
    target = match["target"]
    if target.endswith(".py"):
        target = str(Path(target).resolve())
    return f"{target}:{match['name']}", match["name"], weight


def entry_problem(entry: str) -> str | None:
    """The problem of an entry's form (a field rule of rewards.functions), or None."""
    try:
        parse_entry(entry)
    except ValueError as error:
        return str(error)
    return None


def import_function(spec: str):
    """The function of `target:function` (a .py file, imported once per process under a name of
    its own path, or a module on sys.path); ImportError naming what is missing."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ImportError(f"no file {path}")
        module_name = "maye_user_rewards_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            spec_ = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[module_name] = module
            try:
                spec_.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        module = importlib.import_module(target)
    function = getattr(module, name, None)
    if not callable(function):
        raise ImportError(f"{target} has no function {name}")
    return function


def function_problems(entries: Sequence[str]) -> list[str]:
    """One line per entry whose function cannot be imported, or whose name is taken by another
    reward (checked when the config is, before any work)."""
    from maye_jax.rl.rewards import reward_names

    problems, seen = [], set()
    for entry in entries:
        spec, name, _ = parse_entry(entry)
        try:
            import_function(spec)
        except Exception as error:  # any import-time failure of the user's module
            text = str(error).splitlines()[0] if str(error) else ""
            problems.append(
                f"config.rewards.functions: {entry}: cannot import: {type(error).__name__}: {text}"
            )
            continue
        taken = name in seen or (name in reward_names() and _registered_spec(name) is None)
        if taken or name in ("total", "overlong"):
            problems.append(
                f"config.rewards.functions: {entry}: the reward name {name!r} is taken; rename "
                "the function"
            )
        seen.add(name)
    return problems


def source_digests(entries: Sequence[str]) -> dict[str, str]:
    """A digest of each function's source file, for the run's fingerprint (a resume after a
    reward function changed is refused)."""
    digests = {}
    for entry in entries:
        spec, _, _ = parse_entry(entry)
        target = spec.rpartition(":")[0]
        if target.endswith(".py"):
            path = Path(target)
        else:
            found = importlib.util.find_spec(target)
            path = Path(found.origin) if found is not None and found.origin else None
        data = path.read_bytes() if path is not None and path.is_file() else b""
        digests[spec] = hashlib.sha256(data).hexdigest()[:16]
    return digests


class UserReward:
    """A user's function as a batch reward of the registry: scores each response in a verifier
    worker and returns its components (`name`, or `name.key` for dict results)."""

    needs_records = True  # compute_rewards passes the rows' records

    def __init__(self, name: str, spec: str):
        self.name, self.spec = name, spec
        self.failures = 0

    def __call__(
        self,
        responses: Sequence[str],
        solutions: Sequence[str],
        *,
        answers=None,
        records: Sequence[dict] | None = None,
        timeout_s: float = 5.0,
        num_workers: int | None = None,
        pool=None,
    ) -> dict[str, list[float]]:
        from maye_jax.rl.verifier import shared_pool

        del solutions, answers  # in the records
        if records is None or len(records) != len(responses):
            raise ValueError(f"reward function {self.name}: needs one record per response")
        ids = [record.get("id") for record in records]
        tasks = [
            {"function": self.spec, "response": response, "record": record}
            for response, record in zip(responses, records)
        ]
        results = (pool or shared_pool(num_workers)).run(
            tasks, timeout_s, lambda i: f"reward function {self.spec} on record {ids[i]}"
        )
        components: dict[str, list[float]] = {}
        for index, result in enumerate(results):
            values = self._values(result, ids[index])
            for key, value in values.items():
                components.setdefault(key, [0.0] * len(responses))[index] = value
        return components or {self.name: [0.0] * len(responses)}

    def _values(self, result: dict | None, record_id) -> dict[str, float]:
        """The components of one response's result; {} (scored 0, warned) on a failure."""
        problem = None
        if result is None:
            problem = "timed out or its worker died"
        elif "error" in result:
            problem = f"raised {result['error']}"
        else:
            value = result["value"]
            parts = value if isinstance(value, dict) else {None: value}
            if all(_is_number(v) for v in parts.values()) and parts:
                return {
                    self.name if key is None else f"{self.name}.{key}": float(v)
                    for key, v in parts.items()
                }
            problem = f"returned {str(value)[:80]!r}, not a float or a dict of floats"
        self.failures += 1
        log.warning(
            "reward function %s %s on record %s: scored 0 (%d failure(s) so far)",
            self.spec,
            problem,
            record_id,
            self.failures,
        )
        return {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _registered_spec(name: str) -> str | None:
    """The spec of the users' function registered as `name`; None for any other reward."""
    from maye_jax.rl.rewards import get_reward

    reward = get_reward(name)
    return reward.spec if isinstance(reward, UserReward) else None


def register_functions(entries: Sequence[str]) -> dict[str, float]:
    """Registers each entry's function in the reward registry and returns {reward name:
    weight}. A second call with the same entries reuses them; a users' function of the same name
    from another file (another run in this process) replaces the first; a name of any other
    reward is refused (`function_problems` says so first)."""
    from maye_jax.rl.rewards import register_reward, reward_names

    weights = {}
    for entry in entries:
        spec, name, weight = parse_entry(entry)
        registered = _registered_spec(name) if name in reward_names() else None
        if name in reward_names() and registered is None:
            raise ValueError(f"rewards.functions: {entry}: the reward name {name!r} is taken")
        if registered != spec:
            register_reward(name, replace=registered is not None)(UserReward(name, spec))
        weights[name] = weight
    return weights
