"""The evaluation scheme's aggregation: any-of-k per prompt, keys per split and setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
from tests.vllm_env import require_vllm_python


class FakeProcessor:
    def encode_record(self, record, instruction):
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


# The SFT-warmed model (tests/golden/warm_model.py) answers the sum question surely with
# `3 + 4 = \\boxed{7}`, whatever the record says: right for the record whose answer is 7, wrong
# for the one whose answer is 8, so every setting's accuracy is exactly 1/2 (any of 8 samples
# at temperature 1; the near-greedy one).
SURE_RECORDS = ("validation-sum-7", "validation-sum-8")
KNOWN = {"eval/validation/pass@8_t1.0": 0.5, "eval/validation/pass@1_t0.01": 0.5}
SURE_ANSWER = "3 + 4 = \\boxed{7}"


def sure_records_file(warm_model) -> Path:
    """The two sum records of the warmed model's validation set, beside its images."""
    _, files = warm_model
    lines = files["validation"].read_text().splitlines()
    path = files["validation"].parent / "sure.jsonl"
    path.write_text(
        "".join(line + "\n" for line in lines if json.loads(line)["id"] in SURE_RECORDS)
    )
    return path


def sure_records_folder(warm_model, folder: Path) -> Path:
    """The same two records as a `datasets` save_to_disk folder with their PNG bytes embedded
    (the MAYE layout's columns; no image file beside it)."""
    import datasets

    source = sure_records_file(warm_model)
    records = [json.loads(line) for line in source.read_text().splitlines()]
    for record in records:
        record["image"] = {"bytes": (source.parent / record["image"]).read_bytes(), "path": None}
    features = datasets.Features(
        {key: datasets.Value("string") for key in records[0] if key != "image"}
        | {"image": datasets.Image()}
    )
    datasets.Dataset.from_list(records, features=features).save_to_disk(str(folder))
    return folder


def assert_known_answers(metrics: dict, rows: list[dict]) -> None:
    assert metrics == KNOWN
    greedy = [r for r in rows if r["setting"] == "pass@1_t0.01"]
    assert [(r["id"], r["response"], r["correct"]) for r in greedy] == [
        ("validation-sum-7", SURE_ANSWER, True),
        ("validation-sum-8", SURE_ANSWER, False),
    ]
    sampled = [r for r in rows if r["setting"] == "pass@8_t1.0"]
    assert len(sampled) == 16 and not any(r["correct"] for r in sampled[8:])
    assert sum(r["response"] == SURE_ANSWER for r in sampled) >= 12  # sure, even at T = 1


def test_evaluate_cli_through_vllm_scores_the_known_answers_of_the_warmed_model(
    warm_model, tmp_path
):
    """`python -m maye_jax.evaluate --engine=vllm` (the vLLM worker) on an HF folder, reading a
    `datasets` save_to_disk folder with embedded images (the format is inferred from the path):
    its progress, the metrics on stdout and the responses file hold the known answers (the
    same records as jsonl give them through the JAX sampler and the hf worker below)."""
    require_vllm_python()
    model_dir, _ = warm_model
    out = tmp_path / "responses.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maye_jax.evaluate",
            f"--model={model_dir}",
            f"--data={sure_records_folder(warm_model, tmp_path / 'sure_arrow')}",
            "--split=validation",
            "--engine=vllm",
            f"--settings={','.join(s.split('/')[-1] for s in KNOWN)}",
            "--max_tokens=16",
            "--dtype=float32",
            "--prompt_template=plain",
            f"--output={out}",
        ],
        capture_output=True,
        text=True,
        timeout=900,  # generous: the vLLM worker's start took 30-60 s on 2 cores
        env=dict(os.environ, JAX_PLATFORMS="cpu", VLLM_LOGGING_LEVEL="WARNING"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # progress on stderr (the model's tensors, then 2 prompts x 9 samples), JSON on stdout
    assert "read model: 100%" in result.stderr and "eval validation: 100%" in result.stderr
    assert "18/18" in result.stderr
    metrics = json.loads(result.stdout[result.stdout.index("{") :])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert_known_answers(metrics, rows)


@pytest.mark.parametrize("kind", ["jax", "hf"])
def test_evaluation_in_process_scores_the_known_answers(kind, warm_model):
    """The same records through the in-process JAX sampler and the hf worker."""
    from maye_jax.config.settings import RolloutSettings
    from maye_jax.data.processor import load_processor
    from maye_jax.data.records import read_records
    from maye_jax.models.configs import ModelConfig
    from maye_jax.rollout.factory import make_engine
    from maye_jax.storage.model_folders import load_model

    model_dir, _ = warm_model
    processor = load_processor(str(model_dir))
    model, hf_config = load_model(model_dir) if kind == "jax" else (None, None)
    engine = make_engine(
        kind,
        model=model,
        config=None if hf_config is None else ModelConfig.from_hf(hf_config),
        tokenizer=processor.tokenizer,
        model_dir=str(model_dir),
        rollout=RolloutSettings(engine=kind),
        dtype="float32",
    )
    try:
        metrics, rows = evaluate_split(
            engine,
            processor,
            read_records(sure_records_file(warm_model)),
            split="validation",
            settings=[s.split("/")[-1] for s in KNOWN],
            max_tokens=16,
            seed=0,
            step=0,
            instruction="",
            progress=False,
        )
    finally:
        engine.close()
    assert_known_answers(metrics, rows)
