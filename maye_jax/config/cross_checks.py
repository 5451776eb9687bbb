"""The rules that tie settings together, checked by `load_settings` after every field passed
its own rule: sizes that must divide, options that need or exclude others, what several
processes support, and the files a run will read (their existence only, before any work).
Each problem is one line naming its field (`config.section.name: why`)."""

from __future__ import annotations

from pathlib import Path

from maye_jax.config.settings import Settings


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
    problems += _solution_problems(s, kind)
    if s.rewards.functions and kind in ("rl", "experiment"):
        from maye_jax.rl.user_rewards import function_problems

        problems += function_problems(s.rewards.functions)
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
        if rl.kl_reward_coeff != 0 and rl.advantage_estimator in _score_only_estimators():
            bad(
                "rl.kl_reward_coeff",
                f"{rl.kl_reward_coeff}: {rl.advantage_estimator} uses sequence scores only; set "
                "rl.kl_reward_coeff=0 and use rl.kl_loss_coeff for a KL penalty",
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


def _solution_problems(s: Settings, kind: str) -> list[str]:
    """A data set without golden solutions (the geo3k layouts) cannot be compared by its
    solution's box, nor trained on by SFT."""
    d = s.data
    if d.solution_key is not None:
        return []
    problems = []
    if d.ground_truth == "solution_boxed":
        problems.append(
            f"config.data.ground_truth: solution_boxed needs solutions, and layout {d.layout} has "
            "none; set data.ground_truth=answer or data.solution_key"
        )
    if kind in ("sft", "experiment") or (kind == "rl" and s.sft.warmup_epochs):
        problems.append(
            f"config.data.solution_key: SFT trains on golden solutions and layout {d.layout} has "
            "none; set data.solution_key to a column of solutions"
        )
    return problems


def _score_only_estimators() -> tuple[str, ...]:
    from maye_jax.rl.advantages import SCORE_ONLY_ESTIMATORS

    return SCORE_ONLY_ESTIMATORS


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


def _model_problems(path: Path) -> list[str]:
    """A model folder of a family maye-jax does not run (a Qwen3-VL MoE checkpoint, ...) or
    with settings it cannot run (DeepStack indexes beyond the vision depth), by its config.json
    alone (nothing loaded)."""
    from maye_jax.models.configs import ModelConfig
    from maye_jax.storage.model_folders import read_hf_config

    try:
        ModelConfig.from_hf(read_hf_config(path))
    except ValueError as error:
        return [f"config.model.path: {path}/config.json: {error}"]
    return []


def data_file(settings: Settings, split: str) -> str | None:
    """The configured data file (or save_to_disk folder) of `split`, resolved against
    data.root, or None."""

    name = getattr(settings.data, f"{split}_file")
    if not name:
        return None
    if settings.data.root and not Path(name).is_absolute():
        return str(Path(settings.data.root) / name)
    return name


def file_problems(s: Settings, kind: str) -> list[str]:
    """Files the run will read, checked before any work: the start model, the training data
    (unless generated) and every split evaluation is asked to run on."""

    problems = []
    if s.model.path:
        path = Path(s.model.path)
        if not ((path / "config.json").is_file() or (path / "maye_jax.json").is_file()):
            problems.append(
                f"config.model.path: {s.model.path}: not a model folder (no config.json; an HF "
                "model directory or a maye-jax checkpoint is expected)"
            )
        elif (path / "config.json").is_file():
            problems += _model_problems(path)
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
        elif not Path(path).exists():
            problems.append(f"config.data.{split}_file: {path}: no such file or folder")
    return problems
