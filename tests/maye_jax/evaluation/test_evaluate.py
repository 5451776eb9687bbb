"""The evaluation scheme's aggregation: any-of-k per prompt, keys per split and setting."""

from __future__ import annotations

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import load_settings
from maye_jax.data.records import Record
from maye_jax.evaluation.evaluate import (
    SETTINGS,
    evaluate_configured_splits,
    evaluate_split,
    sampling_for,
)
from maye_jax.rollout.engine import Completion
from tests.fake_engines import fake_draw


class FakeProcessor:
    def encode(self, image, question, instruction):
        return {"input_ids": [1, 2, 3], "pixel_values": None, "image_grid_thw": None}


class FakeEngine:
    """Answers prompt i (the split's record first_index + i) with one of its canned texts per
    sample, drawn as a real engine samples (`fake_draw`: seed, step, global prompt index, sample
    index, temperature, top-p): with equal logits temperature 1 draws any text and
    pass@1_t0.01's top-p 0.001 keeps only the first. Records every call."""

    def __init__(self, answers):
        self.answers = answers
        self.calls: list[tuple[int, int, int]] = []  # (step, first_index, rows)

    def generate(self, prompts, sampling, *, step=0, first_index=0):
        self.calls.append((step, first_index, len(prompts)))
        completions = []
        for index in range(first_index, first_index + len(prompts)):
            texts, row = self.answers[index], []
            for sample in range(sampling.n):
                choice, logprob = fake_draw(
                    [0.0] * len(texts), sampling, step=step, prompt_index=index, sample_index=sample
                )
                row.append(Completion([1], [logprob], texts[choice], "stop"))
            completions.append(row)
        return completions

    def drawn(self, setting: str, step: int, index: int, seed: int = 0) -> list[str]:
        """The texts a real engine would give record `index` under `setting` at `step`."""
        sampling = sampling_for(setting, max_tokens=8, seed=seed, stop_token_ids=(1,))
        texts = self.answers[index]
        return [
            texts[
                fake_draw(
                    [0.0] * len(texts), sampling, step=step, prompt_index=index, sample_index=sample
                )[0]
            ]
            for sample in range(sampling.n)
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


ANSWERS = [  # record i's answer is i: prompt 0 is right with its third text, 1 never, 2 first
    ["\\boxed{5}", "\\boxed{7}", "\\boxed{0}"],
    ["\\boxed{9}"],
    ["\\boxed{2}", "\\boxed{3}"],
]


def evaluate_fake(settings, *, seed=0, batch_size=3, split="validation"):
    engine = FakeEngine(ANSWERS)
    metrics, rows = evaluate_split(
        engine,
        FakeProcessor(),
        _records(3),
        split=split,
        settings=settings,
        max_tokens=8,
        seed=seed,
        step=0,
        instruction="",
        batch_size=batch_size,
    )
    return engine, metrics, rows


def test_pass_at_k_is_any_of_k():
    settings = ["pass@8_t1.0", "pass@1_t0.01"]
    engine, metrics, rows = evaluate_fake(settings)
    assert [(first, n) for _, first, n in engine.calls] == [(0, 3), (0, 3)]
    pass_at_8_step, pass_at_1_step = (step for step, _, _ in engine.calls)
    assert pass_at_8_step != pass_at_1_step  # the settings draw independently
    # The rows are the engine's draws, in order, scored against each record's answer.
    expected = {
        setting: [engine.drawn(setting, step, i) for i in range(3)]
        for setting, step in zip(settings, (pass_at_8_step, pass_at_1_step))
    }
    for setting in settings:
        ours = [r["response"] for r in rows if r["setting"] == setting]
        assert ours == [text for texts in expected[setting] for text in texts]
    right = ["\\boxed{0}", None, "\\boxed{2}"]
    any_right = [right[i] in expected["pass@8_t1.0"][i] for i in range(3)]
    assert any_right == [True, False, True]  # prompt 0's right text is drawn at least once
    assert metrics["eval/validation/pass@8_t1.0"] == 2 / 3
    # Not every sample of prompts 0 and 2 is right: any-of-8, not all-of-8 nor sample-mean.
    assert 0 < sum(r["correct"] for r in rows if r["setting"] == "pass@8_t1.0") < 8 + 8
    # pass@1_t0.01: top-p 0.001 keeps the most likely text only (the first of equal ones):
    # prompt 0 wrong, prompt 1 wrong, prompt 2 right.
    assert expected["pass@1_t0.01"] == [["\\boxed{5}"], ["\\boxed{9}"], ["\\boxed{2}"]]
    assert metrics["eval/validation/pass@1_t0.01"] == 1 / 3
    assert len(rows) == 3 * 8 + 3


def test_samples_follow_the_seed_and_the_global_prompt_index():
    """The same seed gives the same samples whatever the batch size (each record draws with its
    global index); another seed or another split gives other samples."""
    responses = {}
    for key, kwargs in {
        "batch 3": {},
        "batch 2": dict(batch_size=2),
        "batch 1": dict(batch_size=1),
        "seed 1": dict(seed=1),
        "test split": dict(split="test"),
    }.items():
        _, _, rows = evaluate_fake(["pass@8_t1.0"], **kwargs)
        responses[key] = [r["response"] for r in rows]
    assert responses["batch 3"] == responses["batch 2"] == responses["batch 1"]
    assert responses["seed 1"] != responses["batch 3"]
    assert responses["test split"] != responses["batch 3"]


def test_progress_bar_counts_every_sample_and_logging_progress_bar_turns_it_off(capsys):
    """One bar per split on stderr over prompts x samples of every setting (3 x (8+1+1)),
    none with `logging.progress_bar=False`; the metrics are the same either way."""
    # prompt 0 is right with its second text (among its 8 draws, not as its pass@1_t0.6 draw
    # nor as pass@1_t0.01's first text), prompt 1 never, prompt 2 always
    answers = [["\\boxed{5}", "\\boxed{0}"], ["\\boxed{9}"], ["\\boxed{2}"]]
    results = {}
    for progress_bar in (True, False):
        c = default_config()
        c.model.tiny_family = "qwen2_vl"
        c.eval.splits = ("validation",)
        c.logging.progress_bar = progress_bar
        metrics = evaluate_configured_splits(
            FakeEngine(answers),
            FakeProcessor(),
            {"validation": _records(3), "train": _records(1)},
            load_settings(c, kind="rl", check_files=False),  # the data is in memory
            step=0,
            instruction="",
        )
        results[progress_bar] = (metrics, capsys.readouterr())
    (metrics, shown), (quiet_metrics, quiet) = results[True], results[False]
    assert (
        metrics
        == quiet_metrics
        == {
            "eval/validation/pass@8_t1.0": 2 / 3,
            "eval/validation/pass@1_t0.6": 1 / 3,
            "eval/validation/pass@1_t0.01": 1 / 3,
        }
    )
    assert "eval validation: 100%" in shown.err and "30/30" in shown.err
    assert shown.out == quiet.out == quiet.err == ""


def test_evaluate_cli_on_an_hf_directory(tmp_path):
    """`python -m maye_jax.evaluate` on a tiny HF model: every setting's key, accuracy in [0, 1],
    and the responses file (one line per sample)."""
    import json
    import os
    import subprocess
    import sys

    from maye_jax.data.processor import load_processor
    from maye_jax.data.synth import generate
    from maye_jax.tiny import tiny_hf_model

    model_dir = tmp_path / "model"
    tiny_hf_model("qwen2_vl", vocab_size=151936, seed=0, initializer_range=0.2).save_pretrained(
        str(model_dir)
    )
    load_processor(family="qwen2_vl").save_pretrained(model_dir)
    data = generate(
        tmp_path / "data", "text_dominant", num_train=1, num_validation=2, num_test=1, image_size=56
    )["validation"]
    out = tmp_path / "responses.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maye_jax.evaluate",
            f"--model={model_dir}",
            f"--data={data}",
            "--split=validation",
            "--max_tokens=4",
            "--dtype=float32",
            f"--output={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # progress on stderr (the model's tensors, then 2 prompts x 10 samples), JSON on stdout
    assert "read model: 100%" in result.stderr and "eval validation: 100%" in result.stderr
    assert "20/20" in result.stderr
    metrics = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(metrics) == {f"eval/validation/{s}" for s in SETTINGS}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * (8 + 1 + 1)
