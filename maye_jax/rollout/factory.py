"""Builds the configured rollout engine: the in-process JAX sampler, or a torch-side worker."""

from __future__ import annotations

import os


def make_engine(
    kind: str,
    *,
    model,
    config,
    tokenizer,
    model_dir: str | None = None,
    worker_python: str = "",
    worker_devices: str = "",
    timeout_s: float = 600.0,
    gpu_memory_utilization: float = 0.75,
    max_model_len: int = 4096,
    dtype: str = "float32",
    frozen_hf_names=None,
):
    """kind: "jax" (default, in-process) | "hf" | "vllm" (a worker process owning the engine,
    fed weights through shared memory; it loads `model_dir` first). `frozen_hf_names`: the
    tensors that never change, sent to a worker with the first sync only (None: the tower)."""
    if kind == "jax":
        from maye_jax.rollout.jax_sampler import JaxSampler

        pad_id = getattr(tokenizer, "pad_token_id", None)
        return JaxSampler(model, config, tokenizer, pad_id=151643 if pad_id is None else pad_id)
    if kind in ("hf", "vllm"):
        from maye_jax.rollout.client import WorkerEngine

        if not model_dir:
            raise ValueError(f"rollout engine {kind!r} needs an HF model directory to start from")
        env = {}
        if worker_devices:
            env["CUDA_VISIBLE_DEVICES"] = worker_devices
        elif kind == "vllm":
            # vLLM on CPU reads gpu_memory_utilization as a fraction of host RAM to reserve
            # (and fails when other processes hold it): size its KV cache in GiB instead.
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
            gpu_memory_utilization = None
        return WorkerEngine(
            backend=kind,
            model_dir=str(model_dir),
            python=worker_python
            or (os.path.abspath(".venv-vllm/bin/python") if kind == "vllm" else None),
            env=env,
            timeout_s=timeout_s,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            frozen_names=frozen_hf_names,
        )
    raise ValueError(f"unknown rollout engine {kind!r}; known: jax, hf, vllm")
