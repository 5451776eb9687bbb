"""Builds the configured rollout engine: the in-process JAX sampler, or a torch-side worker;
and a run's rollouts on it (`make_rollouts`, rollout/rollouts.py).

Every engine takes new weights the same way, `engine.load_policy(model, version)`, so the
trainer, SFT and evaluation never ask which engine they hold.
"""

from __future__ import annotations

import os
from pathlib import Path

from maye_jax import checkout
from maye_jax.qwen_ids import PAD_ID

DEFAULT_VLLM_PYTHON = checkout.ROOT / ".venv-vllm" / "bin" / "python"  # scripts/setup_vllm_env.sh


def vllm_python(worker_python: str | None = None) -> Path:
    """The vLLM worker's interpreter: `worker_python`, $MAYE_VLLM_PYTHON, or the project's
    `.venv-vllm` (resolved against the project root, not the current directory)."""
    return Path(worker_python or os.environ.get("MAYE_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON)


def make_engine(
    kind: str,
    *,
    model,
    config,
    tokenizer,
    rollout,
    model_dir: str | None = None,
    dtype: str = "float32",
    frozen_params=None,
    images_per_prompt: int = 1,
):
    """kind: "jax" (default, in-process) | "hf" | "vllm" (a worker process owning the engine,
    fed weights through shared memory; it loads `model_dir` first). `rollout`: the run's checked
    `RolloutSettings`; `frozen_params`: the Flax names of the tensors that never change, sent to
    a worker with the first sync only (None: the vision tower); `images_per_prompt`: the most
    images one prompt of the data holds (vLLM's per-prompt limit)."""
    if kind == "jax":
        from maye_jax.rollout.jax_sampler import JaxSampler

        pad_id = getattr(tokenizer, "pad_token_id", None)
        return JaxSampler(
            model,
            config,
            tokenizer,
            pad_id=PAD_ID if pad_id is None else pad_id,
            prompt_bucket=rollout.sampler_prompt_bucket,
            length_bucket=rollout.sampler_length_bucket,
            batch_bucket=rollout.sampler_batch_bucket,
            max_rows=rollout.sampler_max_rows,
        )
    if kind in ("hf", "vllm"):
        from maye_jax.models.hf_mapping import hf_name_for
        from maye_jax.rollout.client import WorkerEngine

        if not model_dir:
            raise ValueError(f"rollout engine {kind!r} needs an HF model directory to start from")
        python = rollout.worker_python
        if kind == "vllm":
            python = vllm_python(python)
            if not python.is_file():
                raise FileNotFoundError(
                    f"the vLLM worker's interpreter {python} does not exist: run "
                    "`bash scripts/setup_vllm_env.sh` (or set rollout.worker_python)"
                )
        env = {}
        gpu_memory_utilization = rollout.gpu_memory_utilization
        if rollout.worker_devices:
            env["CUDA_VISIBLE_DEVICES"] = rollout.worker_devices
        elif kind == "vllm":
            # vLLM on CPU reads gpu_memory_utilization as a fraction of host RAM to reserve
            # (and fails when other processes hold it): size its KV cache in GiB instead.
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
            gpu_memory_utilization = None
        return WorkerEngine(
            backend=kind,
            model_dir=str(model_dir),
            python=str(python) if python else None,
            env=env,
            timeout_s=rollout.timeout_s,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=rollout.max_model_len,
            dtype=dtype,
            frozen_names=(
                None if frozen_params is None else {hf_name_for(n) for n in frozen_params}
            ),
            frozen_params=frozen_params or (),
            max_batch_rows=rollout.worker_batch_rows,
            max_num_batched_tokens=rollout.max_num_batched_tokens,
            images_per_prompt=images_per_prompt,
            cpus=rollout.worker_cpus,
        )
    raise ValueError(f"unknown rollout engine {kind!r}; known: jax, hf, vllm")


def make_rollouts(
    settings,
    policy,
    tokenizer,
    *,
    engine: str | None = None,
    model_dir=None,
    images_per_prompt: int = 1,
):
    """A run's rollouts of `policy` (training.policy.Policy; the current weights of every
    process's own copy, `Policy.local_model`): on the configured engine, or `engine` (e.g. SFT
    evaluates with the in-process sampler); overlapped with the update when
    `rl.async_rollouts` is on. `model_dir`: the HF folder a worker engine starts from;
    `images_per_prompt`: the most images one record of the run's data holds."""
    from maye_jax.rollout.overlap import OverlappedRollouts
    from maye_jax.rollout.rollouts import Rollouts

    kind = engine or settings.rollout.engine
    built = make_engine(
        kind,
        model=policy.model(),
        config=policy.model_config,
        tokenizer=tokenizer,
        rollout=settings.rollout,
        model_dir=None if model_dir is None else str(model_dir),
        dtype=settings.model.dtype,
        frozen_params=set(policy.frozen),
        images_per_prompt=images_per_prompt,
    )
    overlapped = settings.rl.async_rollouts and engine is None
    return (OverlappedRollouts if overlapped else Rollouts)(built, weights=policy.local_model)
