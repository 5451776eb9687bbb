"""Users' reward functions (rl/user_rewards.py): given by file or module, weighted into the
total, run in the verifier's workers with its timeout; a failure scores 0 with a counted
warning naming the function and the record; an import failure is refused at the config check."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

from maye_jax.rl import rewards
from maye_jax.rl.user_rewards import (
    function_problems,
    parse_entry,
    register_functions,
    source_digests,
)
from maye_jax.rl.verifier import VerifierPool

SOURCE = textwrap.dedent(
    """
    import time

    def accuracy(responses, records):  # the built-in reward's name
        return [1.0] * len(responses)

    def seen(responses, records):
        return [float(record["answer"] in response) for response, record in zip(responses, records)]

    def parts(responses, records):
        return [{"boxed": float("boxed" in r), "short": -len(r) / 100} for r in responses]

    def fragile(responses, records):
        if records[0]["id"] == "b":
            raise ValueError("no luck")
        if records[0]["id"] == "c":
            time.sleep(30)
        if records[0]["id"] == "d":
            return ["not a number"]
        return [0.5]
    """
)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_rewards")
    path = folder / "my_rewards.py"
    path.write_text(SOURCE)
    (folder / "my_reward_module.py").write_text(
        "def twice(responses, records):\n    return [2.0]\n"
    )
    sys.path.insert(0, str(folder))  # module:function imports in the workers as it does here
    yield path
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2) as pool:
        yield pool


RECORDS = [
    dict(id="a", answer="12", question="q"),
    dict(id="b", answer="7", question="q"),
    dict(id="c", answer="3", question="q"),
    dict(id="d", answer="4", question="q"),
]
RESPONSES = ["so \\boxed{12}", "it is 7", "x", "\\boxed{5}"]


def test_entries_parse_and_bad_ones_are_refused_in_one_line(reward_file, tmp_path):
    assert parse_entry(f"{reward_file}:seen=0.5") == (f"{reward_file}:seen", "seen", 0.5)
    assert parse_entry("my_reward_module:twice") == ("my_reward_module:twice", "twice", 1.0)
    with pytest.raises(ValueError, match="expected path/to/file.py:function or module:function"):
        parse_entry("my_rewards.py:seen=heavy")
    (tmp_path / "broken.py").write_text("def f(:\n")
    problems = function_problems(
        [
            str(tmp_path / "missing.py") + ":f",
            f"{reward_file}:nothing",
            str(tmp_path / "broken.py") + ":f",
            "no_such_module_here:f",
        ]
    )
    assert problems == [
        f"config.rewards.functions: {tmp_path}/missing.py:f: cannot import: ImportError: no file "
        f"{tmp_path}/missing.py",
        f"config.rewards.functions: {reward_file}:nothing: cannot import: ImportError: "
        f"{reward_file} has no function nothing",
        f"config.rewards.functions: {tmp_path}/broken.py:f: cannot import: SyntaxError: "
        + problems[2].split("SyntaxError: ")[1],
        "config.rewards.functions: no_such_module_here:f: cannot import: ModuleNotFoundError: "
        "No module named 'no_such_module_here'",
    ]
    assert function_problems([f"{reward_file}:accuracy"])[0].endswith(
        "the reward name 'accuracy' is taken; rename the function"
    )
    digests = source_digests([f"{reward_file}:seen", "my_reward_module:twice"])
    assert set(digests) == {f"{reward_file}:seen", "my_reward_module:twice"}


def test_weighted_components_join_the_total_beside_the_built_in_rewards(reward_file, pool):
    weights = register_functions(
        [f"{reward_file}:seen=0.5", f"{reward_file}:parts=2", "my_reward_module:twice"]
    )
    assert weights == {"seen": 0.5, "parts": 2.0, "twice": 1.0}
    assert {"seen", "parts", "twice"} <= set(rewards.reward_names())
    assert register_functions([f"{reward_file}:seen=0.5"]) == {"seen": 0.5}  # registered once
    options = {name: {"pool": pool} for name in weights}
    out = rewards.compute_rewards(
        ["language", "seen", "parts", "twice"],
        RESPONSES[:2],
        ["", ""],
        answers=["12", "7"],
        options=options,
        records=RECORDS[:2],
        weights=weights,
    )
    assert out["seen"] == [1.0, 1.0]
    assert out["parts.boxed"] == [1.0, 0.0]
    assert out["parts.short"] == [-len(RESPONSES[0]) / 100, -len(RESPONSES[1]) / 100]
    assert out["twice"] == [2.0, 2.0]
    expected = [
        out["language"][i] + 0.5 * 1.0 + 2 * (out["parts.boxed"][i] + out["parts.short"][i]) + 2.0
        for i in range(2)
    ]
    assert out["total"] == pytest.approx(expected, abs=1e-12)


def test_a_failing_response_scores_zero_with_a_counted_warning(reward_file, pool, caplog):
    register_functions([f"{reward_file}:fragile"])
    with caplog.at_level(logging.WARNING):
        out = rewards.compute_rewards(
            ["fragile"],
            RESPONSES,
            [""] * 4,
            options={"fragile": {"pool": pool, "timeout_s": 3.0}},
            records=RECORDS,
        )
    assert out["fragile"] == [0.5, 0.0, 0.0, 0.0]
    assert out["total"] == [0.5, 0.0, 0.0, 0.0]
    text = caplog.text
    spec = f"{reward_file}:fragile"
    assert f"reward function {spec} raised ValueError: no luck on record b: scored 0 (1 " in text
    assert f"Verifier timed out on reward function {spec} on record c" in text
    assert f"reward function {spec} timed out or its worker died on record c: scored 0" in text
    assert f"reward function {spec} returned \"['not a number']\"" not in text
    assert "returned 'not a number', not a float or a dict of floats on record d" in text
    assert "(3 failure(s) so far)" in text
