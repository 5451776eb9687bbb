"""Typed, validated settings: the ml_collections config of the command line, checked once.

    settings = load_settings(config, kind="rl")   # raises ConfigError naming every bad field

The command line keeps ml_collections (`--config.rl.batch_size=64`); at start-up, before any
data, mesh or model work, every value is checked (type, range, registry name, cross-field
rules) and the run reads frozen dataclasses from then on: one per config section, and the
component configs the math takes (`advantage_config`, `loss_config`, `optimizer_config`,
`update_config`, `trajectory_config`). A bad value is reported as
`config.rl.batch_size: -8: must be > 0`, every one at once.

Every option (its type, default, rule and meaning) is declared once, in
maye_jax/config/options.py; the cross-field rules are in maye_jax/config/cross_checks.py. An
option that can be off is None when off: 0 or -1 for "off" (the old spelling of
`rl.rollout_is_cap`, `rollout.top_k`, `optim.max_grad_norm`, ...) is refused with the new one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from collections.abc import Mapping
from typing import Any

from maye_jax.config.options import (
    OPTIONAL_SECTIONS,
    SECTIONS,
    CheckpointSettings,
    DataSettings,
    EvalSettings,
    ExperimentSettings,
    LoggingSettings,
    ModelSettings,
    OptimSettings,
    Option,
    RewardSettings,
    RLSettings,
    RolloutSettings,
    RunOptions,
    SFTSettings,
    ShardingSettings,
    allowed_types,
    options_of,
)
from maye_jax.errors import UserError

log = logging.getLogger("maye_jax")

KINDS = ("rl", "sft", "evaluate", "experiment")


class ConfigError(UserError, ValueError):
    """One line per bad value, each naming its field (`config.section.name: value: why`)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _section(cls: type):
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class Settings(RunOptions):
    """The whole run, typed: the top-level options (`RunOptions`) and one frozen dataclass per
    section (maye_jax/config/options.py). `config` is the ml_collections original (run.json)."""

    model: ModelSettings = _section(ModelSettings)
    data: DataSettings = _section(DataSettings)
    sharding: ShardingSettings = _section(ShardingSettings)
    rollout: RolloutSettings = _section(RolloutSettings)
    rl: RLSettings = _section(RLSettings)
    optim: OptimSettings = _section(OptimSettings)
    rewards: RewardSettings = _section(RewardSettings)
    eval: EvalSettings = _section(EvalSettings)
    sft: SFTSettings = _section(SFTSettings)
    checkpoint: CheckpointSettings = _section(CheckpointSettings)
    logging: LoggingSettings = _section(LoggingSettings)
    experiment: ExperimentSettings | None = None  # only `python -m maye_jax.experiment` has it
    config: Any = dataclasses.field(default=None, compare=False, repr=False)

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
        from maye_jax.rl.user_rewards import register_functions

        r = self.rewards
        weights = register_functions(r.functions)  # built-in rewards: weight 1.0
        options = {
            "accuracy": {"timeout_s": r.timeout_s, "num_workers": r.num_workers},
            "language": {"char_class": r.language_char_class},
        }
        for name in weights:
            options[name] = {"timeout_s": r.timeout_s, "num_workers": r.num_workers}
        names = r.names + tuple(name for name in weights if name not in r.names)
        return TrajectoryConfig(
            reward_names=names,
            reward_options={k: v for k, v in options.items() if k in names},
            reward_weights=weights,
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


# --------------------------------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------------------------------


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
    types_ = allowed_types(hint)
    accepts_none = type(None) in types_
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


def _checked(option: Option, raw, problems: list[str]):
    """`raw` (the config's value of `option`) coerced to its type and checked by its rule; each
    problem appended as `config.<key>: <value>: why`."""
    where = f"config.{option.key}"
    off = option.none_off
    if off is not None and raw is not None and not isinstance(raw, bool):
        if isinstance(raw, (int, float)) and float(raw) == float(off):
            problems.append(
                f"{where}: {raw!r} no longer means off; leave it unset "
                f"(--config.{option.key}=None) to turn it off"
            )
            return None
    value = _coerce(raw, option.hint, where, problems)
    already_bad = any(p.startswith(where + ":") for p in problems)
    if value is not None and option.rule is not None and not already_bad:
        problem = option.rule(value)
        if problem:
            problems.append(f"{where}: {value!r}: {problem}")
    return value


def _section(cls: type, values: Mapping[str, Any], name: str, problems: list[str]):
    """The section `name` of the config as its typed dataclass (an unset option: its default)."""
    options = {option.key.rpartition(".")[2]: option for option in options_of(cls, f"{name}.")}
    for unknown in sorted(set(values) - set(options)):
        problems.append(f"config.{name}.{unknown}: unknown option (known: {', '.join(options)})")
    return cls(
        **{
            field: _checked(option, values[field], problems) if field in values else option.default
            for field, option in options.items()
        }
    )


def section_settings(name: str, **values):
    """One section's typed settings from `values` (the rest: declared defaults), checked like a
    run's config: e.g. `section_settings("rollout", engine="hf")` for a tool without --config."""
    problems: list[str] = []
    section = _section(SECTIONS[name], values, name, problems)
    if problems:
        raise ConfigError(problems)
    if name == "data":
        from maye_jax.data.layouts import with_layout_defaults

        section = with_layout_defaults(section)
    return section


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
    for option in options_of(RunOptions):
        missing = False if option.hint is bool else None  # the others are required
        top[option.key] = _checked(option, values.get(option.key, missing), problems)
    unknown = sorted(set(values) - set(top) - set(SECTIONS))
    problems += [f"config.{name}: unknown option" for name in unknown]
    sections = {}
    for name, cls in SECTIONS.items():
        given = values.get(name)
        if given is None:
            sections[name] = None if name in OPTIONAL_SECTIONS else cls()
            continue
        sections[name] = _section(cls, given, name, problems)
    if kind == "experiment" and sections["experiment"] is None:
        problems.append("config.experiment: the experiment needs an `experiment` section")
    if not problems:  # the data's keys, ground truth and template: the layout's unless set
        from maye_jax.data.layouts import with_layout_defaults

        sections["data"] = with_layout_defaults(sections["data"])
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
