"""Tokens per second of one policy update: the jitted JAX step vs torch transformers, same model.

    python benchmarks/update_throughput.py [--hidden=512] [--layers=4] [--vocab=8192] [--rows=8]
        [--prompt=64] [--response=192] [--steps=5]

Both sides run on this machine's CPU in fp32 on the same randomly initialised text decoder
(transformers' Qwen2.5-VL; our Flax model is loaded from its weights): one forward + backward of
the PPO-clip + k3-KL loss over every token of a batch of `rows` sequences, then AdamW (clip 1.0).
The vision tower is frozen on both sides (text-only batch). Tokens counted: rows x (prompt +
response) per update. Prints both rates and JAX / torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from maye_jax.data.sequences import make_sequence_batch  # noqa: E402
from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.models.hf_mapping import load_hf_tensors  # noqa: E402
from maye_jax.models.qwen_vl import build_model  # noqa: E402
from maye_jax.rl.losses import LossConfig  # noqa: E402
from maye_jax.sharding.mesh import make_mesh  # noqa: E402
from maye_jax.tiny import tiny_hf_model  # noqa: E402
from maye_jax.training.batch import rows_from_sequences  # noqa: E402
from maye_jax.training.optim import OptimizerConfig, make_optimizer  # noqa: E402
from maye_jax.training.train_state import create_train_state  # noqa: E402
from maye_jax.training.update import UpdateConfig, make_train_step  # noqa: E402

LR = 1e-5
KL_COEFF = 0.001


def make_batch(config: ModelConfig, args, rng):
    prompts = [{"input_ids": rng.integers(0, config.text.vocab_size - 20, args.prompt)}]
    prompts = prompts * args.rows
    responses = [list(rng.integers(0, config.text.vocab_size - 20, args.response))] * args.rows
    batch = make_sequence_batch(prompts, responses, config, pad_id=0, length_multiple=args.prompt)
    shape = batch.response_mask.shape
    return rows_from_sequences(
        batch,
        advantages=rng.standard_normal(shape).astype(np.float32),
        logprobs_old=rng.normal(-8, 0.1, shape).astype(np.float32),
        ref_logprobs=rng.normal(-8, 0.1, shape).astype(np.float32),
    )


def time_interleaved(runs: dict, steps: int) -> dict[str, float]:
    """Median seconds per step of each `runs[name]()`, after one warm-up (compile) call each;
    the runs alternate, so a change in machine load affects both alike."""
    for run_one in runs.values():
        run_one()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run_one in runs.items():
            start = time.perf_counter()
            run_one()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def jax_update(hf_model, batch):
    config = ModelConfig.from_hf(hf_model.config)
    state_dict = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    model = load_hf_tensors(build_model(config, abstract=True), state_dict.items())
    optimizer_config = OptimizerConfig(learning_rate=LR, schedule="constant")
    optimizer, schedule = make_optimizer(optimizer_config, total_updates=1000)
    model_def, state, frozen, layout = create_train_state(
        model, make_mesh(fsdp=1), optimizer, frozen_dtype=jnp.float32
    )
    config = UpdateConfig(loss=LossConfig(kl_loss_coeff=KL_COEFF))
    step = make_train_step(model_def, optimizer, schedule, layout, config)
    minibatch = batch.split(1)
    holder = {"state": state}

    def run_one():
        holder["state"], metrics, _ = step(holder["state"], frozen, minibatch)
        jax.block_until_ready(metrics["loss/total"])

    return run_one


def torch_update(hf_model, batch):
    model = hf_model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(("model.visual.", "visual.")))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.01)
    as_torch = lambda name: torch.from_numpy(np.array(getattr(batch, name)))  # noqa: E731
    input_ids, attention_mask = as_torch("input_ids").long(), as_torch("attention_mask").long()
    mask = as_torch("response_mask").float()
    advantages, logprobs_old = as_torch("advantages"), as_torch("logprobs_old")
    ref_logprobs = as_torch("ref_logprobs")
    prompt_len = input_ids.shape[1] - mask.shape[1]

    def run_one():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logits = logits[:, prompt_len - 1 : -1]
        logprobs = torch.log_softmax(logits, dim=-1)
        logprobs = logprobs.gather(-1, input_ids[:, prompt_len:, None])[..., 0]
        ratio = torch.exp(logprobs - logprobs_old)
        policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
        log_ratio_ref = ref_logprobs - logprobs
        kl = (torch.exp(log_ratio_ref) - 1 - log_ratio_ref).clamp(-10, 10)
        loss = ((policy + KL_COEFF * kl) * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=192)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    hf_model = tiny_hf_model(
        "qwen2_5_vl", seed=0, hidden_size=args.hidden, num_layers=args.layers, vocab_size=args.vocab
    )
    batch = make_batch(ModelConfig.from_hf(hf_model.config), args, np.random.default_rng(0))
    tokens = args.rows * (args.prompt + args.response)
    params = sum(p.numel() for n, p in hf_model.named_parameters() if "visual" not in n)
    print(
        f"text decoder {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}), {args.rows} rows x {args.prompt}+{args.response} tokens = {tokens} "
        f"tokens per update, fp32, {os.cpu_count()} CPU cores, median of {args.steps} alternating steps"
    )
    seconds = time_interleaved(
        {"jax": jax_update(hf_model, batch), "torch": torch_update(hf_model, batch)}, args.steps
    )
    jax_time, torch_time = seconds["jax"], seconds["torch"]
    print(
        f"JAX   (jit, {jax.devices()[0].platform}): {jax_time:.3f} s/update, {tokens / jax_time:8.0f} tokens/s"
    )
    version = __import__("transformers").__version__
    print(
        f"torch (transformers {version}): {torch_time:.3f} s/update, {tokens / torch_time:8.0f} tokens/s"
    )
    print(f"JAX / torch tokens/s: {torch_time / jax_time:.2f}x")


if __name__ == "__main__":
    main()
