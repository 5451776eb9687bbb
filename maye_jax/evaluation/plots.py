"""The report's figures: every curve as the mean over seeds with a ±std band (ddof=0).

x-axis (SPEC §6): epochs for accuracy curves, generation steps for length, reflection and the
training curves (rewards, losses, KL, entropy, grad norm, clipping, logprob mismatch). A panel
exists only for a metric some run logged; a group with an interrupted run says so in its
figure titles and legend labels. Figures are built with `matplotlib.figure.Figure` (Agg
canvas), so no pyplot state is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from maye_jax.evaluation.reflection_curves import per_step_ratio, words_found
from maye_jax.evaluation.scheme import REFLECTION_RATIO_NAMES, SETTING_LABELS
from maye_jax.evaluation.ticks import ScaledTickLabels, integer_x_axis

log = logging.getLogger(__name__)

RL_COLOR = "tab:blue"
SFT_COLOR = "tab:orange"
UNTRAINED_COLOR = "black"
CORRECT_COLOR = "tab:green"
WRONG_COLOR = "tab:red"

Series = Mapping[int, float]  # {epoch or generation step: value}

Curve = tuple[str, str, str]  # (metrics key, legend label, color)
Panel = tuple[str, str, tuple[Curve, ...]]  # (title, y label, curves)

# The curves to look at first when RL goes wrong, per generation step. The reward components
# (`train/reward/*`, whatever the run logged) go after the accuracy panel.
TRAINING_PANELS: tuple[Panel, ...] = (
    ("training accuracy", "accuracy", (("train/accuracy", "RL", RL_COLOR),)),
    ("policy loss", "loss", (("loss/policy", "RL", RL_COLOR),)),
    ("KL loss", "loss", (("loss/kl", "RL", RL_COLOR),)),
    ("total loss", "loss", (("loss/total", "RL", RL_COLOR),)),
    ("KL to the reference (k3)", "nats / token", (("kl/k3", "RL", RL_COLOR),)),
    ("approx. KL to the old policy", "nats / token", (("approx_kl", "RL", RL_COLOR),)),
    ("entropy", "nats / token", (("entropy", "RL", RL_COLOR),)),
    ("grad norm (before clipping)", "global L2 norm", (("grad_norm", "RL", RL_COLOR),)),
    (
        "PPO clip fraction",
        "fraction of tokens",
        (("clip_frac/low", "low", "tab:purple"), ("clip_frac/high", "high", RL_COLOR)),
    ),
    (
        "responses cut at max_tokens",
        "fraction of responses",
        (("response_length/clip_ratio", "RL", RL_COLOR),),
    ),
    (
        "rollout vs trainer logprob, mean |diff|",
        "nats",
        (("mismatch/logprob_abs_mean", "RL", RL_COLOR),),
    ),
    (
        "rollout vs trainer logprob, max |diff|",
        "nats",
        (("mismatch/logprob_abs_max", "RL", RL_COLOR),),
    ),
)


def per_epoch(lines: Sequence[Mapping], key: str) -> dict[int, float]:
    """{epoch: value} of the metrics lines carrying `key` (the last line of an epoch wins)."""
    return {int(line["epoch"]): float(line[key]) for line in lines if line.get(key) is not None}


def seeds_text(count: int) -> str:
    return f"{count} seed" if count == 1 else f"{count} seeds"


def per_step(lines: Sequence[Mapping], key: str) -> dict[int, float]:
    """{generation_step: value} of the metrics lines carrying `key`."""
    return {
        int(line["generation_step"]): float(line[key])
        for line in lines
        if line.get(key) is not None
    }


def seed_band(series_per_seed: Sequence[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, std) over seeds at the x values every seed has (std with ddof=0)."""
    present = [set(series) for series in series_per_seed if series]
    if not present:
        return np.array([]), np.array([]), np.array([])
    common = sorted(set.intersection(*present))
    if len(present) < len(series_per_seed) or set.union(*present) != set(common):
        log.warning(
            "seeds cover different x values; the curve keeps the %d present in all seeds",
            len(common),
        )
    values = np.array([[series[x] for x in common] for series in series_per_seed if series])
    # values: [seed, x]
    return np.array(common), values.mean(axis=0), values.std(axis=0)


def step_correlation(lines: Sequence[Mapping], key_x: str, key_y: str) -> float:
    """Pearson correlation over the generation steps that carry both keys; nan with fewer than
    3 such steps or a constant series (no linear relation can be measured)."""
    x_by_step, y_by_step = per_step(lines, key_x), per_step(lines, key_y)
    steps = sorted(set(x_by_step) & set(y_by_step))
    x = np.array([x_by_step[step] for step in steps])
    y = np.array([y_by_step[step] for step in steps])
    if len(steps) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def length_reflection_correlations(group) -> list[float]:
    """Per seed of an RL group: the correlation of mean response length with reflection ratio
    across its generation steps (the paper: reflection tracks response length)."""
    return [
        step_correlation(run.lines, "response_length/mean", "reflection/reflection_ratio")
        for run in group.runs
    ]


def _draw_band(
    ax,
    group,
    series_of_run: Callable,
    *,
    color: str,
    label: str,
    scale: float,
    count_interrupted: bool = True,
) -> bool:
    """Draws one group's mean ± std curve; False when no seed has the series. The legend label
    counts the group's interrupted runs unless `count_interrupted` is False."""
    if group is None:
        return False
    x, mean, std = seed_band([series_of_run(run) for run in group.runs])
    if not len(x):
        return False
    mean, std = scale * mean, scale * std
    cut = len(group.interrupted) if count_interrupted else 0
    label = f"{label} {group.name} ({seeds_text(len(group.runs))}"
    label += f", {cut} interrupted)" if cut else ")"
    integer_x_axis(ax, x)
    ax.yaxis.set_major_formatter(ScaledTickLabels())
    ax.plot(x, mean, color=color, marker="o" if len(x) < 30 else None, markersize=3, label=label)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25, linewidth=0)
    return True


def _grid(num_panels: int, num_columns: int, panel_size=(3.6, 2.6)) -> tuple[Figure, list]:
    """A figure of `num_panels` axes; fixed margins in inches (tight_layout costs seconds)."""
    num_rows = -(-num_panels // num_columns)
    width, height = panel_size[0] * num_columns, panel_size[1] * num_rows + 0.4
    fig = Figure(figsize=(width, height), dpi=100)
    axes = fig.subplots(num_rows, num_columns, squeeze=False).ravel().tolist()
    fig.subplots_adjust(
        left=0.75 / width,
        right=1 - 0.2 / width,
        bottom=0.55 / height,
        top=1 - 0.75 / height,
        wspace=0.35,
        hspace=0.6,
    )
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes[:num_panels]


def _save(fig: Figure, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    # 0.18 inch per title line (a second line notes interrupted runs) above the axes titles
    height = fig.get_figheight()
    fig.subplots_adjust(top=1 - (0.57 + 0.18 * (title.count("\n") + 1)) / height)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _group_title(group, what: str = "") -> str:
    title = (
        f"{group.kind.upper()} {group.name}{what}: mean ± std over {seeds_text(len(group.runs))}"
    )
    note = group.interruption_note()
    return f"{title}\n{note}" if note else title


def logged_keys(lines_of_runs: Sequence[Sequence[Mapping]]) -> set[str]:
    """Every key that some line of some run carries with a value (not None)."""
    return {
        key for lines in lines_of_runs for line in lines for key, v in line.items() if v is not None
    }


def training_panels(group) -> list[Panel]:
    """The panels of TRAINING_PANELS (reward components added) that the group's runs logged,
    each with only its logged curves; a metric no run logged gets no panel."""
    logged = logged_keys([run.lines for run in group.runs])
    rewards = sorted(
        (key for key in logged if key.startswith("train/reward/")),
        key=lambda key: (key != "train/reward/total", key),
    )
    reward_panels = [
        (f"reward: {key.removeprefix('train/reward/')}", "mean reward", ((key, "RL", RL_COLOR),))
        for key in rewards
    ]
    panels = []
    for title, ylabel, curves in [TRAINING_PANELS[0], *reward_panels, *TRAINING_PANELS[1:]]:
        curves = tuple(curve for curve in curves if curve[0] in logged)
        if curves:
            panels.append((title, ylabel, curves))
    return panels


def _training_figure(group) -> Figure | None:
    """One panel per logged training metric against generation steps; None if none."""
    panels = training_panels(group)
    if not panels:
        return None
    fig, axes = _grid(len(panels), min(4, len(panels)))
    for ax, (title, ylabel, curves) in zip(axes, panels, strict=True):
        for key, label, color in curves:
            _draw_band(
                ax,
                group,
                lambda run, key=key: per_step(run.lines, key),
                color=color,
                label=label,
                scale=1.0,
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("generation step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=6)
    return fig


def _warmup_figure(group) -> Figure | None:
    """The SFT warm-up's loss per warm-up step (`OUTPUT_DIR/sft_warmup`); None without one."""
    fig, (ax,) = _grid(1, 1, panel_size=(5.0, 3.4))
    if not _draw_band(
        ax,
        group,
        lambda run: per_step(run.warmup_lines, "sft/loss"),
        color=SFT_COLOR,
        label="SFT warm-up",
        scale=1.0,
        count_interrupted=False,  # the RL runs' interruptions, not the warm-up's
    ):
        return None
    ax.set(xlabel="warm-up step", ylabel="loss", title="SFT warm-up loss (before RL)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _series(key: str) -> Callable:
    """A run's {generation step: value} of metrics `key`; a reflection ratio's undefined steps
    are nan."""
    name = key.removeprefix("reflection/")
    if name in REFLECTION_RATIO_NAMES:
        return lambda run: per_step_ratio(run.lines, name)
    return lambda run: per_step(run.lines, key)


def _step_panels(group, keys: Sequence[str], titles: Sequence[str], ylabel: str, num_columns):
    """One panel per metric key of an RL group, against generation steps; None if all empty."""
    if not keys:
        return None
    fig, axes = _grid(len(keys), num_columns)
    drawn = False
    for ax, key, title in zip(axes, keys, titles, strict=True):
        drawn |= _draw_band(
            ax,
            group,
            _series(key),
            color=RL_COLOR,
            label="RL",
            scale=1.0,
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("generation step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return fig if drawn else None


def _eval_figure(comparison, split: str, settings: Sequence[str]) -> Figure | None:
    """Accuracy per epoch under each setting: RL vs SFT, with the untrained (epoch 0) level."""
    if not settings:
        return None
    fig, axes = _grid(len(settings), len(settings), panel_size=(4.2, 3.2))
    drawn = False
    for ax, setting in zip(axes, settings, strict=True):
        key = f"eval/{split}/{setting}"
        for group, color, label in (
            (comparison.rl, RL_COLOR, "RL"),
            (comparison.sft, SFT_COLOR, "SFT"),
        ):
            drawn |= _draw_band(
                ax,
                group,
                lambda run, key=key: per_epoch(run.lines, key),
                color=color,
                label=label,
                scale=100.0,
            )
        start_group = comparison.rl or comparison.sft
        untrained = [per_epoch(run.lines, key).get(0) for run in start_group.runs]
        untrained = [value for value in untrained if value is not None]
        if untrained:
            level = 100 * float(np.mean(untrained))
            ax.axhline(
                level,
                color=UNTRAINED_COLOR,
                linestyle="--",
                linewidth=1,
                label=f"untrained (epoch 0) {level:.1f}",
            )
        ax.set_title(f"{split}: {SETTING_LABELS.get(setting, setting)}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=6)
    return fig if drawn else None


def _format_correlations(correlations: Sequence[float]) -> str:
    present = [value for value in correlations if not np.isnan(value)]
    if not present:
        return "r(length, ratio) n/a: a constant series"
    text = f"r(length, ratio) = {np.mean(present):.2f} ± {np.std(present):.2f}"
    return text + (
        f" ({len(present)}/{len(correlations)} seeds)" if len(present) < len(correlations) else ""
    )


def _reflection_and_length_figure(group) -> Figure | None:
    """The paper's reflection figure: per generation step, the mean response length beside the
    reflection ratio of the same rollouts, overall and within correct and incorrect answers."""
    fig, (length_ax, ratio_ax, split_ax) = _grid(3, 3, panel_size=(4.0, 3.0))
    panels = [
        (length_ax, "response_length/mean", RL_COLOR, "RL", "tokens"),
        (ratio_ax, "reflection/reflection_ratio", RL_COLOR, "RL", "ratio"),
        (
            split_ax,
            "reflection/reflection_ratio_in_correct_answers",
            CORRECT_COLOR,
            "correct",
            "ratio",
        ),
        (
            split_ax,
            "reflection/reflection_ratio_in_incorrect_answers",
            WRONG_COLOR,
            "incorrect",
            "ratio",
        ),
    ]
    drawn = False
    for ax, key, color, label, ylabel in panels:
        drawn |= _draw_band(
            ax,
            group,
            _series(key),
            color=color,
            label=label,
            scale=1.0,
        )
        ax.set_xlabel("generation step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    length_ax.set_title("mean response length", fontsize=9)
    ratio_ax.set_title(
        f"reflection ratio\n{_format_correlations(length_reflection_correlations(group))}",
        fontsize=8,
    )
    split_ax.set_title("reflection ratio in correct / incorrect answers", fontsize=8)
    if split_ax.has_data():
        split_ax.legend(fontsize=6)
    return fig if drawn else None


def plot_comparison(
    comparison, folder: Path, *, evaluated: Mapping[str, Sequence[str]]
) -> list[Path]:
    """Writes every figure the comparison's runs have data for; returns their paths.

    `comparison` is a `report.Comparison` (an RL and an SFT group, either may be None);
    `evaluated` maps each evaluated split to its evaluated settings (`report.evaluated`).
    """
    title = comparison.title.replace("`", "") + ": mean ± std over seeds"
    groups = [group for group in (comparison.rl, comparison.sft) if group is not None]
    notes = [f"{g.kind.upper()} {g.interruption_note()}" for g in groups if g.interrupted]
    title = "\n".join([title, *notes])
    written = []
    rl = comparison.rl
    if rl is not None:
        fig = _training_figure(rl)
        if fig is not None:
            written.append(_save(fig, folder / "training_curves.png", _group_title(rl)))
        fig = _warmup_figure(rl)
        if fig is not None:
            written.append(_save(fig, folder / "sft_warmup_loss.png", _group_title(rl)))
        fig, (ax,) = _grid(1, 1, panel_size=(5.0, 3.4))
        if _draw_band(
            ax,
            rl,
            lambda run: per_epoch(run.lines, "train/epoch_accuracy"),
            color=RL_COLOR,
            label="RL",
            scale=100.0,
        ):
            ax.set(xlabel="epoch", ylabel="training accuracy (%)", title="training accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            written.append(_save(fig, folder / "train_accuracy.png", _group_title(rl)))
        fig = _step_panels(
            rl, ["response_length/mean"], ["mean response length"], "tokens", num_columns=1
        )
        if fig is not None:
            written.append(_save(fig, folder / "response_length.png", _group_title(rl)))
        fig = _step_panels(
            rl,
            [f"reflection/{name}" for name in REFLECTION_RATIO_NAMES],
            [name.replace("_", " ") for name in REFLECTION_RATIO_NAMES],
            "ratio",
            num_columns=3,
        )
        if fig is not None:
            written.append(_save(fig, folder / "reflection_ratios.png", _group_title(rl)))
        fig = _reflection_and_length_figure(rl)
        if fig is not None:
            written.append(_save(fig, folder / "reflection_and_length.png", _group_title(rl)))
        found = words_found(rl)  # a word no response has is one line of the report instead
        fig = _step_panels(
            rl,
            [f"reflection/count/{word}" for word in found],
            [f"'{word}'" for word in found],
            "count",
            num_columns=min(5, max(len(found), 1)),
        )
        if fig is not None:
            written.append(_save(fig, folder / "reflection_counts.png", _group_title(rl)))
    if comparison.sft is not None:
        fig, (ax,) = _grid(1, 1, panel_size=(5.0, 3.4))
        if _draw_band(
            ax,
            comparison.sft,
            lambda run: per_step(run.lines, "sft/loss"),
            color=SFT_COLOR,
            label="SFT",
            scale=1.0,
        ):
            ax.set(xlabel="step", ylabel="loss", title="SFT loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            written.append(_save(fig, folder / "sft_loss.png", _group_title(comparison.sft)))
    for split, settings in evaluated.items():
        fig = _eval_figure(comparison, split, settings)
        if fig is not None:
            written.append(_save(fig, folder / f"eval_{split}.png", title))
    if not written:
        log.warning("%s: no curve to plot", title)
    return written
