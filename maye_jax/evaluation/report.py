"""Multi-seed reports: plots of every curve and the paper's Table 3, from run directories.

    python -m maye_jax.report runs/ --out=reports/paper
    python -m maye_jax.report runs/geo_rl_seed0 runs/geo_rl_seed1 runs/geo_sft --out=reports/geo
    python -m maye_jax.report runs/ --out=reports/quick --noplots   # table.md/summary.json only

Each argument is a run directory (one holding a `run.json`) or a folder searched for them.
Writes REPORT_DIR/table.md (printed too), REPORT_DIR/summary.json (the numbers, in [0, 1]) and
REPORT_DIR/<comparison>/*.png (one folder per table, named after its RL group).

Grouping (the seeds of one experiment): runs are grouped by (`run.json` name, kind), where a
trailing seed suffix equal to the run's seed is dropped from the name (`geo_seed1` with seed 1,
`geo-s1` with seed 1 -> `geo`), so naming runs per seed or not gives the same groups. The seed is
`run.json` `seed`; two runs of a group with the same seed are an error.

Pairing (which RL and SFT groups share a table): the comparison key is the run config's
`report_group` when it is set, else `<evaluation sets> | <start model>`, where the evaluation sets
are the stems of `data.validation_file` / `data.test_file` (or `synth-<flavour>` for synthetic
data) and the start model is the last part of `model.path` (or `tiny-<family>`). Runs are
comparable exactly when they are evaluated on the same sets from the same start. Every RL group
gets one table with the SFT group of its key; a key with no RL group gives an SFT-only table.
Two SFT groups under one key, or one group whose seeds disagree on the key, is an error: set
`config.report_group` to say what belongs together.

Table cells (SPEC §6): per seed, Untrained = the epoch-0 evaluation (of the RL group, else of the
SFT group), mean and max = over epochs 1..E; then mean ± std (ddof=0) over seeds, in percent.
Rows and plot panels exist only for the (split, setting) pairs some run evaluated.

A run whose run.json says `finished: false` (stopped, crashed or still running; the harness sets
it true when every step ran) is marked "interrupted at step N of M" (M: run.json `total_steps`)
in table.md, summary.json and the plots; an older run.json without the field is not marked. An
RL run's SFT warm-up loss (`OUTPUT_DIR/sft_warmup/metrics.jsonl`) is plotted beside its curves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maye_jax.evaluation.plots import (
    SETTING_LABELS,
    length_reflection_correlations,
    per_epoch,
    plot_comparison,
)
from maye_jax.evaluation.reflection_curves import format_reflection_words
from maye_jax.evaluation.scheme import mean_std_over_seeds, summarize_over_epochs
from maye_jax.run.metrics import read_metrics

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("validation", "test")
SETTINGS: tuple[str, ...] = ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01")
KINDS = ("rl", "sft")
COLUMNS: tuple[str, ...] = ("Untrained", "RL mean", "RL max", "SFT mean", "SFT max")
MISSING = "—"

_SEED_SUFFIX = re.compile(r"(?:[-_.]?seed[-_=]?|[-_]s)(\d+)$")


class ReportError(ValueError):
    """A run directory or a set of runs that cannot be reported as asked."""


@dataclass
class Run:
    run_dir: Path
    name: str  # run.json `name`
    seed: int
    kind: str  # rl | sft
    config: dict
    lines: list[dict]  # metrics.jsonl
    total_steps: int | None = None  # run.json: the planned steps (None: not recorded)
    finished: bool | None = None  # run.json: every planned step ran (None: not recorded)
    warmup_lines: list[dict] = field(default_factory=list)  # sft_warmup/metrics.jsonl

    @property
    def last_step(self) -> int:
        """The last generation step of metrics.jsonl (0 for a run that logged none)."""
        return max((line["generation_step"] for line in self.lines), default=0)

    @property
    def interrupted(self) -> bool:
        return self.finished is False

    @property
    def interruption(self) -> str:
        """'seed S at step N of M' (the plan's M when run.json has it)."""
        planned = f" of {self.total_steps}" if self.total_steps is not None else ""
        return f"seed {self.seed} at step {self.last_step}{planned}"

    @property
    def group_name(self) -> str:
        match = _SEED_SUFFIX.search(self.name)
        if match and int(match.group(1)) == self.seed and match.start() > 0:
            return self.name[: match.start()]
        return self.name


@dataclass
class Group:
    """The seeds of one experiment: runs with the same (group name, kind), sorted by seed."""

    name: str
    kind: str
    comparison_key: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    @property
    def interrupted(self) -> list[Run]:
        return [run for run in self.runs if run.interrupted]

    def interruption_note(self) -> str:
        """'' when every run finished, else 'interrupted: seed 2 at step 5 of 6, ...'."""
        cut = self.interrupted
        return "interrupted: " + ", ".join(run.interruption for run in cut) if cut else ""


@dataclass
class Comparison:
    """One table and one set of plots: an RL group and the SFT group it is compared with."""

    key: str
    rl: Group | None
    sft: Group | None
    folder: str = ""

    @property
    def title(self) -> str:
        names = [f"{g.kind.upper()} `{g.name}`" for g in (self.rl, self.sft) if g is not None]
        return " vs ".join(names)


# -- discovery and loading --------------------------------------------------------------------
def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every folder holding a `run.json` at or below the given paths (each found once)."""
    paths = [Path(path) for path in paths]
    found: dict[Path, None] = {}  # an ordered set
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory (expected a run directory or a parent)")
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            if "run.json" in files:
                found.setdefault(Path(folder).resolve())
    if not found:
        raise ReportError(f"no run.json found under {', '.join(map(str, paths))}")
    return list(found)


def load_run(run_dir: Path) -> Run:
    record_path = run_dir / "run.json"
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{record_path}:{error.lineno}: invalid JSON ({error.msg})") from error
    for key in ("name", "seed", "kind"):
        if key not in record:
            raise ReportError(f"{record_path}: field '{key}' missing (expected name, seed, kind)")
    if record["kind"] not in KINDS:
        raise ReportError(f"{record_path}: field 'kind' is {record['kind']!r}, expected rl or sft")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path}: missing (the run wrote run.json but no metrics)")
    total_steps, finished = record.get("total_steps"), record.get("finished")
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int)
    ):
        raise ReportError(f"{record_path}: field 'total_steps' is {total_steps!r}, expected an int")
    if finished is not None and not isinstance(finished, bool):
        raise ReportError(f"{record_path}: field 'finished' is {finished!r}, expected true/false")
    warmup_path = run_dir / "sft_warmup" / "metrics.jsonl"
    return Run(
        run_dir=run_dir,
        name=str(record["name"]),
        seed=int(record["seed"]),
        kind=record["kind"],
        config=dict(record.get("config") or {}),
        lines=_read_metrics_checked(metrics_path),
        total_steps=total_steps,
        finished=finished,
        warmup_lines=_read_metrics_checked(warmup_path) if warmup_path.is_file() else [],
    )


def _read_metrics_checked(metrics_path: Path) -> list[dict]:
    """The lines of a metrics.jsonl, each with integer `generation_step` and `epoch`."""
    try:
        lines = read_metrics(metrics_path)
    except json.JSONDecodeError as error:
        raise ReportError(f"{metrics_path}: a line is not JSON ({error.msg})") from error
    for number, line in enumerate(lines, start=1):
        for key in ("generation_step", "epoch"):
            if not isinstance(line.get(key), int):
                raise ReportError(f"{metrics_path}:{number}: field '{key}' missing or not an int")
    return lines


def comparison_key(config: Mapping) -> str:
    """`config.report_group`, else `<evaluation sets> | <start model>` (see the module doc)."""
    if config.get("report_group"):
        return str(config["report_group"])
    data = config.get("data") or {}
    model = config.get("model") or {}
    eval_files = [data[k] for k in ("validation_file", "test_file") if data.get(k)]
    if eval_files:
        dataset = "+".join(Path(str(f)).stem for f in eval_files)
    elif data.get("synth_dir"):
        dataset = f"synth-{data.get('synth_flavour', '')}"
    elif data.get("train_file"):
        dataset = Path(str(data["train_file"])).stem
    else:
        dataset = "unknown-data"
    if model.get("path"):
        start = Path(str(model["path"]).rstrip("/")).name
    elif model.get("tiny_family"):
        start = f"tiny-{model['tiny_family']}"
    else:
        start = "unknown-model"
    return f"{dataset} | {start}"


# -- grouping and pairing ---------------------------------------------------------------------
def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups by (group name, kind); raises on a duplicate seed or a disagreeing comparison key."""
    groups: dict[tuple[str, str], Group] = {}
    for run in sorted(runs, key=lambda r: (r.group_name, r.kind, r.seed)):
        key = comparison_key(run.config)
        group = groups.setdefault(
            (run.group_name, run.kind), Group(run.group_name, run.kind, comparison_key=key)
        )
        for other in group.runs:
            if other.seed == run.seed:
                raise ReportError(
                    f"group '{group.name}' ({group.kind}): seed {run.seed} appears twice, in "
                    f"{other.run_dir}/run.json and {run.run_dir}/run.json (expected one run per "
                    "seed; give one run another name or seed, or leave it out)"
                )
        if key != group.comparison_key:
            raise ReportError(
                f"group '{group.name}' ({group.kind}): {run.run_dir}/run.json compares on "
                f"'{key}' but {group.runs[0].run_dir}/run.json on '{group.comparison_key}' "
                "(expected the same data and start model for every seed; set "
                "config.report_group)"
            )
        group.runs.append(run)
    return list(groups.values())


def pair_groups(groups: Sequence[Group]) -> list[Comparison]:
    """One comparison per RL group (with the SFT group of its key), plus SFT-only keys."""
    by_key: dict[str, dict[str, list[Group]]] = {}
    for group in groups:
        by_key.setdefault(group.comparison_key, {"rl": [], "sft": []})[group.kind].append(group)
    comparisons = []
    for key, kinds in by_key.items():
        if len(kinds["sft"]) > 1:
            names = ", ".join(f"'{g.name}'" for g in kinds["sft"])
            raise ReportError(
                f"SFT groups {names} all compare on '{key}' (expected at most one SFT group per "
                "comparison; set config.report_group to pair each with its RL group)"
            )
        sft = kinds["sft"][0] if kinds["sft"] else None
        for rl in kinds["rl"] or [None]:
            comparisons.append(Comparison(key=key, rl=rl, sft=sft))
    used: set[str] = set()
    for comparison in comparisons:
        base = comparison.rl.name if comparison.rl else f"{comparison.sft.name}-sft"
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("_") or "group"
        while folder in used:
            folder += "_"
        used.add(folder)
        comparison.folder = folder
    return comparisons


# -- the table --------------------------------------------------------------------------------
def _cell(per_seed: Sequence[float]) -> dict | None:
    """mean/std (ddof=0) over the seeds that have a value (not nan); None if none has."""
    present = [value for value in per_seed if not math.isnan(value)]
    if not present:
        return None
    mean, std = mean_std_over_seeds(present)
    return {
        "mean": mean,
        "std": std,
        "num_seeds": len(present),
        "of_seeds": len(per_seed),
        "per_seed": [None if math.isnan(value) else value for value in per_seed],
    }


def group_summary(group: Group, key: str) -> dict[str, dict | None]:
    """{untrained, mean, max} of one eval key: per seed over epochs, then over seeds."""
    values_by_epoch = [per_epoch(run.lines, key) for run in group.runs]
    epoch_sets = {tuple(sorted(values)) for values in values_by_epoch if values}
    if len(epoch_sets) > 1:
        log.warning(
            "group '%s' (%s): %s evaluated at different epochs per seed %s",
            group.name,
            group.kind,
            key,
            [sorted(values) for values in values_by_epoch],
        )
    per_seed = [summarize_over_epochs(values) for values in values_by_epoch]
    return {
        entry: _cell([summary[entry] for summary in per_seed])
        for entry in ("untrained", "mean", "max")
    }


def evaluated(comparison: Comparison) -> dict[str, list[str]]:
    """{split: [setting, ...]} of the `eval/<split>/<setting>` keys some run of the comparison
    logged (not None): the SPEC splits and settings first, in their order, then any other."""
    found: set[tuple[str, str]] = set()
    for group in (comparison.rl, comparison.sft):
        for run in group.runs if group else []:
            for line in run.lines:
                for key, value in line.items():
                    parts = key.split("/")
                    if len(parts) == 3 and parts[0] == "eval" and value is not None:
                        found.add((parts[1], parts[2]))

    def order(known: Sequence[str], names: Iterable[str]) -> list[str]:
        names = set(names)
        return [n for n in known if n in names] + sorted(names - set(known))

    return {
        split: order(SETTINGS, (setting for s, setting in found if s == split))
        for split in order(SPLITS, (split for split, _ in found))
    }


def comparison_table(comparison: Comparison) -> dict:
    """{split: {setting: {column name: cell | None}}} with cells in [0, 1] (see _cell), for
    the evaluated (split, setting) pairs only."""
    table = {}
    for split, settings in evaluated(comparison).items():
        table[split] = {}
        for setting in settings:
            key = f"eval/{split}/{setting}"
            rl = group_summary(comparison.rl, key) if comparison.rl else {}
            sft = group_summary(comparison.sft, key) if comparison.sft else {}
            table[split][setting] = {
                "Untrained": rl.get("untrained") or sft.get("untrained"),
                "RL mean": rl.get("mean"),
                "RL max": rl.get("max"),
                "SFT mean": sft.get("mean"),
                "SFT max": sft.get("max"),
                "SFT untrained": sft.get("untrained"),
            }
    return table


def format_cell(cell: Mapping | None) -> str:
    if cell is None:
        return MISSING
    text = f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
    if cell["num_seeds"] < cell["of_seeds"]:
        text += f" ({cell['num_seeds']}/{cell['of_seeds']} seeds)"
    return text


def _describe(group: Group | None, kind: str) -> str:
    if group is None:
        return f"{kind.upper()}: none"
    seeds = ", ".join(map(str, group.seeds))
    note = group.interruption_note()
    note = f" (**{note}**)" if note else ""
    return f"{kind.upper()}: `{group.name}`, {len(group.runs)} seed(s) [{seeds}]{note}"


def format_table(comparison: Comparison, table: Mapping) -> str:
    """A Markdown table in the form of the paper's Table 3: rows split x setting."""
    header = ["Split", "Setting", *COLUMNS]
    rows = [
        f"## {comparison.title}",
        "",
        f"Compared on `{comparison.key}`. {_describe(comparison.rl, 'rl')}; "
        f"{_describe(comparison.sft, 'sft')}.",
        "Accuracy in %, mean ± std (ddof=0) over seeds; mean and max over epochs 1..E per seed; "
        "Untrained = epoch 0.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] * 2 + [" ---: "] * len(COLUMNS)) + "|",
    ]
    for split, by_setting in table.items():
        for setting, cells in by_setting.items():
            values = [format_cell(cells[name]) for name in COLUMNS]
            label = SETTING_LABELS.get(setting, setting)
            rows.append("| " + " | ".join([split, label, *values]) + " |")
    if not any(table.values()):
        rows[-2:] = ["No run of this comparison was evaluated (no `eval/` metric)."]
    return "\n".join(rows) + "\n"


# -- the report -------------------------------------------------------------------------------
def reflection_correlation(comparison: Comparison) -> dict | None:
    """The RL group's per-seed correlation of response length with reflection ratio across
    generation steps, as a table cell (see _cell); None without an RL group or any value."""
    if comparison.rl is None:
        return None
    return _cell(length_reflection_correlations(comparison.rl))


def format_reflection_correlation(cell: Mapping | None) -> str:
    if cell is None:
        return (
            "Reflection ratio against mean response length: no correlation to measure (no RL "
            "rollouts, or a constant series: e.g. no reflection word in any response)."
        )
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    if cell["num_seeds"] < cell["of_seeds"]:
        text += f" ({cell['num_seeds']}/{cell['of_seeds']} seeds)"
    return (
        "Reflection ratio against mean response length across generation steps (Pearson r per "
        f"seed, mean ± std over seeds): {text}."
    )


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _group_record(group: Group | None) -> dict | None:
    if group is None:
        return None
    return {
        "name": group.name,
        "kind": group.kind,
        "seeds": group.seeds,
        "run_dirs": [str(run.run_dir) for run in group.runs],
        "interrupted": [
            {"seed": run.seed, "last_step": run.last_step, "total_steps": run.total_steps}
            for run in group.interrupted
        ],
    }


def build_report(
    run_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, plots: bool = True
) -> dict:
    """Finds, groups and pairs the runs; writes plots (unless `plots=False`), `table.md` and
    `summary.json`. Returns {"markdown": table.md text, "summary": summary.json content}."""
    runs = [load_run(run_dir) for run_dir in find_run_dirs(run_paths)]
    comparisons = pair_groups(group_runs(runs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = ["# MAYE report", ""]
    summary = {
        "units": "accuracy in [0, 1]; table.md shows percent",
        "grouping": "run.json (name without a seed suffix, kind); seed = run.json seed",
        "pairing": "config.report_group, else '<evaluation sets> | <start model>'",
        "comparisons": [],
    }
    for comparison in comparisons:
        table = comparison_table(comparison)
        written = []
        if plots:
            written = plot_comparison(
                comparison, out_dir / comparison.folder, evaluated=evaluated(comparison)
            )
        markdown.append(format_table(comparison, table))
        correlation = reflection_correlation(comparison)
        if comparison.rl is not None:
            markdown += [format_reflection_correlation(correlation), ""]
            words = format_reflection_words(comparison.rl)
            markdown += [words, ""] if words else []
        if written:
            links = ", ".join(f"[{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in written)
            markdown += [f"Plots: {links}", ""]
        summary["comparisons"].append(
            {
                "title": comparison.title,
                "comparison_key": comparison.key,
                "folder": comparison.folder,
                "rl": _group_record(comparison.rl),
                "sft": _group_record(comparison.sft),
                "table": table,
                "length_reflection_correlation": correlation,
                "plots": [p.relative_to(out_dir).as_posix() for p in written],
            }
        )
    text = "\n".join(markdown)
    (out_dir / "table.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    return {"markdown": text, "summary": summary}
