"""The embedded-default demo: tiny Qwen2-VL-architecture model, real tokenizer, synthetic
text-dominant data, in-process JAX sampler, CPU. SFT warm-up on the synthetic solutions, then
RL; validation accuracy is logged before RL (epoch 0) and after every RL epoch.

The RL recipe differs from the paper's 7B one where the tiny model needs it (README, Results):
- token embeddings and lm_head frozen during RL: Adam moves every one of the 152k vocabulary
  rows by about the learning rate on near-pure-noise gradients, which collapsed the policy;
- GRPO with 8 samples per prompt (per-prompt baselines) instead of batch-whitened Reinforce++;
- rollouts at temperature 0.6 (the trainer's logprobs use the same temperature, so this is the
  tempered policy's exact policy gradient): at T=1 the tiny model's samples are mostly noise;
- PPO mini-batches of 16 rows (4 optimizer steps per generation step): with one AdamW step per
  generation step, 48 steps at lr 3e-4 moved the weights too little to learn.

    python -m maye_jax.train --config=configs/demo.py
"""

from maye_jax.config.defaults import default_config


def get_config():
    c = default_config()
    c.name = "demo"
    c.seed = 0
    c.output_dir = "runs/demo"

    c.model.tiny_family = "qwen2_vl"
    c.model.tiny_hidden_size = 128
    c.model.tiny_num_layers = 4
    c.model.dtype = "float32"
    c.model.frozen_dtype = "float32"

    c.data.synth_dir = "runs/demo/data"
    c.data.synth_flavour = "text_dominant"
    c.data.synth_num_train = 128  # 16 generation steps per RL epoch
    c.data.synth_num_validation = 64  # 1.6-point steps; 32 problems moved 3 points per answer
    c.data.synth_num_test = 64  # out of distribution: every distinct test problem once
    c.data.synth_image_size = 56
    c.data.synth_max_number = 4  # a small multiplication table a tiny model can learn on a CPU
    c.data.min_pixels = 4 * 28 * 28
    c.data.max_pixels = 4 * 28 * 28

    c.sft.warmup_epochs = 12  # SFT on the golden solutions before RL
    c.sft.batch_size = 16
    c.sft.micro_batch_size = 16
    c.sft.learning_rate = 5e-3
    c.sft.warmup_fraction = 0.05

    c.model.train_embeddings = False  # in RL; the SFT warm-up always trains them
    c.rollout.max_tokens = 40  # the golden solutions are 28-35 tokens
    c.rollout.temperature = 0.6
    c.rollout.num_samples = 8
    c.rl.advantage_estimator = "grpo"
    c.rl.num_epochs = 3
    c.rl.batch_size = 64  # 8 prompts x 8 samples per generation step
    c.rl.ppo_batch_size = 16  # 4 AdamW steps per generation step for the same compute
    c.rl.micro_batch_size = 16
    c.rl.forward_batch_size = 64
    c.rl.kl_loss_coeff = 0.0  # no reference forward: halves the trajectory cost on CPU
    c.rl.logprob_chunk_size = 8  # [rows, 8, 152k] logits per chunk: half the CPU time of 40
    c.optim.learning_rate = 3e-4
    c.optim.warmup_fraction = 0.1

    c.eval.max_tokens = 40
    c.eval.splits = ("validation",)
    c.checkpoint.every_steps = 8
    c.checkpoint.keep = 1
    return c
