"""Every experiment option with its default; `configs/*.py` start from `default_config()`.

Batch sizes are global numbers (all devices together). SPEC §4 values are the defaults where
the paper sets them; `paper_preset(config)` applies the original's choices explicitly.

An option that can be off is None when off (never 0 or -1): `placeholder(type)` declares such
an option so that the command line can still set it (`--config.rl.rollout_is_cap=2.0`), and
`--config.x=None` turns one off. At start-up `maye_jax.config.settings.load_settings` checks
every value (naming the field of each bad one) and builds the typed settings the code reads.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0
    c.report_group = ""  # runs with the same report_group share a table (maye_jax/report.py)
    c.output_dir = "runs/run"
    c.resume = False  # continue from the latest checkpoint in output_dir
    c.overwrite = False  # a new run may delete another run's outputs in output_dir

    # The policy: an HF model directory or a maye-jax checkpoint; or a tiny random model.
    c.model = ml_collections.ConfigDict()
    c.model.path = placeholder(str)
    c.model.tiny_family = placeholder(str)  # "qwen2_vl" | "qwen2_5_vl": a tiny random model
    c.model.tiny_hidden_size = 64
    c.model.tiny_num_layers = 2
    c.model.tiny_seed = 0
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = False  # rematerialise each decoder layer in the backward pass
    c.model.remat_policy = "full"  # with remat: "full" (keep the layer input) | "dots" (also
    # keep the projections' outputs: more memory, less recomputation); models/layers.py
    c.model.attention = "xla"  # "xla" | "cudnn" (flash attention; GPU, bf16) | "jax_xla"
    c.model.train_vit = False
    c.model.train_connector = False
    c.model.train_llm = True
    c.model.train_embeddings = True  # with train_llm: also the token embeddings and lm_head

    c.data = ml_collections.ConfigDict()
    c.data.root = placeholder(str)  # relative data files are resolved against this directory
    c.data.train_file = placeholder(str)
    c.data.validation_file = placeholder(str)
    c.data.test_file = placeholder(str)
    c.data.on_error = "fail"  # fail | skip
    c.data.prompt_template = "maye"
    c.data.min_pixels = 4 * 28 * 28
    c.data.max_pixels = 16384 * 28 * 28
    # Prompt columns of the RL and SFT batches round up to this: one compiled update per bucket.
    c.data.prompt_multiple = 64
    # Generate a synthetic dataset first (maye_jax/data/synth.py) when `synth_dir` is set.
    c.data.synth_dir = placeholder(str)
    c.data.synth_seed = 0  # the dataset stays the same across run seeds
    c.data.synth_flavour = "text_dominant"
    c.data.synth_num_train = 64
    c.data.synth_num_validation = 16
    c.data.synth_num_test = 16
    c.data.synth_image_size = 112
    c.data.synth_max_number = 9  # text-dominant side lengths 2..max_number (smaller: easier)
    c.data.synth_solution_style = "full"  # "short": computation + box only (cheaper CPU demo)

    c.sharding = ml_collections.ConfigDict()
    c.sharding.fsdp = 1  # devices the weights shard over (per host in a multi-host run)
    c.sharding.tp = 1
    c.sharding.dp = placeholder(int)  # None: one dp row per process (HSDP); 1: FSDP across hosts
    c.sharding.max_replicated_fraction = 0.05
    # Several processes (one per host): jax.distributed. None: $MAYE_COORDINATOR,
    # $MAYE_NUM_PROCESSES, $MAYE_PROCESS_ID, else JAX's cluster detection (SLURM, ...).
    c.sharding.coordinator_address = placeholder(str)  # e.g. "node0:12345"
    c.sharding.num_processes = placeholder(int)
    c.sharding.process_id = placeholder(int)
    c.sharding.local_device_ids = placeholder(tuple)  # this host's training GPUs, e.g. (0, ..., 6)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.engine = "jax"  # jax | hf | vllm
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = placeholder(int)  # None: no top-k truncation
    c.rollout.max_tokens = 2048
    c.rollout.num_samples = 1  # responses per prompt (GRPO/RLOO need > 1)
    c.rollout.worker_python = placeholder(str)  # the worker's interpreter (vllm: .venv-vllm)
    c.rollout.worker_devices = placeholder(str)  # CUDA_VISIBLE_DEVICES of the worker, e.g. "7"
    c.rollout.worker_batch_rows = 64  # the hf worker's rows per generate call
    c.rollout.gpu_memory_utilization = 0.75
    c.rollout.max_model_len = placeholder(int)  # vLLM's; None: the model's own context length
    # vLLM's scheduler limit (prompt tokens per step); None: 16384 on CPU (where a generate is
    # cut into calls that fit it, so no seeded prompt is split), vLLM's own default on a GPU.
    c.rollout.max_num_batched_tokens = placeholder(int)
    c.rollout.worker_cpus = placeholder(str)  # pin the worker to these CPUs, e.g. "1"; None: all
    c.rollout.timeout_s = 600.0
    # The JAX sampler's compiled shapes: prompt columns, response columns and rows round up to
    # these (rows to powers of two >= the batch bucket); at most `sampler_max_rows` per call.
    c.rollout.sampler_prompt_bucket = 64
    c.rollout.sampler_length_bucket = 128
    c.rollout.sampler_batch_bucket = 8
    c.rollout.sampler_max_rows = 256

    c.rl = ml_collections.ConfigDict()
    c.rl.num_epochs = 1
    c.rl.batch_size = 896  # responses per generation step (global)
    c.rl.ppo_batch_size = 28  # rows per update (global): 4 per rank x 7 ranks
    c.rl.ppo_epochs = 1
    c.rl.micro_batch_size = 28  # rows per micro-batch (gradient accumulation inside an update)
    c.rl.forward_batch_size = 112  # rows per logprob forward when building trajectories
    c.rl.advantage_estimator = "reinforce_pp"  # reinforce_pp | reinforce_pp_baseline | grpo | rloo
    c.rl.gamma = 1.0
    c.rl.kl_reward_coeff = 0.0
    c.rl.kl_loss_coeff = 0.001
    c.rl.kl_estimator = "k3"  # of the KL *reward* (kl_reward_coeff); k1 | k2 | k3
    c.rl.kl_loss_estimator = "k3"  # of the KL *loss* (kl_loss_coeff); k1 | k2 | k3
    c.rl.kl_clamp = 10.0  # per-token clamp of both KL terms to [-c, c]; None: no clamp
    c.rl.whiten = True
    # True: add the mean back after whitening (MAYE, torchtune). NB verl/TRL's shift_mean=True
    # means the opposite (zero-mean advantages), which is shift_mean=False here.
    c.rl.shift_mean = True
    c.rl.whiten_eps = 1e-8
    c.rl.grpo_eps = 1e-6  # GRPO: (score - mean) / (std + grpo_eps)
    c.rl.grpo_scale_by_std = True  # False: Dr.GRPO's score - mean
    c.rl.policy_loss = "ppo_clip"  # ppo_clip | gspo (needs loss_agg=seq_mean_token_mean)
    c.rl.clip_eps_low = 0.2
    c.rl.clip_eps_high = 0.2
    c.rl.clip_ratio_c = placeholder(float)  # set (e.g. 3.0): PPO dual-clip for negative advantages
    c.rl.gspo_clip_eps_low = 3e-4  # GSPO's clip range of the sequence ratio (the GSPO paper's)
    c.rl.gspo_clip_eps_high = 4e-4
    # token_mean | seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm
    c.rl.loss_agg = "token_mean"
    c.rl.rollout_is_cap = placeholder(float)  # set (e.g. 2.0): truncated importance sampling
    c.rl.logprob_chunk_size = 512
    # Response columns of the trajectory and the update: the smallest of `response_len_buckets`
    # lengths (max_tokens / 2^k, k < buckets, rounded up to 8) that holds the longest response of
    # each logprob chunk and mini-batch; 1: always max_tokens. Only padding changes.
    c.rl.response_len_buckets = 4
    # Rollouts overlapped with the update (hf/vllm worker only): step n+1 is generated, with the
    # weights after update n-1, while step n's trajectory and update run; needs rollout_is_cap.
    c.rl.async_rollouts = False
    # DAPO's dynamic sampling: drop prompt groups whose scores are all equal and top the batch
    # up with the next prompts of the epoch, at most `dynamic_sampling_max_rounds` times a step.
    c.rl.dynamic_sampling = False
    c.rl.dynamic_sampling_max_rounds = 10

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 5e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-5
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0  # None: no clipping
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_fraction = 0.1

    c.rewards = ml_collections.ConfigDict()
    c.rewards.names = ("accuracy", "language")
    c.rewards.language_char_class = "cjk"
    c.rewards.timeout_s = 5.0
    c.rewards.num_workers = placeholder(int)  # math-verify processes; None: from the CPU count
    # The original's no-EOS / too-short penalty: `reward_penalty` *instead of* the score (ON in
    # its launch script and in paper_preset). Too short: the index of the last valid token
    # (length - 1) is below min_response_length, so 1 refuses an EOS alone.
    c.rewards.penalty = False
    c.rewards.min_response_length = 0
    c.rewards.reward_penalty = -0.1
    # DAPO's soft overlong penalty, added to the score (after the penalty above): 0 up to
    # rollout.max_tokens - overlong_buffer_len tokens, then down to -overlong_penalty_factor.
    c.rewards.overlong_buffer_len = placeholder(int)  # None: off
    c.rewards.overlong_penalty_factor = 1.0

    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = True
    c.eval.at_start = True  # epoch 0: the untrained model
    c.eval.every_epochs = 1
    c.eval.max_tokens = 2048
    c.eval.splits = ("validation", "test")
    c.eval.settings = ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01")
    c.eval.save_responses = False
    c.eval.batch_size = 64

    c.sft = ml_collections.ConfigDict()
    c.sft.warmup_epochs = placeholder(int)  # RL runs: SFT epochs before RL (e.g. the demo)
    c.sft.num_epochs = placeholder(int)  # the SFT baseline's epochs; None: as many as rl.num_epochs
    c.sft.batch_size = 16
    c.sft.micro_batch_size = 16
    c.sft.learning_rate = 1e-5
    c.sft.warmup_fraction = 0.1
    c.sft.logprob_chunk_size = 512

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2  # the newest kept; older ones deleted once a new one is whole
    c.checkpoint.export_hf = True  # write the final policy as an HF directory
    # An evaluation metric (e.g. "eval/validation/pass@1_t0.6"): the checkpoint of its best
    # value is kept besides the newest ones and exported to best_hf/ (None: off)
    c.checkpoint.keep_best = None

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = False
    c.logging.wandb = False
    c.logging.wandb_project = "maye-jax"
    c.logging.save_rollouts = True
    c.logging.progress_bar = True
    return c


def paper_preset(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The original MAYE's choices (SPEC §2, §4): shift_mean on, token-mean loss, KL in the loss
    only (k3), and its launch script's penalty (PENALISE_NO_EOS=True, MIN_RESPONSE_LENGTH=1,
    REWARD_PENALTY=-0.1)."""
    c.rl.advantage_estimator = "reinforce_pp"
    c.rl.shift_mean = True
    c.rl.whiten = True
    c.rl.loss_agg = "token_mean"
    c.rl.kl_reward_coeff = 0.0
    c.rl.kl_loss_coeff = 0.001
    c.rl.kl_loss_estimator = "k3"
    c.rl.clip_eps_low = c.rl.clip_eps_high = 0.2
    c.rewards.penalty = True
    c.rewards.min_response_length = 1
    c.rewards.reward_penalty = -0.1
    c.rl.batch_size = 896
    c.rl.ppo_batch_size = 28
    c.rl.ppo_epochs = 1
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.max_tokens = 2048
    c.optim.learning_rate = 5e-6
    return c
