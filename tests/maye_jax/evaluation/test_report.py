"""Tests for maye_jax/report.py and maye_jax/plots.py on small fixture run directories.

The fixtures are written in the trainer's format (run.json + metrics.jsonl, ARCHITECTURE.md):
an RL group of three seeds and an SFT group of two, with hand-chosen evaluation numbers.

Over ~500 lines on purpose: the tables' and plots' tests share the fixture run folders.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from maye_jax.evaluation import plots, reflection_curves, report
from maye_jax.evaluation.scheme import REFLECTION_RATIO_NAMES, REFLECTION_WORDS

REPO_ROOT = Path(__file__).resolve().parents[3]
SETTINGS = ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01")
STEPS_PER_EPOCH = 2

# test / pass@1_t0.6, epochs 0..E: the hand-computed cells of test_table_hand_computed_row.
RL_TEST_T06 = {
    0: [0.20, 0.30, 0.50, 0.40],
    1: [0.20, 0.40, 0.40, 0.40],
    2: [0.26, 0.10, 0.40, 0.70],
}
SFT_TEST_T06 = {0: [0.22, 0.10, 0.30], 1: [0.22, 0.20, 0.20]}


def config_for(*, report_group="", validation="geo_val.jsonl", test="geo_test.jsonl"):
    """The part of the trainer's config that the report reads."""
    return {
        "report_group": report_group,
        "data": {
            "train_file": "geo_train.jsonl",
            "validation_file": validation,
            "test_file": test,
            "synth_dir": "",
            "synth_flavour": "text_dominant",
        },
        "model": {"path": "/models/Qwen2.5-VL-7B-Instruct", "tiny_family": ""},
    }


def eval_values(kind, seed, split, setting, num_epochs):
    """Accuracy per epoch 0..E: the hand table for test/T0.6, a seed-dependent pattern otherwise."""
    hand = (RL_TEST_T06 if kind == "rl" else SFT_TEST_T06).get(seed, [])
    if (split, setting) == ("test", "pass@1_t0.6") and len(hand) == num_epochs + 1:
        return hand
    offset = 0.1 * SETTINGS.index(setting) + (0.05 if split == "test" else 0.0)
    return [
        round(offset + 0.03 * epoch + 0.01 * ((seed * 7 + epoch * 3) % 5), 4)
        for epoch in range(num_epochs + 1)
    ]


def eval_line(kind, seed, epoch, num_epochs):
    return {
        f"eval/{split}/{setting}": eval_values(kind, seed, split, setting, num_epochs)[epoch]
        for split in ("validation", "test")
        for setting in SETTINGS
    }


# The per-step training metrics of an RL line (metrics.jsonl keys), each a known function of
# (step, seed) so the plotted seed means can be checked: see train_value.
TRAIN_KEYS = (
    "train/reward/total",
    "train/reward/accuracy",
    "train/reward/language",
    "loss/policy",
    "loss/kl",
    "loss/total",
    "kl/k3",
    "clip_frac/low",
    "clip_frac/high",
    "ratio/mean",
    "approx_kl",
    "entropy",
    "grad_norm",
    "lr",
    "response_length/clip_ratio",
    "mismatch/logprob_abs_mean",
    "mismatch/logprob_abs_max",
)


def train_value(key, step, seed):
    index = TRAIN_KEYS.index(key)
    return round(0.1 * index + 0.01 * step * (index % 3 + 1) + 0.003 * seed, 6)


def warmup_loss(step, seed):
    return 5.0 / step + 0.2 * seed


def rl_lines(seed, num_epochs):
    lines = [{"generation_step": 0, "epoch": 0, **eval_line("rl", seed, 0, num_epochs)}]
    for step in range(1, num_epochs * STEPS_PER_EPOCH + 1):
        epoch = (step - 1) // STEPS_PER_EPOCH + 1
        line = {
            "generation_step": step,
            "epoch": epoch,
            "train/accuracy": 0.1 * step,
            "response_length/mean": 100.0 + 10 * step + seed,
            **{key: train_value(key, step, seed) for key in TRAIN_KEYS},
        }
        for index, name in enumerate(REFLECTION_RATIO_NAMES):
            line[f"reflection/{name}"] = 0.1 * index + 0.02 * step + 0.01 * seed
        for index, word in enumerate(REFLECTION_WORDS):
            line[f"reflection/count/{word}"] = float(index + step + seed)
        if step % STEPS_PER_EPOCH == 0:
            line["train/epoch_accuracy"] = 0.2 + 0.1 * epoch + 0.02 * seed
            line.update(eval_line("rl", seed, epoch, num_epochs))
        lines.append(line)
    return lines


def sft_lines(seed, num_epochs):
    lines = [{"generation_step": 0, "epoch": 0, **eval_line("sft", seed, 0, num_epochs)}]
    for step in range(1, num_epochs * STEPS_PER_EPOCH + 1):
        epoch = (step - 1) // STEPS_PER_EPOCH + 1
        line = {
            "generation_step": step,
            "epoch": epoch,
            "sft/loss": 2.0 / step + 0.1 * seed,
            "sft/grad_norm": 1.0,
            "sft/lr": 1e-5,
        }
        if step % STEPS_PER_EPOCH == 0:
            line.update(eval_line("sft", seed, epoch, num_epochs))
        lines.append(line)
    return lines


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_run(run_dir, *, name, seed, kind, lines, config=None, finished=True, total_steps=None):
    """run.json as the harness writes it (`total_steps`: the last step of `lines` unless given;
    `finished=None` leaves both fields out, as older run.json files) and metrics.jsonl."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    record = dict(name=name, seed=seed, kind=kind, config=config or config_for())
    record.update(git_sha=None, versions={}, devices=["cpu"])
    if finished is not None:
        last_step = max(line["generation_step"] for line in lines)
        record.update(total_steps=total_steps or last_step, finished=finished)
    (run_dir / "run.json").write_text(json.dumps(record))
    write_lines(run_dir / "metrics.jsonl", lines)
    return run_dir


def write_paper_runs(
    root, *, with_sft=True, rl_name="geo", sft_name="geo_sft", config=None, warmup=True
):
    """RL seeds 0-2 (named per seed, 3 epochs, each after a 4-step SFT warm-up) and SFT seeds
    0-1 (one name, 2 epochs)."""
    for seed in range(3):
        run_dir = write_run(
            Path(root) / f"{rl_name}_seed{seed}",
            name=f"{rl_name}_seed{seed}",
            seed=seed,
            kind="rl",
            lines=rl_lines(seed, 3),
            config=config,
        )
        if warmup:
            write_lines(
                run_dir / "sft_warmup" / "metrics.jsonl",
                [
                    {"generation_step": step, "epoch": 1, "sft/loss": warmup_loss(step, seed)}
                    for step in range(1, 5)
                ],
            )
    if with_sft:
        for seed in range(2):
            write_run(
                Path(root) / "sft" / f"s{seed}",
                name=sft_name,
                seed=seed,
                kind="sft",
                lines=sft_lines(seed, 2),
                config=config,
            )
    return Path(root)


def table_row(markdown, split, setting_label):
    prefix = f"| {split} | {setting_label} |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, markdown
    return [cell.strip() for cell in rows[0].strip("|").split("|")][2:]


def test_table_hand_computed_row(tmp_path):
    """test / pass@1 T=0.6: the cells worked out by hand from RL_TEST_T06 and SFT_TEST_T06."""
    root = write_paper_runs(tmp_path / "runs")
    result = report.build_report([root], tmp_path / "report", plots=False)
    # Untrained: RL epoch 0 = 0.20, 0.20, 0.26 -> mean 0.22, std sqrt(0.0008) = 0.0283.
    # RL per-seed mean over epochs 1-3: 0.40, 0.40, 0.40 -> 0.40 +- 0.
    # RL per-seed max: 0.50, 0.40, 0.70 -> mean 0.5333, std sqrt(0.04667 / 3) = 0.1247.
    # SFT per-seed mean over epochs 1-2: 0.20, 0.20; max 0.30, 0.20 -> 0.25 +- 0.05.
    assert table_row(result["markdown"], "test", "pass@1 T=0.6") == [
        "22.0 ± 2.8",
        "40.0 ± 0.0",
        "53.3 ± 12.5",
        "20.0 ± 0.0",
        "25.0 ± 5.0",
    ]
    (comparison,) = json.loads((tmp_path / "report" / "summary.json").read_text())["comparisons"]
    cells = comparison["table"]["test"]["pass@1_t0.6"]
    assert cells["Untrained"]["mean"] == pytest.approx(0.22)
    assert cells["Untrained"]["std"] == pytest.approx(math.sqrt(0.0008))
    assert cells["RL max"]["mean"] == pytest.approx(1.6 / 3)
    # deviations from 16/30: -1/30, -4/30, 5/30 -> variance 42/900/3
    assert cells["RL max"]["std"] == pytest.approx(math.sqrt(14) / 30)
    assert cells["RL max"]["per_seed"] == pytest.approx([0.5, 0.4, 0.7])
    assert cells["SFT untrained"]["mean"] == pytest.approx(0.22)
    assert comparison["rl"]["seeds"] == [0, 1, 2]
    assert comparison["sft"]["seeds"] == [0, 1]
    assert (tmp_path / "report" / "table.md").read_text() == result["markdown"]


def test_every_cell_is_the_seed_mean_of_per_seed_epoch_statistics(tmp_path):
    root = write_paper_runs(tmp_path / "runs")
    summary = report.build_report([root], tmp_path / "report", plots=False)["summary"]
    table = summary["comparisons"][0]["table"]
    for split in ("validation", "test"):
        for setting in SETTINGS:
            for kind, seeds, epochs in (("rl", range(3), 3), ("sft", range(2), 2)):
                values = np.array([eval_values(kind, s, split, setting, epochs) for s in seeds])
                # values: [seed, epoch 0..E]
                expected = {
                    f"{kind.upper()} mean": values[:, 1:].mean(axis=1),
                    f"{kind.upper()} max": values[:, 1:].max(axis=1),
                }
                if kind == "rl":
                    expected["Untrained"] = values[:, 0]
                for column, per_seed in expected.items():
                    cell = table[split][setting][column]
                    assert cell["mean"] == pytest.approx(per_seed.mean()), (split, setting, column)
                    assert cell["std"] == pytest.approx(per_seed.std(ddof=0))
                    assert cell["num_seeds"] == len(per_seed)


def test_without_sft_the_sft_columns_are_dashes(tmp_path):
    root = write_paper_runs(tmp_path / "runs", with_sft=False)
    markdown = report.build_report([root], tmp_path / "report", plots=False)["markdown"]
    row = table_row(markdown, "validation", "pass@8 T=1.0")
    assert row[3:] == [report.MISSING, report.MISSING]
    assert all("±" in cell for cell in row[:3])
    assert not (tmp_path / "report" / "geo").exists()  # plots=False


def test_a_seed_without_epoch_0_is_left_out_of_the_untrained_cell_and_marked(tmp_path):
    root = write_paper_runs(tmp_path / "runs", with_sft=False)
    metrics = root / "geo_seed2" / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[1:]))
    markdown = report.build_report([root], tmp_path / "report", plots=False)["markdown"]
    # RL epoch 0 of seeds 0 and 1 only: 0.20, 0.20.
    assert table_row(markdown, "test", "pass@1 T=0.6")[:2] == [
        "20.0 ± 0.0 (2/3 seeds)",
        "40.0 ± 0.0",
    ]


def test_seed_band_keeps_the_steps_every_seed_has():
    x, mean, std = plots.seed_band([{1: 1.0, 2: 2.0, 3: 5.0}, {1: 3.0, 2: 4.0}])
    np.testing.assert_array_equal(x, [1, 2])
    np.testing.assert_allclose(mean, [2.0, 3.0])
    np.testing.assert_allclose(std, [1.0, 1.0])


def colored_fraction(path):
    """Fraction of pixels with a saturated colour: plotted data, not axes, text or background."""
    rgb = mpimg.imread(path)[..., :3]
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    return float((saturation > 0.3).mean())


PLOTS = (
    "training_curves.png",
    "sft_warmup_loss.png",
    "train_accuracy.png",
    "response_length.png",
    "reflection_ratios.png",
    "reflection_and_length.png",
    "reflection_counts.png",
    "sft_loss.png",
    "eval_validation.png",
    "eval_test.png",
)


def test_every_plot_is_written_and_shows_data(cli_report):
    out = cli_report["out"]
    assert sorted(p.name for p in (out / "geo").iterdir()) == sorted(PLOTS)
    for name in PLOTS:
        assert colored_fraction(out / "geo" / name) > 0.002, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparisons"][0]["plots"] == [f"geo/{name}" for name in PLOTS]


def test_colored_fraction_of_a_blank_image_is_zero(tmp_path):
    blank = tmp_path / "blank.png"
    mpimg.imsave(blank, np.ones((50, 50, 3)))
    assert colored_fraction(blank) == 0.0


def test_group_name_drops_only_a_suffix_equal_to_the_seed():
    def run(name, seed):
        return report.Run(Path("."), name=name, seed=seed, kind="rl", config={}, lines=[])

    assert run("geo_seed1", 1).group_name == "geo"
    assert run("geo-s2", 2).group_name == "geo"
    assert run("geo.seed=3", 3).group_name == "geo"
    assert run("geo_seed1", 2).group_name == "geo_seed1"
    assert run("geo", 0).group_name == "geo"
    assert run("seed4", 4).group_name == "seed4"


def test_duplicate_seed_in_a_group_is_an_error(tmp_path):
    root = write_paper_runs(tmp_path / "runs")
    write_run(root / "again", name="geo", seed=1, kind="rl", lines=rl_lines(1, 3))
    with pytest.raises(report.ReportError, match="seed 1 appears twice"):
        report.build_report([root], tmp_path / "report", plots=False)


def test_the_same_run_given_twice_is_counted_once(tmp_path):
    root = write_paper_runs(tmp_path / "runs")
    comparisons = report.pair_groups(
        report.group_runs([report.load_run(p) for p in report.find_run_dirs([root, root / "sft"])])
    )
    assert [c.sft.seeds for c in comparisons] == [[0, 1]]


def test_comparison_key():
    assert report.comparison_key(config_for(report_group="paper-geo")) == "paper-geo"
    assert report.comparison_key(config_for()) == "geo_val+geo_test | Qwen2.5-VL-7B-Instruct"
    synth = {
        "data": {"synth_dir": "runs/x/data", "synth_flavour": "text_dominant"},
        "model": {"path": "", "tiny_family": "qwen2_vl"},
    }
    assert report.comparison_key(synth) == "synth-text_dominant | tiny-qwen2_vl"


def test_seeds_of_a_group_must_share_the_comparison_key(tmp_path):
    root = write_paper_runs(tmp_path / "runs", with_sft=False)
    write_run(
        root / "geo_seed3",
        name="geo_seed3",
        seed=3,
        kind="rl",
        lines=rl_lines(3, 3),
        config=config_for(test="other_test.jsonl"),
    )
    with pytest.raises(report.ReportError, match="config.report_group"):
        report.build_report([root], tmp_path / "report", plots=False)


def test_two_rl_groups_share_the_sft_group_and_two_sft_groups_are_an_error(tmp_path):
    root = write_paper_runs(tmp_path / "runs")
    write_run(root / "grpo", name="geo_grpo", seed=0, kind="rl", lines=rl_lines(0, 3))
    result = report.build_report([root], tmp_path / "report", plots=False)
    titles = [c["title"] for c in result["summary"]["comparisons"]]
    assert titles == ["RL `geo` vs SFT `geo_sft`", "RL `geo_grpo` vs SFT `geo_sft`"]

    write_run(root / "sft2", name="geo_sft_long", seed=0, kind="sft", lines=sft_lines(0, 3))
    with pytest.raises(report.ReportError, match="at most one SFT group"):
        report.build_report([root], tmp_path / "report2", plots=False)


def test_report_group_separates_tables(tmp_path):
    write_paper_runs(tmp_path / "runs", config=config_for(report_group="a"))
    write_paper_runs(
        tmp_path / "runs" / "b",
        rl_name="other",
        sft_name="other_sft",
        config=config_for(report_group="b"),
    )
    summary = report.build_report([tmp_path / "runs"], tmp_path / "report", plots=False)["summary"]
    pairs = {
        c["comparison_key"]: (c["rl"]["name"], c["sft"]["name"]) for c in summary["comparisons"]
    }
    assert pairs == {"a": ("geo", "geo_sft"), "b": ("other", "other_sft")}


def test_run_json_without_seed_is_an_error_naming_the_file(tmp_path):
    run_dir = tmp_path / "runs" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": "x", "kind": "rl"}))
    with pytest.raises(report.ReportError, match=r"bad/run.json: field 'seed' missing"):
        report.build_report([tmp_path / "runs"], tmp_path / "report", plots=False)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "maye_jax.report", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory):
    """The CLI run once on the paper fixture (run directories and a parent folder, mixed)."""
    root = write_paper_runs(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("report")
    done = run_cli(*sorted(root.glob("geo_seed*")), root / "sft", f"--out={out}")
    return {"root": root, "out": out, "done": done}


def test_cli_end_to_end(cli_report):
    done, out = cli_report["done"], cli_report["out"]
    assert done.returncode == 0, done.stderr
    assert (
        "| test | pass@1 T=0.6 | 22.0 ± 2.8 | 40.0 ± 0.0 | 53.3 ± 12.5 | 20.0 ± 0.0 | 25.0 ± 5.0 |"
        in done.stdout
    )
    assert (out / "table.md").read_text().strip() == done.stdout.strip()
    comparison = json.loads((out / "summary.json").read_text())["comparisons"][0]
    assert (comparison["rl"]["seeds"], comparison["sft"]["seeds"]) == ([0, 1, 2], [0, 1])


def test_cli_reports_a_duplicate_seed_as_an_error(tmp_path):
    root = write_paper_runs(tmp_path / "runs", with_sft=False)
    write_run(root / "again", name="geo", seed=0, kind="rl", lines=rl_lines(0, 3))
    failed = run_cli(root, f"--out={tmp_path / 'report'}")
    assert failed.returncode == 1
    assert "report: error:" in failed.stderr and "seed 0 appears twice" in failed.stderr
    assert not (tmp_path / "report").exists()


def test_step_correlation_hand_computed():
    lengths, ratios = [10.0, 20.0, 30.0, 40.0], [0.1, 0.3, 0.2, 0.4]
    lines = [
        {"generation_step": step, "epoch": 1, "len": length, "ratio": ratio}
        for step, (length, ratio) in enumerate(zip(lengths, ratios), start=1)
    ]
    lines.append({"generation_step": 5, "epoch": 1, "len": 50.0})  # no ratio: left out
    # deviations -15, -5, 5, 15 and -0.15, 0.05, -0.05, 0.15: r = 4 / sqrt(500 * 0.05) = 0.8
    assert plots.step_correlation(lines, "len", "ratio") == pytest.approx(0.8)
    constant = [dict(line, ratio=0.0) for line in lines]
    assert math.isnan(plots.step_correlation(constant, "len", "ratio"))
    assert math.isnan(plots.step_correlation(lines[:2], "len", "ratio"))  # 2 steps: no fit


def test_reflection_figure_shows_length_beside_the_ratios(tmp_path):
    root = write_paper_runs(tmp_path / "runs", with_sft=False)
    (group,) = report.group_runs([report.load_run(p) for p in report.find_run_dirs([root])])
    fig = plots._reflection_and_length_figure(group)
    length_ax, ratio_ax, split_ax = fig.axes
    steps = np.arange(1, 3 * STEPS_PER_EPOCH + 1)
    # fixture: length 100 + 10 step + seed, ratio k 0.1 k + 0.02 step + 0.01 seed (seeds 0-2)
    (length_line,) = length_ax.lines
    np.testing.assert_array_equal(length_line.get_xdata(), steps)
    np.testing.assert_allclose(length_line.get_ydata(), 100 + 10 * steps + 1)
    (ratio_line,) = ratio_ax.lines
    np.testing.assert_allclose(ratio_line.get_ydata(), 0.02 * steps + 0.01)
    correct, incorrect = split_ax.lines
    np.testing.assert_allclose(correct.get_ydata(), 0.1 + 0.02 * steps + 0.01)
    np.testing.assert_allclose(incorrect.get_ydata(), 0.2 + 0.02 * steps + 0.01)
    # both grow linearly with the step in every seed: r = 1
    assert "r(length, ratio) = 1.00 ± 0.00" in ratio_ax.get_title()
    assert [text.get_text() for text in split_ax.get_legend().get_texts()] == [
        "correct geo (3 seeds)",
        "incorrect geo (3 seeds)",
    ]


def test_report_states_the_length_reflection_correlation(tmp_path):
    root = write_paper_runs(tmp_path / "runs")
    result = report.build_report([root], tmp_path / "report", plots=False)
    cell = result["summary"]["comparisons"][0]["length_reflection_correlation"]
    assert cell["per_seed"] == pytest.approx([1.0, 1.0, 1.0])
    assert "(Pearson r per seed, mean ± std over seeds): 1.00 ± 0.00." in result["markdown"]

    # A tiny model that never writes a reflection word: a constant ratio, nothing to correlate.
    flat = write_paper_runs(tmp_path / "flat", with_sft=False)
    for metrics in flat.glob("*/metrics.jsonl"):
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        for line in lines:
            if "reflection/reflection_ratio" in line:
                line["reflection/reflection_ratio"] = 0.0
        metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    flat_result = report.build_report([flat], tmp_path / "flat_report", plots=False)
    assert flat_result["summary"]["comparisons"][0]["length_reflection_correlation"] is None
    assert "no correlation to measure" in flat_result["markdown"]


def groups_of(root):
    return report.group_runs([report.load_run(p) for p in report.find_run_dirs([root])])


def band_limits(ax):
    """(lowest, highest) y of the ±std band drawn on `ax` (its one fill_between)."""
    (band,) = ax.collections
    y = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
    return y.min(), y.max()


TRAINING_TITLES = [
    "training accuracy",
    "reward: total",
    "reward: accuracy",
    "reward: language",
    "policy loss",
    "KL loss",
    "total loss",
    "KL to the reference (k3)",
    "approx. KL to the old policy",
    "entropy",
    "grad norm (before clipping)",
    "PPO clip fraction",
    "responses cut at max_tokens",
    "rollout vs trainer logprob, mean |diff|",
    "rollout vs trainer logprob, max |diff|",
]


def test_training_curves_are_the_seed_mean_and_std_of_each_logged_metric(tmp_path):
    (group,) = groups_of(write_paper_runs(tmp_path / "runs", with_sft=False))
    fig = plots._training_figure(group)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == TRAINING_TITLES
    steps = np.arange(1, 3 * STEPS_PER_EPOCH + 1)
    for ax, (title, _, curves) in zip(axes, plots.training_panels(group), strict=True):
        assert len(ax.lines) == len(curves), title
        for line, (key, _, _) in zip(ax.lines, curves, strict=True):
            if key == "train/accuracy":  # 0.1 * step in every seed
                per_seed = np.array([0.1 * steps] * 3)
            else:
                per_seed = np.array(
                    [[train_value(key, s, seed) for s in steps] for seed in (0, 1, 2)]
                )
            # per_seed: [seed, step]
            np.testing.assert_array_equal(line.get_xdata(), steps)
            np.testing.assert_allclose(line.get_ydata(), per_seed.mean(axis=0), err_msg=key)
        if len(curves) == 1:
            mean, std = per_seed.mean(axis=0), per_seed.std(axis=0)
            np.testing.assert_allclose(band_limits(ax), [(mean - std).min(), (mean + std).max()])
    clip = axes[TRAINING_TITLES.index("PPO clip fraction")]
    assert [text.get_text() for text in clip.get_legend().get_texts()] == [
        "low geo (3 seeds)",
        "high geo (3 seeds)",
    ]


def test_a_metric_no_run_logged_gets_no_panel(tmp_path):
    """Runs without a KL term, the low clip fraction or the mismatch, and a reward component
    that only seed 1 logged (null values count as not logged)."""
    dropped = ("loss/kl", "kl/k3", "clip_frac/low", "mismatch/logprob_abs_mean")
    for seed in (0, 1):
        lines = rl_lines(seed, 1)
        for line in lines:
            for key in dropped:
                line.pop(key, None)
            line["mismatch/logprob_abs_max"] = None
            if seed == 1 and line["generation_step"] > 0:
                line["train/reward/penalty"] = -0.1 * line["generation_step"]
        write_run(tmp_path / "runs" / f"s{seed}", name="geo", seed=seed, kind="rl", lines=lines)
    (group,) = groups_of(tmp_path / "runs")
    fig = plots._training_figure(group)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    gone = {"KL loss", "KL to the reference (k3)"} | {t for t in TRAINING_TITLES if "|diff|" in t}
    expected = [t for t in TRAINING_TITLES if t not in gone]
    expected.insert(expected.index("policy loss"), "reward: penalty")
    assert [ax.get_title() for ax in axes] == expected
    (penalty,) = axes[expected.index("reward: penalty")].lines  # seed 1 only: no band width
    np.testing.assert_allclose(penalty.get_ydata(), [-0.1, -0.2])
    (high,) = axes[expected.index("PPO clip fraction")].lines
    assert high.get_label() == "high geo (2 seeds)"
    assert len(fig.axes) == len(expected) == 12  # a 3 x 4 grid, no empty panel

    # An RL group that logged none of the training metrics gets no figure at all.
    only_eval = [{"generation_step": 0, "epoch": 0, **eval_line("rl", 0, 0, 1)}]
    write_run(tmp_path / "bare" / "r", name="bare", seed=0, kind="rl", lines=only_eval)
    (bare,) = groups_of(tmp_path / "bare")
    assert plots._training_figure(bare) is None
    summary = report.build_report([tmp_path / "bare"], tmp_path / "report")["summary"]
    assert summary["comparisons"][0]["plots"] == ["bare/eval_validation.png", "bare/eval_test.png"]


def test_warmup_loss_is_the_seed_mean_of_sft_warmup_metrics(tmp_path):
    (group,) = groups_of(write_paper_runs(tmp_path / "runs", with_sft=False))
    fig = plots._warmup_figure(group)
    (line,) = fig.axes[0].lines
    steps = np.arange(1, 5)
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_allclose(line.get_ydata(), 5.0 / steps + 0.2)  # seeds 0-2: mean 0.2 s
    np.testing.assert_allclose(
        band_limits(fig.axes[0]),
        [5 / 4 + 0.2 - 0.2 * math.sqrt(2 / 3), 5 + 0.2 + 0.2 * math.sqrt(2 / 3)],
    )

    root = write_paper_runs(tmp_path / "no_warmup", with_sft=False, warmup=False)
    summary = report.build_report([root], tmp_path / "report")["summary"]
    assert "geo/sft_warmup_loss.png" not in summary["comparisons"][0]["plots"]
    assert "geo/training_curves.png" in summary["comparisons"][0]["plots"]
    assert not (tmp_path / "report" / "geo" / "sft_warmup_loss.png").exists()


def only_evals(lines, keep):
    """`lines` with the eval keys not in `keep` removed."""
    return [
        {k: v for k, v in line.items() if not k.startswith("eval/") or k in keep} for line in lines
    ]


def test_settings_and_splits_no_run_evaluated_get_no_row_and_no_panel(tmp_path):
    rl_keep = {"eval/validation/pass@1_t0.01"}
    sft_keep = {"eval/validation/pass@8_t1.0", "eval/validation/pass@1_t0.01"}
    root = tmp_path / "runs"
    for seed in (0, 1):
        lines = only_evals(rl_lines(seed, 2), rl_keep)
        lines[-1]["eval/test/pass@1_t0.6"] = None  # logged as null: not evaluated
        write_run(root / f"rl{seed}", name="geo", seed=seed, kind="rl", lines=lines)
    lines = only_evals(sft_lines(0, 2), sft_keep)
    write_run(root / "sft", name="geo_sft", seed=0, kind="sft", lines=lines)
    (comparison,) = report.pair_groups(groups_of(root))
    assert report.evaluated(comparison) == {"validation": ["pass@8_t1.0", "pass@1_t0.01"]}
    result = report.build_report([root], tmp_path / "report")
    rows = [line for line in result["markdown"].splitlines() if line.startswith("| validation")]
    assert [row.split("|")[2].strip() for row in rows] == ["pass@8 T=1.0", "pass@1 T=0.01"]
    assert "| test |" not in result["markdown"]
    # only SFT evaluated pass@8: the untrained level is SFT's epoch 0, the RL cells are empty
    row = table_row(result["markdown"], "validation", "pass@8 T=1.0")
    assert row[:3] == ["0.0 ± 0.0", report.MISSING, report.MISSING]
    assert all("±" in cell for cell in row[3:])
    plotted = result["summary"]["comparisons"][0]["plots"]
    assert "geo/eval_validation.png" in plotted and "geo/eval_test.png" not in plotted
    fig = plots._eval_figure(comparison, "validation", ["pass@8_t1.0", "pass@1_t0.01"])
    assert [ax.get_title() for ax in fig.axes] == [
        "validation: pass@8 T=1.0",
        "validation: pass@1 T=0.01",
    ]

    # Runs that evaluated nothing: no eval figure and a table that says so.
    root = tmp_path / "unevaluated"
    write_run(root / "r", name="plain", seed=0, kind="rl", lines=only_evals(rl_lines(0, 1), ()))
    result = report.build_report([root], tmp_path / "report2")
    assert "No run of this comparison was evaluated" in result["markdown"]
    assert "| Split |" not in result["markdown"]
    assert not any("eval_" in p for p in result["summary"]["comparisons"][0]["plots"])


def test_interrupted_runs_are_marked_in_the_table_the_summary_and_the_plots(tmp_path):
    """RL seed 2 stopped after step 4 of 6 (run.json finished: false); SFT seed 1's run.json is
    of the older format (no total_steps, no finished): it is not marked."""
    root = tmp_path / "runs"
    for seed in range(3):
        lines = rl_lines(seed, 3)
        cut = dict(finished=False, total_steps=6, lines=lines[:5]) if seed == 2 else {}
        write_run(root / f"rl{seed}", name="geo", seed=seed, kind="rl", **{"lines": lines, **cut})
    write_run(root / "sft0", name="geo_sft", seed=0, kind="sft", lines=sft_lines(0, 2))
    write_run(
        root / "sft1", name="geo_sft", seed=1, kind="sft", lines=sft_lines(1, 2), finished=None
    )
    result = report.build_report([root], tmp_path / "report")
    assert (
        "RL: `geo`, 3 seed(s) [0, 1, 2] (**interrupted: seed 2 at step 4 of 6**); "
        "SFT: `geo_sft`, 2 seed(s) [0, 1]." in result["markdown"]
    )
    (comparison,) = result["summary"]["comparisons"]
    assert comparison["rl"]["interrupted"] == [{"seed": 2, "last_step": 4, "total_steps": 6}]
    assert comparison["sft"]["interrupted"] == []
    rl, sft = groups_of(root)
    assert plots._group_title(rl).endswith("\ninterrupted: seed 2 at step 4 of 6")
    assert "interrupted" not in plots._group_title(sft)
    clip = plots._training_figure(rl).axes[TRAINING_TITLES.index("PPO clip fraction")]
    assert [text.get_text() for text in clip.get_legend().get_texts()] == [
        "low geo (3 seeds, 1 interrupted)",
        "high geo (3 seeds, 1 interrupted)",
    ]
    (accuracy,) = clip.figure.axes[0].lines  # the mean keeps the steps every seed reached
    np.testing.assert_array_equal(accuracy.get_xdata(), [1, 2, 3, 4])


def test_run_json_with_a_bad_finished_field_is_an_error_naming_the_file(tmp_path):
    run_dir = write_run(tmp_path / "runs" / "r", name="x", seed=0, kind="rl", lines=rl_lines(0, 1))
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(dict(record, finished="yes")))
    with pytest.raises(report.ReportError, match=r"r/run.json: field 'finished' is 'yes'"):
        report.build_report([tmp_path / "runs"], tmp_path / "report", plots=False)


def test_one_seed_one_step_tiny_values_undefined_ratios_and_unused_words(tmp_path):
    """What a short run shows: "1 seed", the one step as the only x tick, tiny values with
    their power of ten on each tick label (none above the axis, where it overlapped the
    title), a ratio without a response to count as a gap (not 0), and reflection words no
    response has as one line of the report instead of 15 empty panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    line = {"generation_step": 1, "epoch": 1, "loss/policy": 1.5e-8, "train/accuracy": 0.5}
    line.update({f"reflection/{name}": 0.0 for name in REFLECTION_RATIO_NAMES})
    line["reflection/correct_ratio_in_no_reflection_texts"] = 0.5  # no reflection text at all
    line["reflection/reflection_ratio_in_correct_answers"] = 0.0  # defined: 0 of the correct
    line.update({f"reflection/count/{word}": 0.0 for word in REFLECTION_WORDS})
    run_dir = write_run(tmp_path / "runs" / "tiny", name="tiny", seed=0, kind="rl", lines=[line])
    (group,) = report.group_runs([report.load_run(run_dir)])

    fig = plots._training_figure(group)
    FigureCanvasAgg(fig).draw()
    (ax,) = [ax for ax in fig.axes if ax.get_title() == "policy loss"]
    assert list(ax.get_xticks()) == [1]
    assert ax.yaxis.get_offset_text().get_text() == ""
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert "1.5e-8" in labels or any(label.endswith("e-8") for label in labels), labels
    assert ax.lines[0].get_label() == "RL tiny (1 seed)"

    ratios = {
        key.removeprefix("reflection/"): plots._series(key)(group.runs[0])[1]
        for key in (f"reflection/{name}" for name in REFLECTION_RATIO_NAMES)
    }
    assert math.isnan(ratios["correct_ratio_in_reflection_texts"])  # no reflection text
    assert ratios["reflection_ratio"] == ratios["reflection_ratio_in_correct_answers"] == 0.0
    assert ratios["reflection_ratio_in_incorrect_answers"] == 0.0
    assert ratios["correct_ratio_in_no_reflection_texts"] == 0.5

    result = report.build_report([run_dir], tmp_path / "report")
    assert "none of the 15 occurs in any RL response" in result["markdown"]
    plotted = result["summary"]["comparisons"][0]["plots"]
    assert "tiny/reflection_ratios.png" in plotted or any("reflection_ratios" in p for p in plotted)
    assert not any("reflection_counts" in p for p in plotted)


def test_which_reflection_ratios_are_defined():
    def line(r, c, n):
        return {
            "reflection/reflection_ratio": r,
            "reflection/correct_ratio_in_reflection_texts": c,
            "reflection/correct_ratio_in_no_reflection_texts": n,
        }

    def undefined(r, c, n):
        return sorted(
            name
            for name in REFLECTION_RATIO_NAMES
            if not reflection_curves.ratio_is_defined(line(r, c, n), name)
        )

    assert undefined(0.5, 0.5, 0.5) == []
    assert undefined(0.0, 0.0, 0.25) == ["correct_ratio_in_reflection_texts"]
    assert undefined(1.0, 0.75, 0.0) == ["correct_ratio_in_no_reflection_texts"]
    assert undefined(0.5, 0.0, 0.0) == ["reflection_ratio_in_correct_answers"]  # none correct
    assert undefined(0.5, 1.0, 1.0) == ["reflection_ratio_in_incorrect_answers"]  # all correct
    assert undefined(0.0, 0.0, 1.0) == [
        "correct_ratio_in_reflection_texts",
        "reflection_ratio_in_incorrect_answers",
    ]
