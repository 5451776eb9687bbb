"""Typed settings: every bad value is named at start-up, old "off" spellings name the new one,
the comma form of a tuple option means several items, and the command line can set None."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[3]


def base():
    c = default_config()
    c.model.tiny_family = "qwen2_vl"
    c.data.synth_dir = "/tmp/maye-settings-test"  # generated data: no file to check
    c.rl.batch_size, c.rl.ppo_batch_size, c.rl.micro_batch_size = 8, 4, 2
    return c


def problems(config, kind="rl") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(config, kind=kind)
    return caught.value.problems


def test_defaults_load_and_typed_sections_hold_the_values():
    s = load_settings(base(), kind="rl")
    assert s.rl.batch_size == 8 and s.rollout.top_k is None and s.rl.rollout_is_cap is None
    assert s.eval.splits == ("validation", "test") and s.optim.max_grad_norm == 1.0
    loss = s.loss_config()
    assert loss.max_tokens == s.rollout.max_tokens and loss.rollout_is_cap is None
    assert s.update_config().logprob_chunk_size == s.rl.logprob_chunk_size
    assert s.sft_update_config().logprob_chunk_size == s.sft.logprob_chunk_size
    assert s.trajectory_config().prompt_multiple == 64


def test_every_bad_value_is_named_at_once():
    c = base()
    c.rl.batch_size = -8
    c.rollout.temperature = 0.0
    c.rl.advantage_estimator = "grpoo"
    c.eval.settings = ("pass@1_t0.6", "pass@2")
    c.rewards.names = ("accuracy", "lenght")
    c.model.dtype = "float16"
    c.optim.b2 = 1.5
    found = problems(c)
    expected = [
        "config.rl.batch_size: -8: must be > 0",
        "config.rollout.temperature: 0.0: must be > 0",
        "config.rl.advantage_estimator: 'grpoo': unknown advantage estimator",
        "config.eval.settings: ('pass@1_t0.6', 'pass@2'): unknown evaluation setting",
        "config.rewards.names: ('accuracy', 'lenght'): unknown reward",
        "config.model.dtype: 'float16': must be one of float32, bfloat16",
        "config.optim.b2: 1.5: must be in [0.0, 1.0]",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in found), (line, found)


def test_cross_field_rules():
    c = base()
    c.rl.batch_size = 10  # not a multiple of ppo_batch_size 4
    c.rl.advantage_estimator = "grpo"  # with one sample per prompt
    c.sft.num_epochs = 3  # the SFT baseline's epochs, in an RL run
    found = problems(c)
    assert any(
        p.startswith("config.rl.batch_size: 10 is not divisible by rl.ppo_batch_size")
        for p in found
    )
    assert any(p.startswith("config.rollout.num_samples: grpo") for p in found)
    assert any(p.startswith("config.sft.num_epochs:") and "warmup_epochs" in p for p in found)
    c = base()
    c.sft.batch_size, c.sft.micro_batch_size = 16, 6
    assert problems(c, kind="sft") == [
        "config.sft.batch_size: 16 is not divisible by sft.micro_batch_size 6"
    ]
    c = base()
    c.model.tiny_family = None
    assert problems(c)[0].startswith("config.model.path: set model.path")
    for estimator in ("grpo", "rloo"):  # refused at load, not inside the first update
        c = base()
        c.rollout.num_samples = 2
        c.rl.advantage_estimator, c.rl.kl_reward_coeff = estimator, 0.1
        assert problems(c) == [
            f"config.rl.kl_reward_coeff: 0.1: {estimator} uses sequence scores only; set "
            "rl.kl_reward_coeff=0 and use rl.kl_loss_coeff for a KL penalty"
        ]


def test_old_off_spellings_name_the_new_one():
    c = base()
    c.rl.rollout_is_cap = 0.0
    c.rollout.top_k = -1
    c.optim.max_grad_norm = 0.0
    found = problems(c)
    for field in ("rl.rollout_is_cap", "rollout.top_k", "optim.max_grad_norm"):
        line = next(p for p in found if p.startswith(f"config.{field}:"))
        assert "no longer means off" in line and f"--config.{field}=None" in line


def test_comma_form_of_a_tuple_option_is_several_items():
    c = base()
    c.eval.splits = ("validation,test",)  # what `--config.eval.splits=validation,test` gives
    assert load_settings(c, kind="rl").eval.splits == ("validation", "test")
    c.eval.splits = ("validation,tset",)
    assert problems(c)[0].startswith("config.eval.splits:")


def test_types_are_checked():
    c = base().to_dict()  # a config file may build plain dicts, which type-check nothing
    c["rl"]["num_epochs"] = 1.5
    c["eval"]["enabled"] = "yes"
    c["rl"]["bacth_size"] = 8
    found = problems(c)
    assert any(p.startswith("config.rl.bacth_size: unknown option") for p in found)
    assert "config.rl.num_epochs: 1.5: expected a whole number" in found
    assert "config.eval.enabled: 'yes': expected True or False" in found


def test_command_line_sets_none_and_values(tmp_path):
    """`--config.x=None` turns an option off; a placeholder option takes a value."""
    script = tmp_path / "show.py"
    script.write_text(
        "import sys\n"
        "from absl import app, flags\n"
        "from maye_jax.config.flags import define_config_flag\n"
        "define_config_flag()\n"
        "def main(argv):\n"
        "    c = flags.FLAGS.config\n"
        "    print(c.optim.max_grad_norm, c.rl.rollout_is_cap, c.rollout.top_k, c.rl.kl_clamp,\n"
        "          c.rl.clip_ratio_c, c.rewards.overlong_buffer_len, c.rl.grpo_scale_by_std,\n"
        "          c.checkpoint.keep_best)\n"
        "app.run(main)\n"
    )
    command = [
        sys.executable,
        str(script),
        f"--config={REPO / 'configs' / 'demo.py'}",
        "--config.optim.max_grad_norm=None",
        "--config.rl.rollout_is_cap=2.0",
        "--config.rollout.top_k=5",
        "--config.rl.kl_clamp=None",
        "--config.rl.clip_ratio_c=3.0",
        "--config.rewards.overlong_buffer_len=256",
        "--config.rl.grpo_scale_by_std=False",
        "--config.checkpoint.keep_best=eval/validation/pass@1_t0.6",
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        *("None", "2.0", "5", "None", "3.0", "256", "False"),
        "eval/validation/pass@1_t0.6",
    ]


def test_rl_math_options_reach_the_component_configs():
    """Every option of the advantage, loss and reward functions is settable from --config."""
    c = base()
    c.rl.kl_clamp = None
    c.rl.whiten_eps = 1e-6
    c.rl.grpo_eps = 0.0
    c.rl.grpo_scale_by_std = False
    c.rl.kl_loss_estimator = "k2"
    c.rl.clip_ratio_c = 3.0
    c.rl.gspo_clip_eps_low, c.rl.gspo_clip_eps_high = 2e-4, 5e-4
    c.rl.loss_agg = "seq_mean_token_sum"
    c.rewards.overlong_buffer_len = 512
    c.rewards.overlong_penalty_factor = 0.5
    s = load_settings(c, kind="rl")
    advantage, loss = s.advantage_config(), s.loss_config()
    assert advantage.kl_clamp is None and loss.kl_clamp is None
    assert advantage.whiten_eps == 1e-6 and advantage.grpo_eps == 0.0
    assert advantage.grpo_scale_by_std is False
    assert loss.kl_loss_estimator == "k2" and loss.clip_ratio_c == 3.0
    assert (loss.gspo_clip_eps_low, loss.gspo_clip_eps_high) == (2e-4, 5e-4)
    assert loss.loss_agg == "seq_mean_token_sum"
    assert s.trajectory_config().overlong == {
        "max_tokens": 2048,
        "buffer_len": 512,
        "penalty_factor": 0.5,
    }
    defaults = load_settings(base(), kind="rl")
    assert defaults.advantage_config().kl_clamp == 10.0 and defaults.loss_config().kl_clamp == 10.0
    assert defaults.loss_config().kl_loss_estimator == "k3" and defaults.rl.kl_estimator == "k3"
    assert defaults.loss_config().clip_ratio_c is None
    assert defaults.trajectory_config().overlong is None and not defaults.rl.dynamic_sampling


def test_rl_math_options_are_checked():
    c = base()
    c.rl.kl_loss_estimator = "k4"
    c.rl.clip_ratio_c = 0.5
    c.rl.kl_clamp = -1.0
    c.rewards.overlong_buffer_len = 0
    found = problems(c)
    for line in [
        "config.rl.kl_loss_estimator: 'k4': unknown KL estimator; known: k1, k2, k3",
        "config.rl.clip_ratio_c: 0.5: must be > 1.0",
        "config.rl.kl_clamp: -1.0: must be > 0",
        "config.rewards.overlong_buffer_len: 0: must be > 0",
    ]:
        assert line in found, (line, found)
    c = base()
    c.rl.policy_loss = "gspo"  # with the default token_mean aggregation
    c.rewards.overlong_buffer_len = 4096  # more than max_tokens 2048
    c.rl.dynamic_sampling = True  # with one sample per prompt
    found = problems(c)
    assert any(p.startswith("config.rl.loss_agg: 'token_mean': policy_loss=gspo") for p in found)
    assert "config.rewards.overlong_buffer_len: 4096 is more than rollout.max_tokens 2048" in found
    assert any(p.startswith("config.rl.dynamic_sampling: drops prompt groups") for p in found)
    c = base()
    c.rl.policy_loss, c.rl.loss_agg, c.rl.clip_ratio_c = "gspo", "seq_mean_token_mean", 3.0
    assert problems(c) == ["config.rl.clip_ratio_c: dual-clip is part of ppo_clip, not of gspo"]
    c.rl.clip_ratio_c = None
    c.rollout.num_samples, c.rl.dynamic_sampling = 2, True
    assert load_settings(c, kind="rl").rl.dynamic_sampling


def test_async_rollouts_needs_a_worker_and_the_is_weight_and_refuses_what_is_not_built():
    c = base()
    c.rl.async_rollouts = True
    found = problems(c)
    assert any(p.startswith("config.rl.async_rollouts: needs a worker engine") for p in found)
    assert any(
        p.startswith("config.rl.rollout_is_cap: required with rl.async_rollouts") for p in found
    )
    c.rollout.engine = "vllm"
    c.rl.rollout_is_cap = 2.0
    assert load_settings(c, kind="rl").rl.async_rollouts
    c.rl.dynamic_sampling = True
    c.rollout.num_samples = 2
    c.sharding.num_processes = 2
    found = problems(c)
    assert "config.rl.async_rollouts: not built with rl.dynamic_sampling yet" in found[0]
    assert any(
        p.startswith("config.rl.async_rollouts: not built for several processes") for p in found
    )


def test_worker_options_are_checked():
    c = base()
    c.rollout.worker_cpus = "one"
    c.rollout.max_num_batched_tokens = 0
    c.rl.response_len_buckets = 0
    assert problems(c) == [
        "config.rollout.max_num_batched_tokens: 0: must be > 0",
        "config.rollout.worker_cpus: 'one': expected CPU ids such as 1, 0,2 or 2-3",
        "config.rl.response_len_buckets: 0: must be > 0",
    ]
    c = base()
    c.rollout.engine = "hf"
    c.rollout.worker_cpus = "1,2-3"
    c.rollout.max_num_batched_tokens = 8192
    s = load_settings(c, kind="rl")
    assert s.rollout.worker_cpus == "1,2-3" and s.rollout.max_num_batched_tokens == 8192


def test_model_folders_of_unsupported_families_are_refused_at_start(tmp_path):
    """A Qwen3-VL MoE checkpoint, and a Qwen3-VL whose DeepStack taps a block the tower does not
    have: one line each, naming the folder and what is wrong, before anything is loaded."""
    from transformers import Qwen3VLMoeConfig

    from maye_jax.tiny import tiny_hf_config

    moe, deepstack = tmp_path / "moe", tmp_path / "deepstack"
    Qwen3VLMoeConfig(architectures=["Qwen3VLMoeForConditionalGeneration"]).save_pretrained(moe)
    config = tiny_hf_config("qwen3_vl", vision_depth=2)
    config.vision_config.deepstack_visual_indexes = [0, 2]
    config.save_pretrained(deepstack)
    for folder, message in (
        (moe, "unsupported model family qwen3_vl_moe (Qwen3-VL MoE): maye-jax supports"),
        (deepstack, "vision_config.deepstack_visual_indexes [0, 2]: every index must name"),
    ):
        c = base()
        c.model.tiny_family, c.model.path = None, str(folder)
        found = problems(c)
        assert len(found) == 1 and "\n" not in found[0]
        assert found[0].startswith(f"config.model.path: {folder}/config.json: {message}")
    c = base()
    c.model.tiny_family = "qwen3_vl"
    assert load_settings(c, kind="rl").model.tiny_family == "qwen3_vl"
