"""Tests for maye_jax/rl/rewards.py and rl/verifier.py: boxed extraction, accuracy in killable
workers, language, registry."""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maye_jax.rl import rewards, verifier


@pytest.fixture(scope="module")
def pool():
    """A warm two-worker pool shared by this module's accuracy tests."""
    verifier_pool = rewards.VerifierPool(num_workers=2)
    assert verifier_pool.verify([("1", "1.0")]) == [1.0]  # starts and warms the workers
    yield verifier_pool
    verifier_pool.close()


# ----------------------------------------------------------------------------- last_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the answer is \\boxed{20}.", "20"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("\\boxed{1} then \\boxed{2} finally \\boxed{3}", "3"),
        ("no box here", None),
        ("", None),
        ("\\boxed{1} and a truncated \\boxed{2", None),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{a \\\\ {b}}", "a \\\\ {b}"),
        ("\\fbox{7}", "7"),
        ("\\boxed {7}", "7"),
        ("\\boxed{4} but \\boxed 5", "4"),
        ("\\boxed{}", ""),
        ("\\boxed{x}}}}", "x"),
    ],
)
def test_last_boxed(text, expected):
    assert rewards.last_boxed(text) == expected


def test_last_boxed_is_fast_on_huge_inputs():
    unbalanced = "\\boxed{" + "{" * 1_000_000
    many_commands = "\\boxed" * 200_000 + "{5}"
    start = time.monotonic()
    assert rewards.last_boxed(unbalanced) is None
    assert rewards.last_boxed(many_commands) == "5"
    assert rewards.last_boxed("\\boxed{" + "x" * 1_000_000 + "}") == "x" * 1_000_000
    assert time.monotonic() - start < 60.0  # linear: well under a second; quadratic: hours


def test_ground_truth_prefers_the_solutions_last_boxed_value():
    assert rewards.ground_truth("so \\boxed{3} or \\boxed{4}", answer="5") == "4"
    assert rewards.ground_truth("no boxed value", answer="5") == "5"
    assert rewards.ground_truth("20", answer=None) == "20"
    assert rewards.ground_truth("  ", answer="") is None


# ----------------------------------------------------------------------------- accuracy

ACCURACY_CASES = [
    # (response, solution, expected accuracy)
    ("so the answer is \\boxed{20}", "\\boxed{20}", 1.0),
    ("so the answer is \\boxed{21}", "\\boxed{20}", 0.0),
    ("\\boxed{20.0}", "area is \\boxed{20}", 1.0),
    ("\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\boxed{0.75}", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\boxed{\\frac{\\sqrt2}{2}}", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\boxed{\\sqrt{12}}", 1.0),
    ("\\boxed{3.14}", "\\boxed{\\pi}", 0.0),
    ("\\boxed{x = 5}", "\\boxed{5}", 1.0),
    ("\\boxed{30^\\circ}", "\\boxed{30}", 1.0),
    ("first \\boxed{7} then \\boxed{8}", "\\boxed{8}", 1.0),
    ("first \\boxed{8} then \\boxed{7}", "\\boxed{8}", 0.0),
    ("\\boxed{\\frac{\\frac{1}{2}}{2}}", "\\boxed{0.25}", 1.0),
    ("the answer is 20", "\\boxed{20}", 0.0),
    ("", "\\boxed{20}", 0.0),
    ("\\boxed{}", "\\boxed{20}", 0.0),
    ("\\boxed{20", "\\boxed{20}", 0.0),
    ("\\boxed{9**9**9**9}", "\\boxed{5}", 0.0),
    ("\\boxed{\u4e2d\u6587 \U0001f600 \u202e 5}", "\\boxed{5}", 0.0),
    ("\\boxed{\udcff\ud800}", "\\boxed{5}", 0.0),
    ("\x00\\boxed{\x00}", "\\boxed{5}", 0.0),
]


def test_accuracy_on_hand_cases(pool):
    responses, solutions, expected = zip(*ACCURACY_CASES, strict=True)
    scores = rewards.accuracy_rewards(responses, solutions, timeout_s=10.0, pool=pool)
    mismatches = [
        (response, solution, score)
        for (response, solution, want), score in zip(ACCURACY_CASES, scores, strict=True)
        if score != want
    ]
    assert mismatches == []
    assert list(expected).count(1.0) == 10  # the table itself holds both outcomes


def test_answer_is_used_only_when_the_solution_has_no_boxed_value(pool):
    scores = rewards.accuracy_rewards(
        ["\\boxed{6}", "\\boxed{6}", "\\boxed{6}"],
        ["worked solution without a box", "\\boxed{7}", ""],
        answers=["6.0", "6", None],
        pool=pool,
    )
    assert scores == [1.0, 0.0, 0.0]


def test_accuracy_on_a_megabyte_response(pool):
    filler = "Let me think step by step. \u00e9\u4e2d " * 40_000  # ~1.2 MB
    responses = [filler + "\\boxed{42}", filler, "\\boxed{" + "1+" * 500_000 + "1}"]
    start = time.monotonic()
    scores = rewards.accuracy_rewards(responses, ["\\boxed{42}"] * 3, timeout_s=5.0, pool=pool)
    assert scores == [1.0, 0.0, 0.0]  # the last one is over max_answer_chars: no check at all
    assert time.monotonic() - start < 60.0  # about a second; a parse of the megabyte: minutes


def test_accuracy_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 responses, 1 solutions"):
        rewards.accuracy_rewards(["a", "b"], ["c"])


@pytest.mark.parametrize("adversarial", ["9^{9^{9^{9}}}", "(10^{10})!", "100!!"])
def test_pathological_answer_is_cut_off_at_the_time_limit(pool, adversarial):
    pids_before = pool.worker_pids()
    timeout_s = 2.0
    start = time.monotonic()
    scores = rewards.accuracy_rewards(
        ["\\boxed{" + adversarial + "}", "\\boxed{3}"],
        ["\\boxed{5}", "\\boxed{3.0}"],
        timeout_s=timeout_s,
        pool=pool,
    )
    elapsed = time.monotonic() - start
    assert scores == [0.0, 1.0]
    assert elapsed < timeout_s + 60.0  # returns after the limit, not after the big power (never)
    assert len(set(pool.worker_pids()) - set(pids_before)) == 1  # the stuck worker was replaced
    assert rewards.accuracy_rewards(["\\boxed{0.5}"], ["\\boxed{1/2}"], pool=pool) == [1.0]


def test_worker_killed_mid_task_is_replaced(monkeypatch):
    task_sent = threading.Event()
    send = verifier._Worker.send

    def send_and_tell(self, *args):
        send(self, *args)
        task_sent.set()

    monkeypatch.setattr(verifier._Worker, "send", send_and_tell)
    with rewards.VerifierPool(num_workers=1) as single_pool:
        assert single_pool.verify([("2", "2.0")]) == [1.0]
        (busy_pid,) = single_pool.worker_pids()
        task_sent.clear()
        results = {}

        def score_slow_answer():
            start = time.monotonic()
            results["scores"] = single_pool.verify([("9^{9^{9^{9}}}", "5")], timeout_s=600.0)
            results["elapsed"] = time.monotonic() - start

        thread = threading.Thread(target=score_slow_answer)
        thread.start()
        assert task_sent.wait(timeout=120)  # the worker holds the task now
        os.kill(busy_pid, 9)
        thread.join(timeout=600.0)
        assert results["scores"] == [0.0]
        assert results["elapsed"] < 300.0  # noticed the death, did not wait for the 600 s limit
        assert single_pool.worker_pids() != [busy_pid]
        assert single_pool.verify([("\\frac{1}{4}", "0.25")]) == [1.0]


def test_worker_killed_while_idle_is_replaced():
    with rewards.VerifierPool(num_workers=1) as single_pool:
        assert single_pool.verify([("2", "2.0")]) == [1.0]
        (idle_pid,) = single_pool.worker_pids()
        os.kill(idle_pid, 9)
        os.waitid(os.P_PID, idle_pid, os.WEXITED | os.WNOWAIT)  # dead (left for the pool to reap)
        assert single_pool.verify([("3", "3.0"), ("3", "4")]) == [1.0, 0.0]
        assert single_pool.worker_pids() != [idle_pid]


def test_workers_outlive_the_thread_that_started_them():
    # Linux's parent-death signal follows the starting *thread*; workers must not die with it.
    with rewards.VerifierPool(num_workers=1) as single_pool:
        scores = []
        thread = threading.Thread(target=lambda: scores.extend(single_pool.verify([("2", "2.0")])))
        thread.start()
        thread.join()
        assert scores == [1.0]
        (pid,) = single_pool.worker_pids()
        # The OS thread is gone once its /proc entry is: a parent-death signal would have been
        # sent by then, and a worker killed by it could not answer the next request.
        task = Path(f"/proc/self/task/{thread.native_id}")
        deadline = time.monotonic() + 120
        while task.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not task.exists()
        assert single_pool.verify([("0.5", "\\frac{1}{2}")]) == [1.0]
        assert single_pool.worker_pids() == [pid]


def test_workers_import_the_package_from_this_checkout():
    """The worker's PYTHONPATH gets the folder holding the maye_jax package, so a checkout
    that is not installed still starts its workers."""
    import maye_jax
    from maye_jax.checkout import ROOT, env_with_checkout

    assert ROOT == Path(maye_jax.__file__).resolve().parents[1]
    env = env_with_checkout({"PYTHONPATH": "elsewhere"})
    assert env["PYTHONPATH"] == os.pathsep.join([str(ROOT), "elsewhere"])


def test_shared_pool_starts_lazily_and_close_stops_it():
    rewards.close()
    assert verifier._shared_pool is None
    assert rewards.accuracy_reward("\\boxed{0.5}", "\\boxed{\\frac12}") == 1.0
    assert rewards.accuracy_reward("\\boxed{0.5}", "\\boxed{\\frac13}") == 0.0
    pids = verifier._shared_pool.worker_pids()
    assert len(pids) == rewards.default_num_workers()
    rewards.close()
    assert verifier._shared_pool is None
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ----------------------------------------------------------------------------- language


@pytest.mark.parametrize(
    "text, char_class, expected",
    [
        ("", "cjk", 0.0),
        ("plain english", "cjk", 0.0),
        ("\u4e2d\u6587ab", "cjk", -0.1 * 2 / 4),
        ("\u4e2d\u6587", "cjk", -0.1),
        ("\u4e00\u9fff\u3400x", "cjk", -0.1 * 2 / 4),  # U+3400 (extension A) is outside the range
        ("h\u00e9llo", "cjk", 0.0),
        ("h\u00e9llo", "non_ascii_letters", -0.1 * 1 / 5),
        ("\u4e2d\u00e91_", "non_ascii_letters", -0.1 * 2 / 4),
        ("\u00e9\u00b2!", "non_ascii", -0.1 * 2 / 3),
        ("aXbX", re.compile("X"), -0.1 * 2 / 4),
    ],
)
def test_language_reward(text, char_class, expected):
    assert rewards.language_reward(text, char_class) == pytest.approx(expected, abs=1e-15)


def test_language_reward_unknown_class_raises():
    with pytest.raises(KeyError, match="unknown char_class 'klingon'"):
        rewards.language_reward("text", "klingon")


def test_length_penalty():
    assert rewards.apply_length_penalty(1.0, True, 50, min_response_length=10) == 1.0
    assert rewards.apply_length_penalty(1.0, False, 50, min_response_length=10) == -0.1
    assert rewards.apply_length_penalty(1.0, True, 5, min_response_length=10) == -0.1
    assert rewards.apply_length_penalty(0.0, True, 5, 10, reward_penalty=-0.5) == -0.5


# ----------------------------------------------------------------------------- registry


def test_registry_and_compute_rewards(pool):
    assert rewards.get_reward("language") is not None
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        rewards.get_reward("nope")
    with pytest.raises(ValueError, match="taken"):
        rewards.register_reward("accuracy")(lambda responses, solutions, **_: [])

    responses = ["\\boxed{2} \u4e2d", "\\boxed{3}"]
    solutions = ["\\boxed{2}", "\\boxed{2}"]
    result = rewards.compute_rewards(
        ["accuracy", "language"], responses, solutions, options={"accuracy": {"pool": pool}}
    )
    assert sorted(result) == ["accuracy", "language", "total"]
    assert result["accuracy"] == [1.0, 0.0]
    assert result["language"] == [pytest.approx(-0.1 / 11), 0.0]
    assert result["total"] == [pytest.approx(1.0 - 0.1 / 11), 0.0]

    @rewards.register_reward("test_length_bonus")
    def length_bonus(responses, solutions, *, answers=None, scale=1.0):
        return [scale * len(response) for response in responses]

    try:
        result = rewards.compute_rewards(
            ["test_length_bonus"],
            ["ab", "abcd"],
            ["", ""],
            options={"test_length_bonus": {"scale": 0.5}},
            finished_with_eos=[True, False],
            response_lengths=[2, 4],
        )
        assert result == {"test_length_bonus": [1.0, 2.0], "total": [1.0, -0.1]}
        # With DAPO's overlong penalty too (max 4 tokens, buffer 2): 2 tokens cost nothing, 4
        # cost the whole factor, added after the no-EOS penalty replaced the score.
        result = rewards.compute_rewards(
            ["test_length_bonus"],
            ["ab", "abcd", "abc"],
            ["", "", ""],
            options={"test_length_bonus": {"scale": 0.5}},
            finished_with_eos=[True, False, True],
            response_lengths=[2, 4, 3],
            overlong={"max_tokens": 4, "buffer_len": 2, "penalty_factor": 1.0},
        )
        assert result == {
            "test_length_bonus": [1.0, 2.0, 1.5],
            "overlong": [0.0, -1.0, -0.5],
            "total": [1.0, -1.1, 1.0],
        }
        with pytest.raises(ValueError, match="need response_lengths"):
            rewards.compute_rewards([], ["a"], [""], overlong={"max_tokens": 4, "buffer_len": 2})
        with pytest.raises(ValueError, match="taken"):
            rewards.register_reward("overlong")(lambda responses, solutions, **_: [])
    finally:
        rewards._REWARDS.pop("test_length_bonus")


def test_modules_import_no_jax():
    code = (
        "import sys, maye_jax.rewards, maye_jax.scheme, maye_jax.synth; print('jax' in sys.modules)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.stdout.strip() == "False", completed.stderr


def _boxed(x: str) -> str:
    return "\\boxed{" + x + "}"


# A second table (fractions vs decimals, \\frac, \\sqrt, degrees, units, several boxes, nested
# braces, no box, empty, 100 kB of garbage); with ACCURACY_CASES more than 40 cases.
MORE_ACCURACY_CASES = [
    (_boxed("0.25"), _boxed("\\frac{1}{4}"), 1.0),
    (_boxed("\\frac{3}{4}"), _boxed("0.75"), 1.0),
    (_boxed("\\dfrac{1}{3}"), _boxed("\\frac{1}{3}"), 1.0),
    (_boxed("0.33"), _boxed("\\frac{1}{3}"), 0.0),
    (_boxed("2\\sqrt{3}"), _boxed("\\sqrt{12}"), 1.0),
    (_boxed("\\sqrt{2}"), _boxed("1.4142"), 0.0),
    (_boxed("3\\sqrt{2}"), _boxed("\\sqrt{18}"), 1.0),
    (_boxed("60^\\circ"), _boxed("60"), 1.0),
    (_boxed("60^{\\circ}"), _boxed("60^\\circ"), 1.0),
    (_boxed("45"), _boxed("60^\\circ"), 0.0),
    (_boxed("12 \\text{ cm}"), _boxed("12"), 1.0),
    (_boxed("12\\,\\text{cm}^2"), _boxed("12"), 1.0),
    (_boxed("13"), _boxed("12 \\text{ cm}"), 0.0),
    ("first " + _boxed("5") + " then " + _boxed("7"), _boxed("7"), 1.0),
    ("first " + _boxed("7") + " then " + _boxed("5"), _boxed("7"), 0.0),
    (_boxed("\\frac{\\sqrt{3}}{2}"), _boxed("\\frac{\\sqrt3}{2}"), 1.0),
    (_boxed("{{12}}"), _boxed("12"), 1.0),
    ("The answer is 12.", _boxed("12"), 0.0),
    ("", _boxed("12"), 0.0),
    (_boxed(""), _boxed("12"), 0.0),
    ("x" * 100_000 + _boxed("12"), _boxed("12"), 1.0),
    ("\\boxed{" * 20000, _boxed("12"), 0.0),
    (_boxed("-3"), _boxed("-3"), 1.0),
    (_boxed("-3"), _boxed("3"), 0.0),
    (_boxed("1,000"), _boxed("1000"), 1.0),
    # math-verify compares numerically within a small relative tolerance:
    (_boxed("2\\pi"), _boxed("6.283185"), 1.0),
    (_boxed("2\\pi"), _boxed("2 \\pi"), 1.0),
    (_boxed("x = 5"), _boxed("5"), 1.0),
    (_boxed("50\\%"), _boxed("0.5"), 1.0),
    (_boxed("\\frac{8}{2}"), _boxed("4"), 1.0),
]


# Answers math-verify cannot read as written: a Unicode degree sign, a unit in CJK ideographs
# (normalised first: maye_jax.rl.rewards.normalize_answer).
NORMALISED_ACCURACY_CASES = [
    (_boxed("60°"), _boxed("60"), 1.0),
    (_boxed("60 °"), _boxed("60^\\circ"), 1.0),
    (_boxed("60^°"), _boxed("60"), 1.0),
    (_boxed("\\angle A = 60°"), _boxed("60"), 1.0),
    (_boxed("45°"), _boxed("60"), 0.0),
    (_boxed("60"), _boxed("60°"), 1.0),  # the gold side is normalised too
    (_boxed("20\u5398\u7c73"), _boxed("20"), 1.0),  # 20 厘米 (cm)
    (_boxed("20 \u5e73\u65b9\u5398\u7c73"), _boxed("20"), 1.0),  # 20 平方厘米 (cm^2)
    (_boxed("x=20\u5398\u7c73"), _boxed("20"), 1.0),
    (_boxed("3\\sqrt{2}\u7c73"), _boxed("\\sqrt{18}"), 1.0),  # 米 (m)
    (_boxed("60\u5ea6"), _boxed("60^\\circ"), 1.0),  # 度 (degrees)
    (_boxed("20\u5398\u7c73"), _boxed("30"), 0.0),
    (_boxed("20"), _boxed("20\u4e2a"), 1.0),  # 个 (a counter)
    (_boxed("\u65e0\u89e3"), _boxed("20"), 0.0),  # 无解 (no solution): nothing left to parse
    (_boxed("\u65e0\u89e3"), _boxed("\u65e0\u89e3"), 1.0),  # identical strings
    (_boxed("\u4e2d\u6587 5"), _boxed("5"), 0.0),  # CJK before the number is not a unit
]


def test_accuracy_normalises_degree_signs_and_cjk_units(pool):
    responses, solutions, expected = zip(*NORMALISED_ACCURACY_CASES, strict=True)
    scores = rewards.accuracy_rewards(list(responses), list(solutions), timeout_s=10.0, pool=pool)
    wrong = [
        (r, s, want, got)
        for r, s, want, got in zip(responses, solutions, expected, scores, strict=True)
        if got != want
    ]
    assert not wrong


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("60\u00b0", "60^{\\circ}"),
        ("60 \u00b0", "60^{\\circ}"),
        ("20 \u5e73\u65b9\u5398\u7c73 ", "20"),
        ("\u4e2d 5", "\u4e2d 5"),
        ("\u65e0\u89e3", ""),
        ("12", "12"),
    ],
)
def test_normalize_answer(answer, expected):
    assert rewards.normalize_answer(answer) == expected


def test_normalize_answer_is_linear_on_long_cjk_runs():
    started = time.perf_counter()
    assert rewards.normalize_answer("\u4e2d" * 1_000_000 + "x").endswith("x")
    assert rewards.normalize_answer("5" + "\u4e2d" * 1_000_000) == "5"
    assert time.perf_counter() - started < 2.0


def test_accuracy_reward_second_table():
    responses, solutions, expected = zip(*MORE_ACCURACY_CASES, strict=True)
    scores = rewards.accuracy_rewards(list(responses), list(solutions), timeout_s=5.0)
    wrong = [
        (r[:40], s, want, got)
        for r, s, want, got in zip(responses, solutions, expected, scores)
        if got != want
    ]
    assert not wrong
    assert len(ACCURACY_CASES) + len(MORE_ACCURACY_CASES) >= 40
