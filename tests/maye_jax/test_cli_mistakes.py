"""Every command-line tool meets a user's mistakes the same way: no traceback, the last line of
stderr `<command>: error: ...` naming the mistake, exit status 1, and nothing written. And
`--help` lists every option of a run, generated from their single declaration.

The tools run in this process (`run_tool`: the module as `__main__`, as `python -m` runs it),
so a row costs what its refusal costs, not a Python and JAX start."""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
from absl import app, flags

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.py")
app.define_help_flags()
BASE_FLAGS = set(flags.FLAGS)  # the flags of this process; a tool's own are removed after it


@pytest.fixture
def run_tool(capsys, monkeypatch):
    """run_tool(module, *args) -> (exit status, stdout, stderr) of `python -m module *args`,
    in this process; the tool's flags and logging set-up are undone afterwards."""
    ours = logging.getLogger("maye_jax")
    saved = (ours.handlers[:], ours.level, ours.propagate)

    def run(module: str, *args: str) -> tuple[int, str, str]:
        for name in set(flags.FLAGS) - BASE_FLAGS:
            delattr(flags.FLAGS, name)
        monkeypatch.setattr(sys, "argv", [module, *args])
        capsys.readouterr()
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            ours.handlers[:], ours.level, ours.propagate = saved[0][:], saved[1], saved[2]
        out = capsys.readouterr()
        return status, out.out, out.err

    yield run
    for name in set(flags.FLAGS) - BASE_FLAGS:
        delattr(flags.FLAGS, name)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def inputs(module_scratch):
    """A folder of what the rows read: a data file with one long prompt, an empty one, a
    folder that looks like a model, a non-empty output folder."""
    folder = module_scratch("mistakes")
    record = dict(question="Find x. " * 200, answer="1", solution="\\boxed{1}")
    (folder / "long.jsonl").write_text(
        json.dumps(dict(record, id="long"))
        + "\n"
        + json.dumps(dict(record, id="short", question="Find x."))
        + "\n"
    )
    (folder / "empty.jsonl").write_text("")
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text("{}")
    (folder / "model" / "model.safetensors").write_bytes(b"")
    (folder / "full").mkdir()
    (folder / "full" / "kept.txt").write_text("a user's file")
    return folder


READ_ONLY = "/sys/maye-jax-test"  # a folder nothing can be created in, root or not

# (command name, module, arguments ({in}: the inputs folder), the error's expected text)
MISTAKES = [
    (
        "train",
        "maye_jax.train",
        [f"--config={DEMO}", "--config.rl.batch_szie=8"],
        "--config.rl.batch_szie: unknown option; did you mean --config.rl.batch_size?",
    ),
    (
        "train",
        "maye_jax.train",
        [f"--config={DEMO}", "--config.rl.batch_size=eight"],
        "--config.rl.batch_size",
    ),
    (
        "train",
        "maye_jax.train",
        [f"--config={DEMO}", f"--config.output_dir={READ_ONLY}"],
        f"config.output_dir: {READ_ONLY}: cannot write there",
    ),
    (
        "train",
        "maye_jax.train",
        [
            f"--config={DEMO}",
            "--config.output_dir={in}/run",
            "--config.data.synth_dir=None",
            "--config.data.train_file={in}/long.jsonl",
            "--config.eval.enabled=False",
            "--config.data.max_prompt_tokens=300",
        ],
        "config.data.max_prompt_tokens: 1 of the 2 records of train ({in}/long.jsonl) have "
        "prompts longer than 300 tokens (long: ",
    ),
    (
        "sft",
        "maye_jax.sft",
        ["--config=no/such/config.py"],
        "--config=no/such/config.py: no such file",
    ),
    (
        "experiment",
        "maye_jax.experiment",
        [f"--config={DEMO}", "--config.experiment.seedz=2"],
        "--config.experiment.seedz: unknown option; did you mean --config.experiment.seeds?",
    ),
    (
        "evaluate",
        "maye_jax.evaluate",
        ["--model={in}/nothing", "--data={in}/long.jsonl"],
        "--model: {in}/nothing: neither an HF model directory",
    ),
    (
        "evaluate",
        "maye_jax.evaluate",
        ["--model={in}/model", "--data={in}/long.jsonl", "--prompt_template=nope"],
        "--prompt_template: 'nope': unknown; known: ",
    ),
    (
        "score",
        "maye_jax.score",
        [
            "--model={in}/model",
            "--data={in}/long.jsonl",
            "--output={in}/scores.jsonl",
            "--temperature=0",
        ],
        "--temperature=0.0: must be > 0",
    ),
    (
        "score",
        "maye_jax.score",
        ["--model={in}/model", "--data={in}/long.jsonl", "--output=/sys/scores.jsonl"],
        "--output: /sys/scores.jsonl: cannot write in /sys",
    ),
    (
        "convert",
        "maye_jax.convert",
        ["--input={in}/model", "--output={in}/out", "--fsdp=64"],
        "--fsdp=64: JAX sees ",
    ),
    (
        "convert",
        "maye_jax.convert",
        ["--input={in}/model", "--output={in}/full"],
        "--output: {in}/full is not empty",
    ),
    ("synth", "maye_jax.synth", [f"--out={READ_ONLY}"], f"--out: {READ_ONLY}: cannot write"),
    (
        "data check",
        "maye_jax.data",
        ["check", "{in}/empty.jsonl"],
        "1 problem(s) in 1 file(s), each listed above",
    ),
    ("report", "maye_jax.report", ["{in}/nothing", "--out={in}/report"], "{in}/nothing"),
    ("report", "maye_jax.report", [], "usage: python -m maye_jax.report"),
]


@pytest.mark.parametrize(
    "name, module, args, expected", MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES)]
)
def test_a_mistake_is_one_line_exit_1_and_nothing_written(
    name, module, args, expected, inputs, run_tool
):
    before = _tree(inputs)
    status, _, err = run_tool(module, *(a.replace("{in}", str(inputs)) for a in args))
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{name}: error: "), err
    assert expected.replace("{in}", str(inputs)) in last, last
    assert status == 1
    assert _tree(inputs) == before  # nothing written, nothing removed
    assert sorted(p.name for p in inputs.iterdir()) == sorted(
        ["long.jsonl", "empty.jsonl", "model", "full"]
    )


def test_help_lists_every_option_with_its_type_default_and_meaning(run_tool):
    from maye_jax.config.options import all_options, option_lines

    for module in ("maye_jax.train", "maye_jax.sft"):
        status, out, _ = run_tool(module, "--help")
        assert status == 0
        listed = [line.strip() for line in out.splitlines()]
        assert all(line.strip() in listed for line in option_lines()), module
    assert len(option_lines()) == len(all_options())
    batch = next(line for line in listed if line.startswith("rl.batch_size "))
    assert batch.split()[:3] == ["rl.batch_size", "int", "896"]
    assert batch.endswith("responses per generation step (global)")
    status, out, _ = run_tool("maye_jax.evaluate", "--helpfull")
    assert status == 0 and "--max_pixels" in out and "--prompt_template" in out
