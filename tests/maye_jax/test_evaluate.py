"""The evaluation scheme's aggregation: any-of-k per prompt, keys per split and setting."""

from __future__ import annotations

from maye_jax.data import Record
from maye_jax.evaluate import SETTINGS, evaluate_split, sampling_for
from maye_jax.rollout.engine import Completion


class FakeProcessor:
    def encode(self, image, question, instruction):
        return {"input_ids": [1, 2, 3], "pixel_values": None, "image_grid_thw": None}


class FakeEngine:
    """Answers prompt i with the i-th row of canned texts, n samples per prompt."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, sampling, *, step=0):
        return [
            [
                Completion([1], [-0.1], self.answers[i][j % len(self.answers[i])], "stop")
                for j in range(sampling.n)
            ]
            for i in range(len(prompts))
        ]


def _records(n):
    return [
        Record(
            id=str(i),
            question="q",
            answer=str(i),
            solution=f"\\boxed{{{i}}}",
            image_path=None,
            source=f"f:{i}",
            fields={},
        )
        for i in range(n)
    ]


def test_settings_are_the_papers():
    assert sampling_for("pass@8_t1.0", max_tokens=16, seed=0, stop_token_ids=(1,)).n == 8
    greedyish = sampling_for("pass@1_t0.01", max_tokens=16, seed=0, stop_token_ids=(1,))
    assert (greedyish.n, greedyish.temperature, greedyish.top_p) == (1, 0.01, 0.001)
    assert SETTINGS["pass@1_t0.6"] == dict(n=1, temperature=0.6, top_p=1.0)


def test_pass_at_k_is_any_of_k():
    # Samples cycle through each prompt's texts: prompt 0 is right at samples 2 and 5 of 8,
    # prompt 1 never, prompt 2 at samples 0, 2, 4, 6.
    answers = [
        ["\\boxed{5}", "\\boxed{7}", "\\boxed{0}"],
        ["\\boxed{9}"],
        ["\\boxed{2}", "\\boxed{3}"],
    ]
    engine = FakeEngine(answers)
    metrics, rows = evaluate_split(
        engine,
        FakeProcessor(),
        _records(3),
        split="validation",
        settings=["pass@8_t1.0", "pass@1_t0.6"],
        max_tokens=8,
        seed=0,
        step=0,
        instruction="",
        batch_size=3,
    )
    assert metrics["eval/validation/pass@8_t1.0"] == 2 / 3
    # pass@1 uses the first sample only: prompt 0 wrong, prompt 1 wrong, prompt 2 right.
    assert metrics["eval/validation/pass@1_t0.6"] == 1 / 3
    assert len(rows) == 3 * 8 + 3
    assert sum(r["correct"] for r in rows if r["setting"] == "pass@8_t1.0") == 2 + 0 + 4
