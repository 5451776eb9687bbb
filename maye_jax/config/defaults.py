"""`default_config()`: every option with its declared default (maye_jax/config/options.py), as
the ml_collections config that `configs/*.py` start from and `--config.<section>.<name>=value`
overrides; `paper_preset(config)` applies the original MAYE's choices explicitly.

An option that can be off is None when off (never 0 or -1): it is a `placeholder(type)`, so that
the command line can still set it (`--config.rl.rollout_is_cap=2.0`), and `--config.x=None`
turns one off. At start-up `maye_jax.config.settings.load_settings` checks every value (naming
the field of each bad one) and builds the typed settings the code reads.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from maye_jax.config.options import OPTIONAL_SECTIONS, SECTIONS, RunOptions, options_of


def section_config(cls: type) -> ml_collections.ConfigDict:
    """The config of one declared section (or `RunOptions`' top-level fields): each option's
    default, or a typed placeholder for one that is None until set."""
    config = ml_collections.ConfigDict()
    for option in options_of(cls):
        default = option.default
        config[option.key] = placeholder(option.value_type) if default is None else default
    return config


def default_config() -> ml_collections.ConfigDict:
    """Every option of a run (the experiment's section is `default_experiment()`'s)."""
    c = section_config(RunOptions)
    for name, cls in SECTIONS.items():
        if name not in OPTIONAL_SECTIONS:
            c[name] = section_config(cls)
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
