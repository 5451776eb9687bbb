"""One whole RL step of the trainer against a reference written here, outside the project's code
path: transformers (torch, float64) for the logprobs of the sampled responses, NumPy for the
Reinforce++ advantages (KL reward, discounted returns, whitening), torch autograd for the
PPO-clip + k3 KL loss, NumPy for global-norm clipping and AdamW.

The trainer runs its own step 1 (sampling with the JAX sampler, rewards, trajectory, one update
of the whole batch in 4 micro-batches of one row) from a policy perturbed away from its
reference, so the KL terms are not zero. The vision tower and merger train, and one of the
step's two prompts has no image: its micro-batches run the tower on padding only, and the
gradient summed over the step (tower included) must still be transformers'. The gradient compared is the one the step applied, read back from
AdamW's first moment. `optim.eps` is 1e-3: Adam's first step is about lr x sign(g), and a
larger eps keeps the parameters sensitive to the gradient's size too.
"""

from __future__ import annotations

import contextlib
import types

import jax
import numpy as np
import pytest
import torch

from maye_jax.models.hf_mapping import hf_name_for, iter_hf_tensors, to_hf_layout
from maye_jax.models.hf_names import normalize_hf_name
from maye_jax.qwen_ids import IMAGE_PAD_ID
from maye_jax.train import Trainer
from tests.maye_jax.test_train import rl_settings, tiny_config

TEMPERATURE = 0.8
GAMMA = 0.9
KL_REWARD_COEFF = 0.05  # k1
KL_LOSS_COEFF = 0.1  # k3
CLIP_EPS = 0.2
LR, B1, B2, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, 0.9, 0.95, 1e-3, 0.01, 1.0
WHITEN_EPS = 1e-8


def step_config(tmp_path):
    from maye_jax.data.synth import generate

    c = tiny_config(tmp_path)
    # half of the problems without an image; the seed below makes step 1 draw one of each kind
    paths = generate(
        tmp_path / "mixed",
        "text_dominant",
        num_train=8,
        num_validation=2,
        num_test=2,
        text_only_fraction=0.5,
    )
    c.data.synth_dir = None
    c.data.train_file, c.data.validation_file = str(paths["train"]), str(paths["validation"])
    c.model.train_vit = c.model.train_connector = True
    c.rollout.temperature = TEMPERATURE
    c.rl.num_epochs = 1
    c.rl.batch_size = c.rl.ppo_batch_size = c.rl.forward_batch_size = 4  # one update per step
    c.rl.micro_batch_size = 1  # accumulated over 4 micro-batches, 2 of them text-only
    c.rl.advantage_estimator = "reinforce_pp"
    c.rl.gamma = GAMMA
    c.rl.kl_reward_coeff, c.rl.kl_estimator = KL_REWARD_COEFF, "k1"
    c.rl.kl_loss_coeff, c.rl.kl_loss_estimator = KL_LOSS_COEFF, "k3"
    c.rl.clip_eps_low = c.rl.clip_eps_high = CLIP_EPS
    c.optim.schedule = "constant"
    c.optim.learning_rate, c.optim.b1, c.optim.b2, c.optim.eps = LR, B1, B2, EPS
    c.optim.weight_decay, c.optim.max_grad_norm = WEIGHT_DECAY, MAX_GRAD_NORM
    c.eval.enabled = False
    return c


def host(tree):
    return {name: np.array(jax.device_get(value), np.float64) for name, value in tree.items()}


@pytest.fixture(scope="module")
def trainer_step(module_scratch):
    """The trainer's step 1 from a perturbed policy: what went in and what came out."""
    tmp = module_scratch("rl_step_reference")
    trainer = Trainer(rl_settings(step_config(tmp)))
    policy = trainer.policy
    rng = np.random.default_rng(0)
    perturbed = {
        name: jax.device_put(
            (np.asarray(value) + rng.normal(0.0, 0.02, value.shape)).astype(value.dtype),
            value.sharding,
        )
        for name, value in policy.state.params.items()
    }
    policy.state = policy.state.replace(params=perturbed)
    start_hf = dict(iter_hf_tensors(policy.model()))  # the policy before the step, HF layout
    params_before = host(policy.state.params)

    trainer.run_harness = types.SimpleNamespace(section=lambda name: contextlib.nullcontext())
    groups = trainer.sample_groups(trainer.prompts_per_step, step=1)
    with_image = [prompt["pixel_values"] is not None for prompt in groups.encoded]
    assert sorted(with_image) == [False, True], with_image  # a text-only prompt and an image
    trajectory = trainer.make_trajectory(groups)
    seen = {}
    step_fn = trainer.step_fn

    def step_and_keep_the_minibatch(state, frozen, minibatch):
        seen["minibatches"] = seen.get("minibatches", 0) + 1
        seen["minibatch"] = minibatch
        return step_fn(state, frozen, minibatch)

    trainer.step_fn = step_and_keep_the_minibatch
    metrics = trainer.policy_update(trajectory, step=1)
    assert seen["minibatches"] == 1
    # The gradient the step applied, from AdamW's first moment after its first update:
    # mu = (1 - b1) * clip(g) (the chain is clip by global norm, then AdamW).
    adam = policy.state.opt_state[1][0]
    assert int(adam.count) == 1
    gradient = {name: mu / (1 - B1) for name, mu in host(adam.mu).items()}
    return dict(
        groups=groups,
        trajectory=trajectory,
        minibatch=jax.device_get(seen["minibatch"]),
        metrics=metrics,
        gradient=gradient,
        params_before=params_before,
        params_after=host(policy.state.params),
        start_hf=start_hf,
        initial_model=trainer.hf_model_dir,
    )


def torch_model(model_dir, tensors=None):
    """The transformers model of `model_dir` in float64, with `tensors` (HF names) replacing
    its weights."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir)).double()
    if tensors is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(torch.from_numpy(np.array(tensors[normalize_hf_name(name)])))
    return model


def response_logprobs(model, prompt: dict, response: list[int]) -> torch.Tensor:
    """log_softmax(logits / T) of the response tokens after the prompt (transformers' forward,
    its own M-RoPE positions), differentiable."""
    prompt_ids = list(np.asarray(prompt["input_ids"]).reshape(-1))
    ids = torch.tensor([prompt_ids + list(response)])
    kwargs = {}
    if prompt["pixel_values"] is not None:
        kwargs = dict(
            pixel_values=torch.from_numpy(np.asarray(prompt["pixel_values"], np.float64)),
            image_grid_thw=torch.from_numpy(np.asarray(prompt["image_grid_thw"])),
            mm_token_type_ids=(
                (ids == IMAGE_PAD_ID) & (torch.arange(ids.shape[1]) < len(prompt_ids))
            ).long(),
        )
    hidden = model.model(input_ids=ids, **kwargs).last_hidden_state[0]
    start = len(prompt_ids)
    logits = model.lm_head(hidden[start - 1 : -1]) / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def reference_advantages(scores, logprobs, ref_logprobs):
    """Reinforce++ with a k1 KL reward: r_t = -c * (logp - ref), plus the score at the last
    token; G_t = sum_k gamma^(k - t) r_k; whitened over every token of the batch (unbiased
    variance) with the mean added back (MAYE's shift_mean)."""
    returns = []
    for score, logp, ref in zip(scores, logprobs, ref_logprobs):
        rewards = -KL_REWARD_COEFF * (logp - ref)
        rewards[-1] += score
        row, running = np.zeros(len(rewards)), 0.0
        for t in reversed(range(len(rewards))):
            running = rewards[t] + GAMMA * running
            row[t] = running
        returns.append(row)
    flat = np.concatenate(returns)
    mean, var = flat.mean(), flat.var(ddof=1)
    return [(row - mean) / np.sqrt(var + WHITEN_EPS) + mean for row in returns]


@pytest.fixture(scope="module")
def reference_step(trainer_step):
    """The same step written out: loss, gradient and AdamW from the trainer's samples."""
    groups = trainer_step["groups"]
    policy = torch_model(trainer_step["initial_model"], trainer_step["start_hf"])
    reference = torch_model(trainer_step["initial_model"])
    rows = [
        (prompt, completion.token_ids)
        for prompt, samples in zip(groups.encoded, groups.completions)
        for completion in samples
    ]
    logprobs = [response_logprobs(policy, prompt, response) for prompt, response in rows]
    with torch.no_grad():
        ref_logprobs = [response_logprobs(reference, prompt, response) for prompt, response in rows]
    scores = groups.rewards["total"]
    advantages = reference_advantages(
        scores,
        [lp.detach().numpy() for lp in logprobs],
        [lp.numpy() for lp in ref_logprobs],
    )
    policy_terms, kl_terms = [], []
    for logp, ref, advantage in zip(logprobs, ref_logprobs, advantages):
        ratio = torch.exp(logp - logp.detach())  # 1, with the gradient of logp
        advantage = torch.from_numpy(advantage)
        clipped = torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS)
        policy_terms.append(torch.maximum(-advantage * ratio, -advantage * clipped))
        d = ref - logp
        kl_terms.append(torch.clamp(torch.exp(d) - 1 - d, -10, 10))
    num_tokens = sum(len(t) for t in policy_terms)
    policy_loss = torch.cat(policy_terms).sum() / num_tokens
    kl_loss = torch.cat(kl_terms).sum() / num_tokens
    loss = policy_loss + KL_LOSS_COEFF * kl_loss
    loss.backward()
    gradient = {normalize_hf_name(n): p.grad.numpy() for n, p in policy.named_parameters()}

    # The trainable tensors (the tower and merger train here): clip by global norm, then AdamW's first step
    # from zero moments (bias-corrected), decoupled weight decay.
    names = [hf_name_for(n) for n in trainer_step["params_before"]]
    norm = np.sqrt(sum(np.sum(gradient[n] ** 2) for n in names))
    scale = min(1.0, MAX_GRAD_NORM / norm)
    after = {}
    for name in names:
        g = gradient[name] * scale
        m_hat = (1 - B1) * g / (1 - B1)
        v_hat = (1 - B2) * g**2 / (1 - B2)
        p = np.asarray(trainer_step["start_hf"][name], np.float64)
        after[name] = p - LR * (m_hat / (np.sqrt(v_hat) + EPS) + WEIGHT_DECAY * p)
    return dict(
        clipped_gradient={n: gradient[n] * scale for n in names},
        logprobs=[lp.detach().numpy() for lp in logprobs],
        ref_logprobs=[lp.numpy() for lp in ref_logprobs],
        advantages=advantages,
        loss=float(loss.detach()),
        kl_loss=float(kl_loss.detach()),
        grad_norm=norm,
        params_after=after,
    )


def test_the_trajectory_holds_transformers_logprobs(trainer_step, reference_step):
    trajectory = trainer_step["trajectory"]
    lengths = [len(lp) for lp in reference_step["logprobs"]]
    assert trajectory.num_rows == 4 and min(lengths) >= 1
    for row, (ours_old, ours_ref) in enumerate(
        zip(reference_step["logprobs"], reference_step["ref_logprobs"])
    ):
        n = lengths[row]
        # 1e-4: fp32 (XLA) against float64 (torch) through the layers and the 152k-entry
        # log_softmax; a wrong position, temperature or model is 1e-2 or more.
        np.testing.assert_allclose(trajectory.logprobs_old[row, :n], ours_old, atol=1e-4)
        np.testing.assert_allclose(trajectory.ref_logprobs[row, :n], ours_ref, atol=1e-4)
    # The perturbation made the policy and its reference differ: the KL terms are not zero.
    assert reference_step["kl_loss"] > 1e-4


def test_the_update_uses_the_reference_advantages(trainer_step, reference_step):
    """Each row of the update's mini-batch (found by its response tokens: the rows are
    shuffled) carries the reference's advantages."""
    minibatch = trainer_step["minibatch"]
    mask = np.asarray(minibatch.response_mask, bool).reshape(-1, minibatch.response_len)
    ids = np.asarray(minibatch.input_ids).reshape(mask.shape[0], -1)[:, -mask.shape[1] :]
    advantages = np.asarray(minibatch.advantages).reshape(mask.shape)
    responses = [
        tuple(c.token_ids) for samples in trainer_step["groups"].completions for c in samples
    ]
    matched = 0
    for row in range(mask.shape[0]):
        if not mask[row].any():
            continue  # an empty row (padding of a micro-batch)
        index = responses.index(tuple(ids[row][mask[row]]))
        expected = reference_step["advantages"][index]
        # 1e-5 of the advantages' unit spread: they come from the trajectory's fp32 logprobs
        # (1e-5 off float64's) through the KL reward and the whitening's division by a std.
        np.testing.assert_allclose(advantages[row][mask[row]], expected, rtol=0, atol=1e-5)
        matched += 1
    assert matched == len(responses) == 4
    assert np.ptp(np.concatenate(reference_step["advantages"])) > 0.1  # not all alike


def test_the_update_loss_and_gradient_equal_the_reference(trainer_step, reference_step):
    metrics = trainer_step["metrics"]
    assert metrics["loss/total"] == pytest.approx(reference_step["loss"], rel=1e-5, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(reference_step["grad_norm"], rel=1e-5)
    ours = {hf_name_for(n): to_hf_layout(n, g) for n, g in trainer_step["gradient"].items()}
    theirs = reference_step["clipped_gradient"]
    assert ours.keys() == theirs.keys()
    tower = [n for n in theirs if "visual." in n]
    assert tower and all(np.abs(theirs[n]).max() > 0 for n in tower)
    largest = max(np.abs(g).max() for g in theirs.values())
    worst = {n: float(np.abs(ours[n] - theirs[n]).max()) for n in theirs}
    name = max(worst, key=worst.get)
    assert worst[name] <= 1e-5 * largest, (name, worst[name], largest)


def test_the_parameters_after_the_step_equal_the_reference(trainer_step, reference_step):
    ours = {hf_name_for(n): to_hf_layout(n, v) for n, v in trainer_step["params_after"].items()}
    theirs = reference_step["params_after"]
    assert ours.keys() == theirs.keys()
    worst = {n: float(np.abs(ours[n] - theirs[n]).max()) for n in theirs}
    name = max(worst, key=worst.get)
    assert worst[name] <= 1e-6, (name, worst[name])
    # and they moved: by about lr where the gradient is not small
    moved = max(float(np.abs(ours[n] - trainer_step["start_hf"][n]).max()) for n in ours)
    assert 0.5 * LR < moved < 2 * LR
