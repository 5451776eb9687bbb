"""Tokens per second of one policy update: the jitted JAX step vs torch transformers, same model.

    python benchmarks/update_throughput.py [--preset=tiny|qwen2_vl_2b] [--hidden=512] [--layers=N]
        [--vocab=8192] [--dtypes=float32[,bfloat16]] [--rows=8] [--prompt=64] [--response=192]
        [--steps=5] [--train_embeddings=true|false] [--trace_dir=DIR]

Both sides run on this machine's CPU on the same randomly initialised model, its text decoder
trained, its vision tower frozen (text-only batch): one forward + backward of the PPO-clip +
k3-KL loss over the response tokens of a batch of `rows` sequences, then AdamW (clip 1.0).
Models: `tiny` (default): transformers' Qwen2.5-VL at hidden `--hidden`, `--layers` (4), MLP 2x
hidden, heads of 32, vocab `--vocab`; `qwen2_vl_2b`: the published Qwen2-VL-2B widths
(hidden 1536, 12 heads, 2 KV heads, MLP 8960, the 151,936-token vocabulary, tied embeddings)
with `--layers` (2) of its 28 decoder layers (the vision tower, frozen and unused, keeps 1
block). dtypes: float32, or bfloat16 compute over fp32 master weights (JAX: the trainer's
`model.dtype`; torch: `torch.autocast` on the CPU). torch computes the logits of the response
positions only (`logits_to_keep`), as the JAX step does. `--train_embeddings=false` freezes the
token embeddings and the (tied) head on both sides (the trainer's `model.train_embeddings`):
at the 2B widths their 233M parameters with gradients and AdamW moments take 3.7 GB per side,
more than a shared machine spares for both. Tokens counted: rows x (prompt + response) per
update. Prints both rates and JAX / torch per dtype; with `--trace_dir`, a
`jax.profiler` trace of one more JAX update per dtype and its XLA ops' self time by category.
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
from _trace import print_trace_summary, summarize_trace  # noqa: E402

from maye_jax.data.sequences import make_sequence_batch  # noqa: E402
from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.models.hf_mapping import load_hf_tensors  # noqa: E402
from maye_jax.models.qwen_vl import build_model  # noqa: E402
from maye_jax.rl.losses import LossConfig  # noqa: E402
from maye_jax.sharding.mesh import make_mesh  # noqa: E402
from maye_jax.tiny import preset_hf_config, tiny_hf_model  # noqa: E402
from maye_jax.training.batch import rows_from_sequences  # noqa: E402
from maye_jax.training.optim import OptimizerConfig, make_optimizer  # noqa: E402
from maye_jax.training.train_state import TrainableConfig, create_train_state  # noqa: E402
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


def build_hf_model(args):
    """The preset's random transformers model (fp32, eval mode)."""
    if args.preset == "tiny":
        return tiny_hf_model(
            "qwen2_5_vl",
            seed=0,
            hidden_size=args.hidden,
            num_layers=args.layers,
            vocab_size=args.vocab,
        )
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    config = preset_hf_config(args.preset, num_layers=args.layers, vision_depth=1)
    return Qwen2VLForConditionalGeneration(config).eval()


def jax_update(hf_model, batch, dtype, train_embeddings: bool):
    """The trainer's step: fp32 master weights, the forward in `dtype`, the tower frozen."""
    config = ModelConfig.from_hf(hf_model.config)
    state_dict = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    model = load_hf_tensors(build_model(config, dtype=dtype, abstract=True), state_dict.items())
    del state_dict
    optimizer_config = OptimizerConfig(learning_rate=LR, schedule="constant")
    optimizer, schedule = make_optimizer(optimizer_config, total_updates=1000)
    model_def, state, frozen, layout = create_train_state(
        model,
        make_mesh(fsdp=1),
        optimizer,
        trainable=TrainableConfig(train_embeddings=train_embeddings),
        frozen_dtype=dtype,
    )
    config = UpdateConfig(loss=LossConfig(kl_loss_coeff=KL_COEFF))
    step = make_train_step(model_def, optimizer, schedule, layout, config)
    minibatch = batch.split(1)
    holder = {"state": state}

    def run_one():
        holder["state"], metrics, _ = step(holder["state"], frozen, minibatch)
        jax.block_until_ready(metrics["loss/total"])

    return run_one


def torch_update(hf_model, batch, dtype, train_embeddings: bool):
    """The same loss and AdamW in torch: fp32 weights, the forward autocast to `dtype`."""
    model = hf_model.train()
    frozen = ("model.visual.", "visual.")
    for name, param in model.named_parameters():  # a tied head is embed_tokens' parameter
        embedding = "embed_tokens" in name or name.startswith("lm_head")
        param.requires_grad_(not name.startswith(frozen) and (train_embeddings or not embedding))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.01)
    as_torch = lambda name: torch.from_numpy(np.array(getattr(batch, name)))  # noqa: E731
    input_ids, attention_mask = as_torch("input_ids").long(), as_torch("attention_mask").long()
    mask = as_torch("response_mask").float()
    advantages, logprobs_old = as_torch("advantages"), as_torch("logprobs_old")
    ref_logprobs = as_torch("ref_logprobs")
    prompt_len = input_ids.shape[1] - mask.shape[1]
    response_len = mask.shape[1]

    def run_one():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            # logits of positions P-1 .. P+R-1; the last one predicts nothing
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_to_keep=response_len + 1,
            ).logits
        logits = logits[:, :-1].float()
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
    parser.add_argument("--preset", default="tiny", choices=("tiny", "qwen2_vl_2b"))
    parser.add_argument("--hidden", type=int, default=512, help="tiny only")
    parser.add_argument("--layers", type=int, default=None, help="tiny 4, qwen2_vl_2b 2")
    parser.add_argument("--vocab", type=int, default=8192, help="tiny only")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--train_embeddings", default="true", choices=("true", "false"), help="and the head"
    )
    parser.add_argument("--trace_dir", default=None, help="trace one JAX update per dtype here")
    args = parser.parse_args()
    args.layers = args.layers or (4 if args.preset == "tiny" else 2)
    train_embeddings = args.train_embeddings == "true"
    torch.set_num_threads(os.cpu_count() or 1)
    hf_model = build_hf_model(args)
    config = ModelConfig.from_hf(hf_model.config)
    batch = make_batch(config, args, np.random.default_rng(0))
    tokens = args.rows * (args.prompt + args.response)
    params = sum(p.numel() for n, p in hf_model.named_parameters() if "visual" not in n)
    text = config.text
    print(
        f"{args.preset}: text decoder {params / 1e6:.1f}M params (hidden {text.hidden_size}, "
        f"{text.num_layers} layers, vocab {text.vocab_size}), {args.rows} rows x "
        f"{args.prompt}+{args.response} tokens = {tokens} tokens per update, embeddings "
        f"{'trained' if train_embeddings else 'frozen'}, {os.cpu_count()} "
        f"CPU cores, median of {args.steps} alternating steps; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    version = __import__("transformers").__version__
    for name in args.dtypes.split(","):
        jax_run = jax_update(hf_model, batch, jnp.dtype(name), train_embeddings)
        torch_run = torch_update(hf_model, batch, getattr(torch, name), train_embeddings)
        seconds = time_interleaved({"jax": jax_run, "torch": torch_run}, args.steps)
        jax_time, torch_time = seconds["jax"], seconds["torch"]
        print(
            f"{name}: JAX (jit, {jax.devices()[0].platform}) {jax_time:.3f} s/update "
            f"{tokens / jax_time:8.0f} tokens/s | torch (transformers {version}) "
            f"{torch_time:.3f} s/update {tokens / torch_time:8.0f} tokens/s | JAX / torch "
            f"tokens/s: {torch_time / jax_time:.2f}x",
            flush=True,
        )
        if args.trace_dir:
            directory = os.path.join(args.trace_dir, name)
            with jax.profiler.trace(directory):
                jax_run()
            print_trace_summary(summarize_trace(directory, top=12))
        del jax_run, torch_run
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
