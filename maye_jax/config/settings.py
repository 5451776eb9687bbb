"""Typed, validated settings: the ml_collections config of the command line, checked once.

    settings = load_settings(config, kind="rl")   # raises ConfigError naming every bad field

The command line keeps ml_collections (`--config.rl.batch_size=64`); at start-up, before any
data, mesh or model work, every value is checked (type, range, registry name, cross-field
rules) and the run reads frozen dataclasses from then on: one per config section, and the
component configs the math takes (`advantage_config`, `loss_config`, `optimizer_config`,
`update_config`, `trajectory_config`). A bad value is reported as
`config.rl.batch_size: -8: must be > 0`, every one at once.

Each section's fields are the dataclass fields below; `check=` holds the per-field rule.
An option that can be off is None when off: 0 or -1 for "off" (the old spelling of
`rl.rollout_is_cap`, `rollout.top_k`, `optim.max_grad_norm`, ...) is refused with the new one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from maye_jax.errors import UserError

log = logging.getLogger("maye_jax")

KINDS = ("rl", "sft", "evaluate", "experiment")


class ConfigError(UserError, ValueError):
    """One line per bad value, each naming its field (`config.section.name: value: why`)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------------
# Field rules
# --------------------------------------------------------------------------------------------------

Check = Callable[[Any], str | None]  # a problem with the value, or None


def positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def one_of(*choices) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def greater_than(low) -> Check:
    return lambda value: None if value > low else f"must be > {low}"


def in_range(low, high, *, low_open=False) -> Check:
    def check(value):
        ok = (low < value if low_open else low <= value) and value <= high
        return None if ok else f"must be in {'(' if low_open else '['}{low}, {high}]"

    return check


def each(check: Check) -> Check:
    def check_all(values):
        problems = [p for p in (check(v) for v in values) if p]
        return problems[0] if problems else None

    return check_all


def non_empty(values) -> str | None:
    return None if len(values) else "must not be empty"


def cpu_list(value) -> str | None:
    """CPU ids as taskset writes them: "1", "0,2", "2-3"."""
    import re

    ok = re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", value.replace(" ", ""))
    return None if ok else "expected CPU ids such as 1, 0,2 or 2-3"


def registry(names: Callable[[], tuple[str, ...]], what: str) -> Check:
    """A name that must be registered (imported lazily: the registries' modules import JAX)."""

    def check(value):
        known = names()
        return None if value in known else f"unknown {what}; known: {', '.join(sorted(known))}"

    return check


def opt(default=None, check: Check | None = None, *, none_off: str | None = None):
    """A field with its default and rule. `none_off`: the old "off" spelling (e.g. "0") that
    now means nothing, refused with a message naming None."""
    return dataclasses.field(default=default, metadata={"check": check, "none_off": none_off})


def _advantage_estimators():
    from maye_jax.rl.advantages import advantage_estimator_names

    return advantage_estimator_names()


def _policy_losses():
    from maye_jax.rl.losses import policy_loss_names

    return policy_loss_names()


def _loss_aggregations():
    from maye_jax.rl.losses import loss_aggregation_names

    return loss_aggregation_names()


def _kl_estimators():
    from maye_jax.rl.advantages import KL_ESTIMATORS

    return KL_ESTIMATORS


def _reward_names():
    from maye_jax.rl.rewards import reward_names

    return reward_names()


def _char_classes():
    from maye_jax.rl.rewards import CHAR_CLASSES

    return tuple(CHAR_CLASSES)


def _eval_settings():
    from maye_jax.evaluation.evaluate import SETTINGS

    return tuple(SETTINGS)


def _prompt_templates():
    from maye_jax.data.processor import prompt_template_names

    return prompt_template_names()


def _schedules():
    from maye_jax.training.optim import SCHEDULES

    return SCHEDULES


DTYPES = ("float32", "bfloat16")


# --------------------------------------------------------------------------------------------------
# Sections (one frozen dataclass per `config.<section>`)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str | None = opt(None)
    tiny_family: str | None = opt(None, one_of("qwen2_vl", "qwen2_5_vl"))
    tiny_hidden_size: int = opt(64, positive)
    tiny_num_layers: int = opt(2, positive)
    tiny_seed: int = opt(0)
    dtype: str = opt("bfloat16", one_of(*DTYPES))
    frozen_dtype: str = opt("bfloat16", one_of(*DTYPES))
    remat: bool = opt(False)
    remat_policy: str = opt("full", one_of("full", "dots"))
    attention: str = opt("xla", one_of("xla", "cudnn", "jax_xla"))
    train_vit: bool = opt(False)
    train_connector: bool = opt(False)
    train_llm: bool = opt(True)
    train_embeddings: bool = opt(True)

    @property
    def tower_trains(self) -> bool:
        """True when the vision tower (or its merger) trains, so it runs inside the update."""
        return self.train_vit or self.train_connector


@dataclasses.dataclass(frozen=True)
class DataSettings:
    root: str | None = opt(None)
    train_file: str | None = opt(None)
    validation_file: str | None = opt(None)
    test_file: str | None = opt(None)
    on_error: str = opt("fail", one_of("fail", "skip"))
    prompt_template: str = opt("maye", registry(_prompt_templates, "prompt template"))
    min_pixels: int = opt(4 * 28 * 28, positive)
    max_pixels: int = opt(16384 * 28 * 28, positive)
    prompt_multiple: int = opt(64, positive)
    synth_dir: str | None = opt(None)
    synth_seed: int = opt(0)
    synth_flavour: str = opt("text_dominant", one_of("text_dominant", "vision_dominant"))
    synth_num_train: int = opt(64, positive)
    synth_num_validation: int = opt(16, positive)
    synth_num_test: int = opt(16, positive)
    synth_image_size: int = opt(112, positive)
    synth_max_number: int = opt(9, positive)
    synth_solution_style: str = opt("full", one_of("full", "short"))


@dataclasses.dataclass(frozen=True)
class ShardingSettings:
    fsdp: int = opt(1, positive)
    tp: int = opt(1, positive)
    dp: int | None = opt(None, positive)
    max_replicated_fraction: float | None = opt(0.05, in_range(0.0, 1.0))
    coordinator_address: str | None = opt(None)
    num_processes: int | None = opt(None, positive, none_off="-1")
    process_id: int | None = opt(None, non_negative, none_off="-1")
    local_device_ids: tuple[int, ...] | None = opt(None, each(non_negative))


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """The rollout component: which engine, how it samples, its compiled shapes."""

    engine: str = opt("jax", one_of("jax", "hf", "vllm"))
    temperature: float = opt(1.0, positive)
    top_p: float = opt(1.0, in_range(0.0, 1.0, low_open=True))
    top_k: int | None = opt(None, positive, none_off="-1")
    max_tokens: int = opt(2048, positive)
    num_samples: int = opt(1, positive)
    worker_python: str | None = opt(None)
    worker_devices: str | None = opt(None)
    worker_batch_rows: int = opt(64, positive)
    gpu_memory_utilization: float = opt(0.75, in_range(0.0, 1.0, low_open=True))
    max_model_len: int | None = opt(None, positive)
    max_num_batched_tokens: int | None = opt(None, positive)
    worker_cpus: str | None = opt(None, cpu_list)
    timeout_s: float = opt(600.0, positive)
    sampler_prompt_bucket: int = opt(64, positive)
    sampler_length_bucket: int = opt(128, positive)
    sampler_batch_bucket: int = opt(8, positive)
    sampler_max_rows: int | None = opt(256, positive)


@dataclasses.dataclass(frozen=True)
class RLSettings:
    num_epochs: int = opt(1, positive)
    batch_size: int = opt(896, positive)
    ppo_batch_size: int = opt(28, positive)
    ppo_epochs: int = opt(1, positive)
    micro_batch_size: int = opt(28, positive)
    forward_batch_size: int = opt(112, positive)
    advantage_estimator: str = opt(
        "reinforce_pp", registry(_advantage_estimators, "advantage estimator")
    )
    gamma: float = opt(1.0, in_range(0.0, 1.0))
    kl_reward_coeff: float = opt(0.0, non_negative)
    kl_loss_coeff: float = opt(0.001, non_negative)
    kl_estimator: str = opt("k3", registry(_kl_estimators, "KL estimator"))
    kl_loss_estimator: str = opt("k3", registry(_kl_estimators, "KL estimator"))
    kl_clamp: float | None = opt(10.0, positive)
    whiten: bool = opt(True)
    shift_mean: bool = opt(True)
    whiten_eps: float = opt(1e-8, positive)
    grpo_eps: float = opt(1e-6, non_negative)
    grpo_scale_by_std: bool = opt(True)
    policy_loss: str = opt("ppo_clip", registry(_policy_losses, "policy loss"))
    clip_eps_low: float = opt(0.2, in_range(0.0, 1.0))
    clip_eps_high: float = opt(0.2, non_negative)
    clip_ratio_c: float | None = opt(None, greater_than(1.0))
    gspo_clip_eps_low: float = opt(3e-4, in_range(0.0, 1.0))
    gspo_clip_eps_high: float = opt(4e-4, non_negative)
    loss_agg: str = opt("token_mean", registry(_loss_aggregations, "loss aggregation"))
    rollout_is_cap: float | None = opt(None, positive, none_off="0")
    logprob_chunk_size: int = opt(512, positive)
    response_len_buckets: int = opt(4, positive)
    async_rollouts: bool = opt(False)
    dynamic_sampling: bool = opt(False)
    dynamic_sampling_max_rounds: int = opt(10, positive)

    @property
    def uses_reference(self) -> bool:
        """True when a KL term needs the frozen reference model."""
        return self.kl_loss_coeff != 0 or self.kl_reward_coeff != 0


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = opt(5e-6, non_negative)
    b1: float = opt(0.9, in_range(0.0, 1.0))
    b2: float = opt(0.95, in_range(0.0, 1.0))
    eps: float = opt(1e-5, positive)
    weight_decay: float = opt(0.01, non_negative)
    max_grad_norm: float | None = opt(1.0, positive, none_off="0")
    schedule: str = opt("warmup_cosine", registry(_schedules, "schedule"))
    warmup_fraction: float = opt(0.1, in_range(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    names: tuple[str, ...] = opt(("accuracy", "language"), each(registry(_reward_names, "reward")))
    language_char_class: str = opt("cjk", registry(_char_classes, "character class"))
    timeout_s: float = opt(5.0, positive)
    num_workers: int | None = opt(None, positive)
    penalty: bool = opt(False)
    min_response_length: int = opt(0, non_negative)
    reward_penalty: float = opt(-0.1)
    overlong_buffer_len: int | None = opt(None, positive)
    overlong_penalty_factor: float = opt(1.0, non_negative)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    enabled: bool = opt(True)
    at_start: bool = opt(True)
    every_epochs: int = opt(1, positive)
    max_tokens: int = opt(2048, positive)
    splits: tuple[str, ...] = opt(("validation", "test"), each(one_of("validation", "test")))
    settings: tuple[str, ...] = opt(
        ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01"),
        each(registry(_eval_settings, "evaluation setting")),
    )
    save_responses: bool = opt(False)
    batch_size: int = opt(64, positive)


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    warmup_epochs: int | None = opt(None, positive, none_off="0")
    num_epochs: int | None = opt(None, positive)
    batch_size: int = opt(16, positive)
    micro_batch_size: int = opt(16, positive)
    learning_rate: float = opt(1e-5, non_negative)
    warmup_fraction: float = opt(0.1, in_range(0.0, 1.0))
    logprob_chunk_size: int = opt(512, positive)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """The checkpoint component: cadence, retention and the final HF export."""

    every_steps: int = opt(10, positive)
    keep: int = opt(2, positive)
    export_hf: bool = opt(True)
    keep_best: str | None = opt(None)


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    tensorboard: bool = opt(False)
    wandb: bool = opt(False)
    wandb_project: str = opt("maye-jax")
    save_rollouts: bool = opt(True)
    progress_bar: bool = opt(True)


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    seeds: tuple[int, ...] = opt((0, 1, 2), non_empty)
    warmup_epochs: int | None = opt(None, positive, none_off="0")
    sft_epochs: int | None = opt(None, positive, none_off="-1")
    sft_learning_rate: float | None = opt(None, positive, none_off="-1")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The whole run, typed. `config` is the ml_collections original (for run.json)."""

    name: str
    seed: int
    report_group: str
    output_dir: str
    resume: bool
    overwrite: bool
    model: ModelSettings
    data: DataSettings
    sharding: ShardingSettings
    rollout: RolloutSettings
    rl: RLSettings
    optim: OptimSettings
    rewards: RewardSettings
    eval: EvalSettings
    sft: SFTSettings
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    experiment: ExperimentSettings | None
    config: Any = dataclasses.field(compare=False, repr=False)

    def config_dict(self) -> dict:
        """The config as plain values (run.json, W&B)."""
        return _plain(self.config)

    # -- the component configs the math takes ----------------------------------------------
    def advantage_config(self):
        from maye_jax.rl.advantages import AdvantageConfig

        rl = self.rl
        return AdvantageConfig(
            gamma=rl.gamma,
            kl_reward_coeff=rl.kl_reward_coeff,
            kl_estimator=rl.kl_estimator,
            kl_clamp=rl.kl_clamp,
            whiten=rl.whiten,
            shift_mean=rl.shift_mean,
            whiten_eps=rl.whiten_eps,
            grpo_eps=rl.grpo_eps,
            grpo_scale_by_std=rl.grpo_scale_by_std,
        )

    def loss_config(self):
        from maye_jax.rl.losses import LossConfig

        rl = self.rl
        return LossConfig(
            policy_loss=rl.policy_loss,
            clip_eps_low=rl.clip_eps_low,
            clip_eps_high=rl.clip_eps_high,
            clip_ratio_c=rl.clip_ratio_c,
            gspo_clip_eps_low=rl.gspo_clip_eps_low,
            gspo_clip_eps_high=rl.gspo_clip_eps_high,
            kl_loss_coeff=rl.kl_loss_coeff,
            kl_loss_estimator=rl.kl_loss_estimator,
            kl_clamp=rl.kl_clamp,
            loss_agg=rl.loss_agg,
            max_tokens=self.rollout.max_tokens,
            rollout_is_cap=rl.rollout_is_cap,
        )

    def update_config(self):
        """The RL update step's options (the SFT step's are `sft_update_config`)."""
        from maye_jax.training.update import UpdateConfig

        return UpdateConfig(
            loss=self.loss_config(),
            temperature=self.rollout.temperature,
            logprob_chunk_size=self.rl.logprob_chunk_size,
        )

    def sft_update_config(self):
        from maye_jax.rl.losses import LossConfig
        from maye_jax.training.update import UpdateConfig

        return UpdateConfig(
            loss=LossConfig(policy_loss="nll", kl_loss_coeff=0.0, loss_agg="token_mean"),
            temperature=1.0,
            logprob_chunk_size=self.sft.logprob_chunk_size,
        )

    def optimizer_config(self, *, learning_rate=None, warmup_fraction=None):
        from maye_jax.training.optim import OptimizerConfig

        o = self.optim
        return OptimizerConfig(
            learning_rate=o.learning_rate if learning_rate is None else learning_rate,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            max_grad_norm=o.max_grad_norm,
            schedule=o.schedule,
            warmup_fraction=o.warmup_fraction if warmup_fraction is None else warmup_fraction,
        )

    def trajectory_config(self):
        from maye_jax.rl.trajectory import TrajectoryConfig

        r = self.rewards
        options = {
            "accuracy": {"timeout_s": r.timeout_s, "num_workers": r.num_workers},
            "language": {"char_class": r.language_char_class},
        }
        return TrajectoryConfig(
            reward_names=r.names,
            reward_options={k: v for k, v in options.items() if k in r.names},
            penalty=(
                {"min_response_length": r.min_response_length, "reward_penalty": r.reward_penalty}
                if r.penalty
                else None
            ),
            overlong=(
                {
                    "max_tokens": self.rollout.max_tokens,
                    "buffer_len": r.overlong_buffer_len,
                    "penalty_factor": r.overlong_penalty_factor,
                }
                if r.overlong_buffer_len is not None
                else None
            ),
            temperature=self.rollout.temperature,
            forward_batch_size=self.rl.forward_batch_size,
            chunk_size=self.rl.logprob_chunk_size,
            rows_multiple=self.rl.ppo_batch_size,
            max_tokens=self.rollout.max_tokens,
            response_len_buckets=self.rl.response_len_buckets,
            prompt_multiple=self.data.prompt_multiple,
        )

    @property
    def sft_epochs(self) -> int:
        """The SFT baseline's epochs (SPEC §5: as many as RL's unless set)."""
        return self.sft.num_epochs or self.rl.num_epochs


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "data": DataSettings,
    "sharding": ShardingSettings,
    "rollout": RolloutSettings,
    "rl": RLSettings,
    "optim": OptimSettings,
    "rewards": RewardSettings,
    "eval": EvalSettings,
    "sft": SFTSettings,
    "checkpoint": CheckpointSettings,
    "logging": LoggingSettings,
    "experiment": ExperimentSettings,
}
TOP_LEVEL = {
    "name": str,
    "seed": int,
    "report_group": str,
    "output_dir": str,
    "resume": bool,
    "overwrite": bool,
}


# --------------------------------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------------------------------


def _allowed_types(hint) -> tuple[tuple[type, ...], bool]:
    """(the value types a field accepts, whether None is accepted)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(a for a in args if a is not type(None)), type(None) in args


def _split_names(values) -> tuple:
    """A tuple option's items; "--config.eval.splits=validation,test" arrives as one string
    and means two items."""
    items = []
    for value in values:
        if isinstance(value, str):
            items.extend(part.strip() for part in value.split(",") if part.strip())
        else:
            items.append(value)
    return tuple(items)


def _coerce(value, hint, where: str, problems: list[str]):
    """`value` as the field's type; a problem appended when it is not of that type."""
    types_, accepts_none = _allowed_types(hint)
    if value is None or (value == "" and accepts_none):  # an empty path means "unset"
        if not accepts_none:
            problems.append(f"{where}: None: a value is required")
        return None
    kind = types_[0]
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            problems.append(f"{where}: {value!r}: expected a tuple")
            return value
        items = _split_names(value)
        if typing.get_args(kind)[0] is int:  # "0,1,2" from the command line
            items = tuple(
                int(i) if isinstance(i, str) and i.strip().isdigit() else i for i in items
            )
        if typing.get_args(kind)[0] is int and any(
            isinstance(i, bool) or not isinstance(i, int) for i in items
        ):
            problems.append(f"{where}: {value!r}: expected whole numbers")
        return items
    if kind is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: {value!r}: expected True or False")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: {value!r}: expected a whole number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: {value!r}: expected a number")
            return value
        if not math.isfinite(value):
            problems.append(f"{where}: {value!r}: must be finite")
        return float(value)
    if kind is str and not isinstance(value, str):
        problems.append(f"{where}: {value!r}: expected a string")
    return value


def _section(cls: type, values: Mapping[str, Any], prefix: str, problems: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    for name in unknown:
        problems.append(f"{prefix}.{name}: unknown option (known: {', '.join(fields)})")
    out = {}
    for name, field in fields.items():
        where = f"{prefix}.{name}"
        if name not in values:
            out[name] = field.default
            continue
        raw = values[name]
        off = field.metadata.get("none_off")
        if off is not None and raw is not None and not isinstance(raw, bool):
            if isinstance(raw, (int, float)) and float(raw) == float(off):
                problems.append(
                    f"{where}: {raw!r} no longer means off; leave it unset "
                    f"(--config.{prefix.split('.', 1)[1]}.{name}=None) to turn it off"
                )
                out[name] = None
                continue
        value = _coerce(raw, hints[name], where, problems)
        check = field.metadata.get("check")
        already_bad = any(p.startswith(where + ":") for p in problems)
        if value is not None and check is not None and not already_bad:
            problem = check(value)
            if problem:
                problems.append(f"{where}: {value!r}: {problem}")
        out[name] = value
    return cls(**out)


def _plain(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def load_settings(config, *, kind: str, check_files: bool = True) -> Settings:
    """Checks every value of `config` for a run of `kind` (rl | sft | evaluate | experiment)
    and returns the typed settings; raises ConfigError listing every problem, each naming
    its field. Reads from disk only whether the files it names exist (`check_files=False`:
    not even that, e.g. for a run whose start model an earlier run will write)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if config is None:
        raise ConfigError(["config: none given; pass --config=configs/<name>.py"])
    values = _plain(config)
    problems: list[str] = []
    top = {}
    for name, expected in TOP_LEVEL.items():
        value = values.get(name, False if expected is bool else None)
        top[name] = _coerce(value, expected, f"config.{name}", problems)
    unknown = sorted(set(values) - set(TOP_LEVEL) - set(SECTIONS))
    problems += [f"config.{name}: unknown option" for name in unknown]
    sections = {}
    for name, cls in SECTIONS.items():
        given = values.get(name)
        if given is None:
            sections[name] = None if name == "experiment" else cls()
            continue
        sections[name] = _section(cls, given, f"config.{name}", problems)
    if kind == "experiment" and sections["experiment"] is None:
        problems.append("config.experiment: the experiment needs an `experiment` section")
    settings = Settings(**top, **sections, config=config)
    if not problems:
        problems += cross_field_problems(settings, kind)
    if not problems and check_files:
        problems += _file_problems(settings, kind)
    if problems:
        raise ConfigError(problems)
    if kind in ("rl", "sft", "experiment"):
        rates = {"optim.learning_rate": settings.optim.learning_rate}
        if kind != "rl" or settings.sft.warmup_epochs:
            rates["sft.learning_rate"] = settings.sft.learning_rate
        for field, rate in rates.items():
            if rate == 0:
                log.warning("config.%s is 0: the weights will not change (a control run?)", field)
    return settings


def cross_field_problems(s: Settings, kind: str) -> list[str]:
    """Rules that tie fields together (sizes that must divide, options that need others)."""
    problems = []
    rl, rollout, sft = s.rl, s.rollout, s.sft

    def bad(field: str, message: str) -> None:
        problems.append(f"config.{field}: {message}")

    if not s.output_dir:
        bad("output_dir", "required")
    if not s.model.path and not s.model.tiny_family:
        bad("model.path", "set model.path (an HF directory or checkpoint) or model.tiny_family")
    if s.data.min_pixels > s.data.max_pixels:
        bad("data.min_pixels", f"{s.data.min_pixels} > data.max_pixels {s.data.max_pixels}")
    if kind in ("rl", "experiment"):
        if rl.batch_size % rollout.num_samples:
            bad(
                "rl.batch_size",
                f"{rl.batch_size} is not divisible by rollout.num_samples {rollout.num_samples}",
            )
        if rl.batch_size % rl.ppo_batch_size:
            bad(
                "rl.batch_size",
                f"{rl.batch_size} is not divisible by rl.ppo_batch_size {rl.ppo_batch_size}",
            )
        if rl.ppo_batch_size % rl.micro_batch_size:
            bad(
                "rl.ppo_batch_size",
                f"{rl.ppo_batch_size} is not divisible by rl.micro_batch_size "
                f"{rl.micro_batch_size}",
            )
        group_estimators = ("grpo", "rloo", "reinforce_pp_baseline")
        if rl.advantage_estimator in group_estimators and rollout.num_samples < 2:
            bad(
                "rollout.num_samples",
                f"{rl.advantage_estimator} compares the samples of a prompt: needs >= 2, "
                f"got {rollout.num_samples}",
            )
        if rl.dynamic_sampling and rollout.num_samples < 2:
            bad(
                "rl.dynamic_sampling",
                "drops prompt groups whose scores are all equal: needs rollout.num_samples >= 2 "
                f"(a single sample is always its own group), got {rollout.num_samples}",
            )
        if kind == "rl" and sft.num_epochs is not None:
            bad(
                "sft.num_epochs",
                "is the SFT baseline's epoch count; the SFT warm-up before RL is sft.warmup_epochs",
            )
    if kind in ("sft", "experiment") or (kind == "rl" and sft.warmup_epochs):
        if sft.batch_size % sft.micro_batch_size:
            bad(
                "sft.batch_size",
                f"{sft.batch_size} is not divisible by sft.micro_batch_size {sft.micro_batch_size}",
            )
    if rl.policy_loss == "gspo" and rl.loss_agg != "seq_mean_token_mean":
        bad(
            "rl.loss_agg",
            f"{rl.loss_agg!r}: policy_loss=gspo averages per sequence; "
            "set rl.loss_agg=seq_mean_token_mean",
        )
    if rl.clip_ratio_c is not None and rl.policy_loss != "ppo_clip":
        bad("rl.clip_ratio_c", f"dual-clip is part of ppo_clip, not of {rl.policy_loss}")
    overlong = s.rewards.overlong_buffer_len
    if overlong is not None and overlong > rollout.max_tokens:
        bad(
            "rewards.overlong_buffer_len",
            f"{overlong} is more than rollout.max_tokens {rollout.max_tokens}",
        )
    if rollout.engine == "jax" and (
        rollout.worker_python or rollout.worker_devices or rollout.worker_cpus
    ):
        bad("rollout.worker_python", "only the hf and vllm engines run a worker process")
    if kind in ("rl", "experiment") and rl.async_rollouts:
        problems.extend(_async_rollout_problems(s))
    if s.model.attention == "cudnn" and s.model.dtype == "float32":
        bad("model.attention", "cudnn flash attention needs model.dtype=bfloat16")
    problems += multiprocess_problems(s, kind)
    problems += _keep_best_problems(s)
    if s.resume and s.overwrite:
        bad("overwrite", "cannot be combined with resume=True (resume keeps the run's outputs)")
    return problems


def _keep_best_problems(s: Settings) -> list[str]:
    """`checkpoint.keep_best` names a metric the run's evaluations write."""
    name = s.checkpoint.keep_best
    if name is None:
        return []
    field = "config.checkpoint.keep_best"
    if not s.eval.enabled:
        return [f"{field}: needs evaluations (eval.enabled=True)"]
    known = [f"eval/{split}/{setting}" for split in s.eval.splits for setting in s.eval.settings]
    if name not in known:
        return [
            f"{field}: {name!r} is not a metric the evaluations write; known: {', '.join(known)}"
        ]
    return []


def _async_rollout_problems(s: Settings) -> list[str]:
    """What `rl.async_rollouts` needs, and what it is not built for yet."""
    problems = []
    if s.rollout.engine == "jax":
        problems.append(
            "config.rl.async_rollouts: needs a worker engine (rollout.engine=hf or vllm): the "
            "in-process JAX sampler shares the trainer's devices"
        )
    if s.rl.rollout_is_cap is None:
        problems.append(
            "config.rl.rollout_is_cap: required with rl.async_rollouts (e.g. 2.0): responses are "
            "one update stale, and the truncated importance weight corrects for it"
        )
    if s.rl.dynamic_sampling:
        problems.append(
            "config.rl.async_rollouts: not built with rl.dynamic_sampling yet (its top-ups "
            "depend on the step's own rewards)"
        )
    return problems


def multiprocess_problems(s: Settings, kind: str, processes: int | None = None) -> list[str]:
    """What several processes do not support (yet), or cannot split evenly (`processes`: the
    actual count, once known; else the configured one)."""
    processes = processes or s.sharding.num_processes
    if not processes or processes == 1:
        return []
    problems = []
    if s.model.tower_trains:
        problems.append(
            "config.model.train_vit: a vision tower that trains is not supported with several "
            "processes (each micro-batch packs every host's images)"
        )
    if kind in ("rl", "experiment"):
        prompts = s.rl.batch_size // s.rollout.num_samples
        if prompts % processes:
            problems.append(
                f"config.rl.batch_size: {prompts} prompts per step do not split over "
                f"{processes} processes"
            )
        if s.rl.dynamic_sampling:
            problems.append("config.rl.dynamic_sampling: not supported with several processes")
        if s.rl.async_rollouts:
            problems.append(
                "config.rl.async_rollouts: not built for several processes yet (one worker "
                "serves one trainer process)"
            )
    if (kind in ("sft", "experiment") or s.sft.warmup_epochs) and s.sft.batch_size % processes:
        problems.append(
            f"config.sft.batch_size: {s.sft.batch_size} does not split over {processes} processes"
        )
    if s.sharding.process_id is not None and s.sharding.process_id >= processes:
        problems.append(
            f"config.sharding.process_id: {s.sharding.process_id} >= num_processes {processes}"
        )
    return problems


def data_file(settings: Settings, split: str) -> str | None:
    """The configured jsonl file of `split` (resolved against data.root), or None."""
    from pathlib import Path

    name = getattr(settings.data, f"{split}_file")
    if not name:
        return None
    if settings.data.root and not Path(name).is_absolute():
        return str(Path(settings.data.root) / name)
    return name


def _file_problems(s: Settings, kind: str) -> list[str]:
    """Files the run will read, checked before any work: the start model, the training data
    (unless generated) and every split evaluation is asked to run on."""
    from pathlib import Path

    problems = []
    if s.model.path:
        path = Path(s.model.path)
        if not ((path / "config.json").is_file() or (path / "maye_jax.json").is_file()):
            problems.append(
                f"config.model.path: {s.model.path}: not a model folder (no config.json; an HF "
                "model directory or a maye-jax checkpoint is expected)"
            )
    if kind == "evaluate" or s.data.synth_dir:  # synthetic data: every split is generated
        return problems
    needed = {"train": "required (or data.synth_dir to generate data)"}
    if s.eval.enabled:
        for split in s.eval.splits:
            needed[split] = f"eval.splits includes {split}: set the file or drop the split"
    for split, why in needed.items():
        path = data_file(s, split)
        if path is None:
            problems.append(f"config.data.{split}_file: unset: {why}")
        elif not Path(path).is_file():
            problems.append(f"config.data.{split}_file: {path}: no such file")
    return problems
