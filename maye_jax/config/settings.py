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
from collections.abc import Mapping
from typing import Any

from maye_jax.config.field_rules import (
    DTYPES,
    cpu_list,
    each,
    greater_than,
    in_range,
    known_advantage_estimators,
    known_char_classes,
    known_eval_settings,
    known_kl_estimators,
    known_loss_aggregations,
    known_policy_losses,
    known_prompt_templates,
    known_reward_names,
    known_schedules,
    non_empty,
    non_negative,
    one_of,
    opt,
    positive,
    registry,
)
from maye_jax.errors import UserError

log = logging.getLogger("maye_jax")

KINDS = ("rl", "sft", "evaluate", "experiment")


class ConfigError(UserError, ValueError):
    """One line per bad value, each naming its field (`config.section.name: value: why`)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


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
    prompt_template: str = opt("maye", registry(known_prompt_templates, "prompt template"))
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
        "reinforce_pp", registry(known_advantage_estimators, "advantage estimator")
    )
    gamma: float = opt(1.0, in_range(0.0, 1.0))
    kl_reward_coeff: float = opt(0.0, non_negative)
    kl_loss_coeff: float = opt(0.001, non_negative)
    kl_estimator: str = opt("k3", registry(known_kl_estimators, "KL estimator"))
    kl_loss_estimator: str = opt("k3", registry(known_kl_estimators, "KL estimator"))
    kl_clamp: float | None = opt(10.0, positive)
    whiten: bool = opt(True)
    shift_mean: bool = opt(True)
    whiten_eps: float = opt(1e-8, positive)
    grpo_eps: float = opt(1e-6, non_negative)
    grpo_scale_by_std: bool = opt(True)
    policy_loss: str = opt("ppo_clip", registry(known_policy_losses, "policy loss"))
    clip_eps_low: float = opt(0.2, in_range(0.0, 1.0))
    clip_eps_high: float = opt(0.2, non_negative)
    clip_ratio_c: float | None = opt(None, greater_than(1.0))
    gspo_clip_eps_low: float = opt(3e-4, in_range(0.0, 1.0))
    gspo_clip_eps_high: float = opt(4e-4, non_negative)
    loss_agg: str = opt("token_mean", registry(known_loss_aggregations, "loss aggregation"))
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
    schedule: str = opt("warmup_cosine", registry(known_schedules, "schedule"))
    warmup_fraction: float = opt(0.1, in_range(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    names: tuple[str, ...] = opt(
        ("accuracy", "language"), each(registry(known_reward_names, "reward"))
    )
    language_char_class: str = opt("cjk", registry(known_char_classes, "character class"))
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
        each(registry(known_eval_settings, "evaluation setting")),
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
    from maye_jax.config.cross_checks import cross_field_problems, file_problems

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
        problems += file_problems(settings, kind)
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
