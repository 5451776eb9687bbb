"""Every option of a run, declared once: name, type, default, allowed values and one line of
meaning, as one line each (this module is that list, so it is longer than most).

    batch_size: int = opt(896, positive, "responses per generation step (global)")

Everything else derives from these declarations: `default_config()` (the ml_collections config
that `configs/*.py` build on and `--config.*` overrides; maye_jax/config/defaults.py), the typed
settings a run reads (these frozen dataclasses themselves, `load_settings` in
maye_jax/config/settings.py), the check of every value at start-up (`rule`), the defaults of
the math's component configs (`AdvantageConfig`, `LossConfig`, `OptimizerConfig` read them
here) and the options listing (`option_lines`). Adding an option is adding its line.

Batch sizes are global numbers (all devices together). An option that can be off is None when
off (its type is `X | None`; `--config.x=None` turns it off); `none_off` names the old "off"
spelling (0 or -1), now refused with a message naming None.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

from maye_jax.config.field_rules import (
    DATA_FORMATS,
    DATA_LAYOUTS,
    DTYPES,
    Rule,
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
    positive,
    registry,
    reward_function,
)


def opt(default: Any, rule: Rule | str | None = None, meaning: str = "", *, none_off=None):
    """One option: its default, its rule (None: any value of its type) and one line of meaning;
    `opt(default, meaning)` when any value of the type is allowed. `none_off`: the old "off"
    spelling ("0", "-1") of an option that is None when off."""
    if isinstance(rule, str):
        rule, meaning = None, rule
    if not meaning:
        raise ValueError("every option says what it means")
    metadata = dict(check=rule, meaning=meaning, none_off=none_off)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------------
# The sections (`config.<section>.<name>`)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str | None = opt(None, "the policy: an HF model directory or a maye-jax checkpoint")
    tiny_family: str | None = opt(
        None,
        one_of("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
        "without model.path: a tiny random model of it",
    )
    tiny_hidden_size: int = opt(64, positive, "the tiny model's hidden size")
    tiny_num_layers: int = opt(2, positive, "the tiny model's decoder layers")
    tiny_seed: int = opt(0, "the tiny model's initialisation seed")
    dtype: str = opt("bfloat16", one_of(*DTYPES), "compute dtype")
    frozen_dtype: str = opt("bfloat16", one_of(*DTYPES), "dtype of the parameters that never train")
    remat: bool = opt(False, "rematerialise each decoder layer in the backward pass")
    remat_policy: str = opt(
        "full", one_of("full", "dots"), "with remat: keep the layer input, or also its products"
    )
    attention: str = opt(
        "xla", one_of("xla", "cudnn", "jax_xla"), "attention kernel (cudnn: flash, GPU, bf16)"
    )
    train_vit: bool = opt(False, "train the vision tower")
    train_connector: bool = opt(False, "train the merger between the vision tower and the LLM")
    train_llm: bool = opt(True, "train the language model")
    train_embeddings: bool = opt(True, "with train_llm: also the token embeddings and lm_head")

    @property
    def tower_trains(self) -> bool:
        """True when the vision tower (or its merger) trains, so it runs inside the update."""
        return self.train_vit or self.train_connector


@dataclasses.dataclass(frozen=True)
class DataSettings:
    root: str | None = opt(None, "relative data files resolve against this folder")
    train_file: str | None = opt(
        None, "the training split: .jsonl, .parquet or save_to_disk folder"
    )
    validation_file: str | None = opt(None, "the validation split (as train_file)")
    test_file: str | None = opt(None, "the test split (as train_file)")
    format: str | None = opt(
        None, one_of(*DATA_FORMATS), "jsonl, parquet or arrow (save_to_disk); None: from each path"
    )
    layout: str = opt(
        "maye", one_of(*DATA_LAYOUTS), "where a row's question, answer, images... are (presets)"
    )
    question_key: str | None = opt(None, "the question's column (a.b: nested); None: the layout's")
    answer_key: str | None = opt(None, "the answer's column; None: the layout's")
    solution_key: str | None = opt(None, "the golden solution's column; None: the layout's")
    images_key: str | None = opt(None, "the images' column (paths or bytes); None: the layout's")
    id_key: str | None = opt(None, "the record id's column; None: the layout's")
    ground_truth: str | None = opt(
        None,
        one_of("solution_boxed", "answer"),
        "accuracy compares with the solution's last \\boxed{} or the answer; None: layout's",
    )
    on_error: str = opt("fail", one_of("fail", "skip"), "a bad record stops the run, or is skipped")
    max_prompt_tokens: int | None = opt(
        None,
        positive,
        "the longest prompt in tokens, images counted; None: the context minus rollout.max_tokens",
    )
    prompt_template: str | None = opt(
        None,
        registry(known_prompt_templates, "prompt template"),
        "the instruction template; None: the layout's (maye; plain for geo3k_verl)",
    )
    min_pixels: int = opt(4 * 28 * 28, positive, "an image is resized to at least this many pixels")
    max_pixels: int = opt(16384 * 28 * 28, positive, "... and to at most this many")
    prompt_multiple: int = opt(
        64, positive, "prompt columns of the RL and SFT batches round up to this"
    )
    synth_dir: str | None = opt(None, "set: generate a synthetic dataset here first")
    synth_seed: int = opt(0, "the synthetic dataset's seed (the same across run seeds)")
    synth_flavour: str = opt(
        "text_dominant",
        one_of("text_dominant", "vision_dominant"),
        "where the problem's numbers are: text or image",
    )
    synth_num_train: int = opt(64, positive, "synthetic training problems")
    synth_num_validation: int = opt(16, positive, "synthetic validation problems")
    synth_num_test: int = opt(16, positive, "synthetic test problems (out of distribution)")
    synth_image_size: int = opt(112, positive, "synthetic images' side in pixels")
    synth_max_number: int = opt(9, positive, "text-dominant side lengths are 2..this")
    synth_solution_style: str = opt(
        "full", one_of("full", "short"), "golden solutions in full, or computation + box only"
    )


@dataclasses.dataclass(frozen=True)
class ShardingSettings:
    fsdp: int = opt(1, positive, "devices the weights shard over (per host with several hosts)")
    tp: int = opt(1, positive, "tensor-parallel devices")
    dp: int | None = opt(
        None, positive, "data-parallel rows; None: one per process (HSDP), 1: FSDP across hosts"
    )
    max_replicated_fraction: float | None = opt(
        0.05, in_range(0.0, 1.0), "largest share of the weights left unsharded"
    )
    coordinator_address: str | None = opt(
        None, "jax.distributed's coordinator, e.g. node0:12345; None: $MAYE_COORDINATOR"
    )
    num_processes: int | None = opt(
        None, positive, "processes of the run; None: $MAYE_NUM_PROCESSES", none_off="-1"
    )
    process_id: int | None = opt(
        None, non_negative, "this process's index; None: $MAYE_PROCESS_ID", none_off="-1"
    )
    local_device_ids: tuple[int, ...] | None = opt(
        None, each(non_negative), "this host's training accelerators, e.g. 0,1,2,3,4,5,6"
    )


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """The rollout component: which engine, how it samples, its compiled shapes."""

    engine: str = opt("jax", one_of("jax", "hf", "vllm"), "in-process JAX sampler, or a worker")
    temperature: float = opt(1.0, positive, "sampling temperature (the trainer's logprobs too)")
    top_p: float = opt(1.0, in_range(0.0, 1.0, low_open=True), "nucleus sampling's mass")
    top_k: int | None = opt(None, positive, "top-k truncation; None: off", none_off="-1")
    max_tokens: int = opt(2048, positive, "the longest response")
    num_samples: int = opt(1, positive, "responses per prompt (GRPO and RLOO need >= 2)")
    worker_python: str | None = opt(None, "the worker's interpreter (vllm: .venv-vllm)")
    worker_devices: str | None = opt(None, "the worker's CUDA_VISIBLE_DEVICES, e.g. 7")
    worker_batch_rows: int = opt(64, positive, "the hf worker's rows per generate call")
    gpu_memory_utilization: float = opt(
        0.75, in_range(0.0, 1.0, low_open=True), "vLLM's share of its GPU"
    )
    max_model_len: int | None = opt(None, positive, "vLLM's context length; None: the model's own")
    max_num_batched_tokens: int | None = opt(
        None, positive, "vLLM's prompt tokens per step; None: 16384 on CPU, vLLM's on a GPU"
    )
    worker_cpus: str | None = opt(None, cpu_list, "pin the worker to these CPUs; None: all")
    timeout_s: float = opt(600.0, positive, "seconds a worker may take for one request")
    sampler_prompt_bucket: int = opt(
        16,
        positive,
        "the JAX sampler's prompt columns round to a multiple of this, or of 1/8 of their"
        " length rounded down to a power of two, whichever is larger",
    )
    sampler_length_bucket: int = opt(
        128, positive, "the JAX sampler's response columns round to this"
    )
    sampler_batch_bucket: int = opt(
        8, positive, "the JAX sampler's rows round to powers of two >= this"
    )
    sampler_max_rows: int | None = opt(256, positive, "the JAX sampler's rows per call at most")


@dataclasses.dataclass(frozen=True)
class RLSettings:
    num_epochs: int = opt(1, positive, "passes over the training prompts")
    batch_size: int = opt(896, positive, "responses per generation step (global)")
    ppo_batch_size: int = opt(28, positive, "rows per update (global)")
    ppo_epochs: int = opt(1, positive, "passes over a step's responses")
    micro_batch_size: int = opt(
        28, positive, "rows per micro-batch (gradient accumulation inside an update)"
    )
    forward_batch_size: int = opt(
        112, positive, "rows per logprob forward when building trajectories"
    )
    advantage_estimator: str = opt(
        "reinforce_pp",
        registry(known_advantage_estimators, "advantage estimator"),
        "how scores become advantages",
    )
    gamma: float = opt(1.0, in_range(0.0, 1.0), "discount of the token rewards' returns")
    kl_reward_coeff: float = opt(0.0, non_negative, "weight of the KL reward (reinforce_pp*)")
    kl_loss_coeff: float = opt(0.001, non_negative, "weight of the KL loss")
    kl_estimator: str = opt(
        "k3", registry(known_kl_estimators, "KL estimator"), "estimator of the KL reward"
    )
    kl_loss_estimator: str = opt(
        "k3", registry(known_kl_estimators, "KL estimator"), "estimator of the KL loss"
    )
    kl_clamp: float | None = opt(
        10.0, positive, "per-token clamp of both KL terms to [-c, c]; None: no clamp"
    )
    whiten: bool = opt(True, "whiten the returns over the batch (reinforce_pp*)")
    shift_mean: bool = opt(
        True, "add the mean back after whitening (MAYE; verl/TRL's True is False here)"
    )
    whiten_eps: float = opt(1e-8, positive, "added to the variance when whitening")
    grpo_eps: float = opt(1e-6, non_negative, "GRPO: (score - mean) / (std + grpo_eps)")
    grpo_scale_by_std: bool = opt(True, "GRPO divides by the group's std; False: Dr.GRPO")
    policy_loss: str = opt(
        "ppo_clip", registry(known_policy_losses, "policy loss"), "the policy objective"
    )
    clip_eps_low: float = opt(0.2, in_range(0.0, 1.0), "PPO clips the ratio at 1 - this")
    clip_eps_high: float = opt(0.2, non_negative, "... and at 1 + this")
    clip_ratio_c: float | None = opt(
        None, greater_than(1.0), "PPO dual-clip's bound for negative advantages, e.g. 3.0"
    )
    gspo_clip_eps_low: float = opt(
        3e-4, in_range(0.0, 1.0), "GSPO clips the sequence ratio at 1 - this"
    )
    gspo_clip_eps_high: float = opt(4e-4, non_negative, "... and at 1 + this")
    loss_agg: str = opt(
        "token_mean",
        registry(known_loss_aggregations, "loss aggregation"),
        "how token losses average into the loss",
    )
    rollout_is_cap: float | None = opt(
        None, positive, "truncated importance sampling's cap, e.g. 2.0; None: off", none_off="0"
    )
    logprob_chunk_size: int = opt(512, positive, "sequence chunk of the logits (memory)")
    response_len_buckets: int = opt(
        4, positive, "response column widths max_tokens / 2^k, k < this; 1: max_tokens"
    )
    async_rollouts: bool = opt(False, "generate step n+1 during step n's update (hf/vllm)")
    dynamic_sampling: bool = opt(False, "DAPO: replace prompt groups whose scores are all equal")
    dynamic_sampling_max_rounds: int = opt(10, positive, "top-up rounds per step at most")

    @property
    def uses_reference(self) -> bool:
        """True when a KL term needs the frozen reference model."""
        return self.kl_loss_coeff != 0 or self.kl_reward_coeff != 0


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = opt(5e-6, non_negative, "AdamW's peak learning rate")
    b1: float = opt(0.9, in_range(0.0, 1.0), "AdamW's beta1")
    b2: float = opt(0.95, in_range(0.0, 1.0), "AdamW's beta2")
    eps: float = opt(1e-5, positive, "AdamW's epsilon")
    weight_decay: float = opt(0.01, non_negative, "AdamW's decoupled weight decay")
    max_grad_norm: float | None = opt(
        1.0, positive, "global-norm gradient clip; None: no clipping", none_off="0"
    )
    schedule: str = opt(
        "warmup_cosine", registry(known_schedules, "schedule"), "the learning-rate schedule"
    )
    warmup_fraction: float = opt(0.1, in_range(0.0, 1.0), "share of the updates spent warming up")


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    names: tuple[str, ...] = opt(
        ("accuracy", "language"),
        each(registry(known_reward_names, "reward")),
        "the rewards summed into a response's score",
    )
    functions: tuple[str, ...] = opt(
        (),
        each(reward_function),
        "your reward functions (file.py:fn or module:fn, =weight), added to rewards.names",
    )
    language_char_class: str = opt(
        "cjk", registry(known_char_classes, "character class"), "the language reward's penalty"
    )
    timeout_s: float = opt(5.0, positive, "seconds math-verify may take per answer")
    num_workers: int | None = opt(None, positive, "math-verify processes; None: from the CPU count")
    penalty: bool = opt(False, "the original's no-EOS / too-short penalty instead of the score")
    min_response_length: int = opt(
        0, non_negative, "too short: the last valid token's index is below this"
    )
    reward_penalty: float = opt(-0.1, "the score of a penalised response")
    overlong_buffer_len: int | None = opt(
        None, positive, "DAPO's soft overlong penalty over the last this many tokens; None: off"
    )
    overlong_penalty_factor: float = opt(
        1.0, non_negative, "the overlong penalty at max_tokens is minus this"
    )


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    enabled: bool = opt(True, "evaluate after every eval.every_epochs epochs")
    at_start: bool = opt(True, "also evaluate the start weights (epoch 0)")
    every_epochs: int = opt(1, positive, "epochs between evaluations")
    max_tokens: int = opt(2048, positive, "the longest evaluation response")
    splits: tuple[str, ...] = opt(
        ("validation", "test"), each(one_of("validation", "test")), "the evaluated splits"
    )
    settings: tuple[str, ...] = opt(
        ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01"),
        each(registry(known_eval_settings, "evaluation setting")),
        "the scheme's generation settings",
    )
    save_responses: bool = opt(False, "write every evaluation response to eval_responses/")
    batch_size: int = opt(64, positive, "prompts per evaluation generate call")


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    warmup_epochs: int | None = opt(
        None, positive, "RL runs: SFT epochs before RL; None: none", none_off="0"
    )
    num_epochs: int | None = opt(
        None, positive, "the SFT baseline's epochs; None: as many as rl.num_epochs"
    )
    batch_size: int = opt(16, positive, "records per SFT step (global)")
    micro_batch_size: int = opt(16, positive, "rows per SFT micro-batch")
    learning_rate: float = opt(1e-5, non_negative, "SFT's peak learning rate")
    warmup_fraction: float = opt(0.1, in_range(0.0, 1.0), "share of SFT's steps warming up")
    logprob_chunk_size: int = opt(512, positive, "SFT's sequence chunk of the logits")


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """The checkpoint component: cadence, retention and the final HF export."""

    every_steps: int = opt(10, positive, "steps between checkpoints (also at the end, on a stop)")
    keep: int = opt(2, positive, "the newest checkpoints kept")
    export_hf: bool = opt(True, "write the final policy as an HF folder (final_hf/)")
    keep_best: str | None = opt(
        None,
        "keep the checkpoint of this metric's best evaluation, e.g. eval/validation/pass@1_t0.6",
    )


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    tensorboard: bool = opt(False, "also write TensorBoard events")
    wandb: bool = opt(False, "also log to W&B (offline unless WANDB_MODE says otherwise)")
    wandb_project: str = opt("maye-jax", "the W&B project")
    save_rollouts: bool = opt(True, "write every step's responses to rollouts/")
    progress_bar: bool = opt(True, "progress bars on stderr")


@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """`python -m maye_jax.experiment`'s section (maye_jax/experiment.py); absent elsewhere."""

    seeds: tuple[int, ...] = opt((0, 1, 2), non_empty, "the seeds of each arm")
    warmup_epochs: int | None = opt(
        None, positive, "SFT epochs of the shared start model; None: start from model", none_off="0"
    )
    sft_epochs: int | None = opt(
        None, positive, "the SFT arm's epochs; None: rl.num_epochs", none_off="-1"
    )
    sft_learning_rate: float | None = opt(
        None, positive, "the SFT arm's learning rate; None: sft.learning_rate", none_off="-1"
    )


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The top-level options (`config.<name>`)."""

    name: str = opt("run", "the run's name (run.json, W&B, progress bars)")
    seed: int = opt(0, "the run's seed: data order, sampling, SFT batches")
    report_group: str = opt("", "runs of the same group share a report table")
    output_dir: str = opt("runs/run", "the run's folder")
    resume: bool = opt(False, "continue from the newest intact checkpoint in output_dir")
    overwrite: bool = opt(False, "a new run may delete another run's outputs in output_dir")


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
OPTIONAL_SECTIONS = ("experiment",)  # present only where a command needs it


# --------------------------------------------------------------------------------------------------
# Reading the declarations
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One declared option, as the config, the checks and the listing read it."""

    key: str  # "rl.batch_size"
    hint: Any  # the declared type, e.g. int | None
    default: Any
    rule: Rule | None
    meaning: str
    none_off: str | None

    @property
    def optional(self) -> bool:
        """None is allowed (the option can be off or unset)."""
        return type(None) in allowed_types(self.hint)[1:]

    @property
    def value_type(self) -> type:
        """The type of a set value (tuple for a tuple option)."""
        kind = allowed_types(self.hint)[0]
        return typing.get_origin(kind) or kind

    def type_name(self) -> str:
        return type_name(self.hint)


def allowed_types(hint) -> tuple:
    """(the value type, then NoneType when None is allowed)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(a for a in args if a is not type(None)) + tuple(a for a in args if a is type(None))


def type_name(hint) -> str:
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return text.replace("typing.", "")


def options_of(cls: type, prefix: str = "") -> Iterator[Option]:
    """The options a section (or `RunOptions`) declares, in declaration order."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        yield Option(
            f"{prefix}{field.name}",
            hints[field.name],
            field.default,
            meta["check"],
            meta["meaning"],
            meta["none_off"],
        )


def all_options() -> list[Option]:
    """Every option: the top-level ones, then each section's."""
    options = list(options_of(RunOptions))
    for name, cls in SECTIONS.items():
        options += options_of(cls, f"{name}.")
    return options


def option_lines() -> list[str]:
    """The options listing: `key  type  default  allowed  meaning`, one option per line."""
    rows = []
    for option in all_options():
        allowed = option.rule.describe() if option.rule is not None else ""
        default = "None" if option.default is None else repr(option.default)
        rows.append((option.key, option.type_name(), default, allowed, option.meaning))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
        for row in rows
    ]


def declared_default(key: str):
    """The declared default of `key` ("rl.gamma"), for the components' own configs."""
    section, _, name = key.rpartition(".")
    cls = SECTIONS[section] if section else RunOptions
    return {f.name: f for f in dataclasses.fields(cls)}[name].default
