"""The MAYE RL loop. Each generation step is the four steps of the paper, one call each:

1. prompts     = data_flow(step)                      the next batch of records -> model inputs
2. completions = collect_responses(prompts, step)     sync weights, generate
3. trajectory  = make_trajectory(prompts, completions) logprobs (policy, reference), rewards
4. metrics     = policy_update(trajectory, step)      advantages + jitted sharded updates

python -m maye_jax.train --config=configs/demo.py [--config.rl.kl_loss_coeff=0.01 ...]
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import psutil
from absl import app, flags
from ml_collections import config_flags

from maye_jax import runtime
from maye_jax.algorithms import AdvantageConfig, compute_advantages
from maye_jax.data import epoch_order
from maye_jax.evaluate import evaluate_configured_splits
from maye_jax.losses import LossConfig
from maye_jax.metrics import (
    MetricsWriter,
    summarize_run,
    truncate_metrics,
    write_rollouts,
    write_run_json,
)
from maye_jax.processor import get_prompt_template, load_processor
from maye_jax.rollout.engine import Prompt, Sampling
from maye_jax.rollout.factory import make_engine
from maye_jax.scheme import reflection_metrics
from maye_jax.train_checkpoint import (
    TrainCheckpointer,
    has_start_model,
    start_model_dir,
)
from maye_jax.trajectory import build_trajectory
from maye_jax.update import (
    UpdateConfig,
    check_finite,
    make_minibatch,
    make_tower_minibatch,
    make_train_step,
    per_row_image_features,
)
from models.hf_mapping import hf_name_for, hf_tensors_for_sync
from models.vision_inputs import bucket

log = logging.getLogger("maye_jax")


class Trainer:
    """Holds the run's state; `run()` is the loop. Built from one ml_collections config."""

    def __init__(self, config, *, policy=None, data=None, processor=None):
        self.config = c = config
        self.output_dir = Path(c.output_dir).absolute()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.data = data or runtime.prepare_data(c)
        # A training tower runs inside the update on each micro-batch's own images; a frozen
        # one runs once per generation step (the paper's setting, the default).
        self.tower_trains = bool(c.model.train_vit or c.model.train_connector)
        self.prompts_per_step = c.rl.batch_size // c.rollout.num_samples
        _check_batch_sizes(c, len(self.data["train"]))
        self.steps_per_epoch = len(self.data["train"]) // self.prompts_per_step
        self.total_steps = self.steps_per_epoch * c.rl.num_epochs
        self.updates_per_step = (c.rl.batch_size // c.rl.ppo_batch_size) * c.rl.ppo_epochs
        self.mesh = runtime.build_mesh(c) if policy is None else policy.layout.mesh
        self.optimizer, self.schedule = runtime.optimizer_for(
            c, self.total_steps * self.updates_per_step
        )
        self.hf_model_dir = runtime.materialize_start_model(c)  # what a worker engine loads first
        if policy is None:
            # A resumed run restarts from its own start point (e.g. the SFT-warmed model).
            source = (
                start_model_dir(self.output_dir)
                if c.resume and has_start_model(self.output_dir)
                else self.hf_model_dir
            )
            policy = runtime.build_policy(c, self.mesh, source, self.optimizer, with_reference=True)
        else:  # e.g. after an SFT warm-up: keep the weights, start a fresh optimizer
            policy = runtime.with_fresh_optimizer(c, policy, self.optimizer)
        self.policy = policy
        self.processor = processor or load_processor(
            str(policy.source_dir),
            family=policy.model_config.family,
            min_pixels=c.data.min_pixels,
            max_pixels=c.data.max_pixels,
        )
        self.instruction = get_prompt_template(c.data.prompt_template)
        runtime.save_start_model(self.output_dir, policy)
        self.engine = make_engine(
            c.rollout.engine,
            model=policy.model(),
            config=policy.model_config,
            tokenizer=self.processor.tokenizer,
            model_dir=str(self.hf_model_dir),
            worker_python=c.rollout.worker_python,
            worker_devices=c.rollout.worker_devices,
            timeout_s=c.rollout.timeout_s,
            gpu_memory_utilization=c.rollout.gpu_memory_utilization,
            dtype=c.model.dtype,
            frozen_hf_names={hf_name_for(name) for name in policy.frozen},
        )
        self.update_config = UpdateConfig(
            loss=LossConfig(
                policy_loss=c.rl.policy_loss,
                clip_eps_low=c.rl.clip_eps_low,
                clip_eps_high=c.rl.clip_eps_high,
                kl_loss_coeff=c.rl.kl_loss_coeff,
                loss_agg=c.rl.loss_agg,
                max_tokens=c.rollout.max_tokens,
                rollout_is_cap=c.rl.rollout_is_cap or None,
            ),
            temperature=c.rollout.temperature,
            logprob_chunk_size=c.rl.logprob_chunk_size,
        )
        self.step_fn = make_train_step(
            policy.model_def, self.optimizer, self.schedule, policy.layout, self.update_config
        )
        self.checkpointer = TrainCheckpointer(self.output_dir, keep=c.checkpoint.keep)
        self.weights_version = 0
        self.stop_requested = False
        self.stop_after_step: int | None = None  # tests: simulate a preemption after this step
        self.epoch_correct: list[bool] = []

    # -- the four steps -----------------------------------------------------------------------
    def data_flow(self, step: int):
        """Step 1: the records of generation step `step` (1-based) and their model inputs."""
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        order = epoch_order(len(self.data["train"]), self.config.seed, epoch)
        picked = order[index * self.prompts_per_step : (index + 1) * self.prompts_per_step]
        records = [self.data["train"][i] for i in picked]
        encoded = [
            self.processor.encode(r.load_image(), r.question, self.instruction) for r in records
        ]
        return records, encoded

    def collect_responses(self, encoded, step: int):
        """Step 2: the rollout engine gets the current weights, then samples."""
        started = time.perf_counter()
        self.sync_weights()
        sync_seconds = time.perf_counter() - started
        r = self.config.rollout
        sampling = Sampling(
            n=r.num_samples,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_tokens=r.max_tokens,
            seed=self.config.seed,
            stop_token_ids=(151645, 151643),
        )
        prompts = [Prompt(e["input_ids"], e["pixel_values"], e["image_grid_thw"]) for e in encoded]
        return self.engine.generate(prompts, sampling, step=step), sync_seconds

    def make_trajectory(self, records, encoded, completions):
        """Step 3: query+response sequences, logprobs (policy, reference), rewards."""
        c = self.config
        reward_options = {
            "accuracy": {"timeout_s": c.rewards.timeout_s},
            "language": {"char_class": c.rewards.language_char_class},
        }
        penalty = (
            dict(
                min_response_length=c.rewards.min_response_length,
                reward_penalty=c.rewards.reward_penalty,
            )
            if c.rewards.penalty
            else None
        )
        # Without a KL term the reference model is never used: skip its forward pass.
        needs_reference = c.rl.kl_loss_coeff != 0 or c.rl.kl_reward_coeff != 0
        return build_trajectory(
            policy=self.policy.model(),
            reference=self.policy.reference() if needs_reference else None,
            config=self.policy.model_config,
            records=records,
            prompts=encoded,
            completions=completions,
            reward_names=list(c.rewards.names),
            reward_options={k: v for k, v in reward_options.items() if k in c.rewards.names},
            penalty=penalty,
            temperature=c.rollout.temperature,
            forward_batch_size=c.rl.forward_batch_size,
            chunk_size=c.rl.logprob_chunk_size,
            rows_multiple=c.rl.ppo_batch_size,
            pad_id=self.processor.tokenizer.pad_token_id,
            max_tokens=c.rollout.max_tokens,
            reference_shares_vision=not self.tower_trains,
        )

    def policy_update(self, trajectory, step: int) -> dict:
        """Step 4: advantages, then (batch_size // ppo_batch_size) * ppo_epochs jitted updates
        over shuffled mini-batches."""
        c = self.config
        batch = trajectory.batch
        advantages = np.asarray(
            compute_advantages(
                c.rl.advantage_estimator,
                scores=trajectory.scores,
                response_mask=batch.response_mask,
                logprobs=trajectory.logprobs_old,
                ref_logprobs=trajectory.ref_logprobs,
                num_samples_per_prompt=c.rollout.num_samples,
                config=AdvantageConfig(
                    gamma=c.rl.gamma,
                    kl_reward_coeff=c.rl.kl_reward_coeff,
                    kl_estimator=c.rl.kl_estimator,
                    whiten=c.rl.whiten,
                    shift_mean=c.rl.shift_mean,
                ),
            )
        )
        rows = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            positions=batch.positions,
            response_mask=batch.response_mask,
            advantages=advantages,
            logprobs_old=trajectory.logprobs_old,
        )
        if c.rl.kl_loss_coeff != 0:
            rows["ref_logprobs"] = trajectory.ref_logprobs
        if c.rl.rollout_is_cap:
            rows["logprobs_rollout"] = trajectory.rollout_logprobs
        if self.tower_trains:
            rows["image_feature_index"] = batch.image_feature_index
        elif trajectory.features is not None:
            per_row = int((batch.image_feature_index >= 0).sum(axis=1).max())
            features, local_index = per_row_image_features(
                trajectory.features, batch.image_feature_index, features_per_row=bucket(per_row, 4)
            )
            rows["image_features"], rows["image_feature_index"] = features, local_index
        num_rows = batch.input_ids.shape[0]
        num_micro = c.rl.ppo_batch_size // c.rl.micro_batch_size
        rng = np.random.default_rng([c.seed, step, 7])
        summed: dict[str, float] = {}
        updates = 0
        for _ in range(c.rl.ppo_epochs):
            order = rng.permutation(num_rows)
            for start in range(0, num_rows, c.rl.ppo_batch_size):
                picked = order[start : start + c.rl.ppo_batch_size]
                chosen = {
                    name: (value[:, picked] if name == "positions" else value[picked])
                    for name, value in rows.items()
                }
                if self.tower_trains:
                    minibatch = make_tower_minibatch(
                        chosen,
                        num_micro,
                        prompt_images=trajectory.prompt_images,
                        row_prompt=trajectory.row_prompt[picked],
                        vision_config=self.policy.model_config.vision,
                    )
                else:
                    minibatch = make_minibatch(chosen, num_micro)
                self.policy.state, metrics, finite = self.step_fn(
                    self.policy.state, self.policy.frozen, minibatch
                )
                check_finite(finite, metrics, step=f"{step} (update {updates})")
                for key, value in jax.device_get(metrics).items():
                    summed[key] = summed.get(key, 0.0) + float(value)
                updates += 1
        return {key: value / updates for key, value in summed.items()}

    # -- around the steps ---------------------------------------------------------------------
    def sync_weights(self) -> None:
        """Gives the rollout engine the current policy (in process: no copy; workers: shm).
        A worker gets the trainable tensors in HF layout (`hf_tensors_for_sync`: made on the
        device, in the worker's dtype, on an accelerator); the frozen ones (the tower by
        default) with the first sync only."""
        self.weights_version += 1
        if self.config.rollout.engine == "jax":
            self.engine.set_model(self.policy.model())
            return
        names = set(self.policy.state.params)
        if self.weights_version == 1:
            names |= set(self.policy.frozen)
        arrays = hf_tensors_for_sync(
            self.policy.model(), names, dtype=runtime.dtype_of(self.config.model.dtype)
        )
        self.engine.sync_weights(arrays, self.weights_version)

    def evaluate(self, epoch: int, step: int) -> dict:
        self.sync_weights()
        folder = self.output_dir / "eval_responses"
        return evaluate_configured_splits(
            self.engine,
            self.processor,
            self.data,
            self.config,
            step=step,
            instruction=self.instruction,
            responses_path=lambda split: folder / f"epoch_{epoch}_{split}.jsonl",
        )

    def save_checkpoint(self, step: int) -> None:
        meta = dict(
            generation_step=step,
            seed=self.config.seed,
            weights_version=self.weights_version,
            # this epoch's correctness so far: train/epoch_accuracy of a run resumed mid-epoch
            epoch_correct=[bool(x) for x in self.epoch_correct],
        )
        self.checkpointer.save(step, self.policy.state, meta)

    def restore_checkpoint(self) -> int:
        restored = self.checkpointer.restore_latest(self.policy.state, self.policy.layout.state)
        if restored is None:
            return 0
        self.policy.state, meta = restored
        self.epoch_correct = [bool(x) for x in meta.get("epoch_correct", [])]
        log.info("resumed from generation step %d", meta["generation_step"])
        return int(meta["generation_step"])

    def step_metrics(self, trajectory, update_metrics, timings) -> dict:
        n = trajectory.num_rows
        mask = trajectory.batch.response_mask[:n].astype(bool)
        mismatch = np.abs(trajectory.logprobs_old[:n] - trajectory.rollout_logprobs[:n])[mask]
        lengths = trajectory.response_lengths[:n]
        metrics = {
            "train/accuracy": float(np.mean(trajectory.correct[:n])),
            "train/reward/total": float(np.mean(trajectory.scores[:n])),
            "response_length/mean": float(lengths.mean()),
            "response_length/max": int(lengths.max()),
            "response_length/clip_ratio": float(np.mean(~trajectory.finished[:n])),
            "response_length/num_eos": int(trajectory.finished[:n].sum()),
            "mismatch/logprob_abs_mean": float(mismatch.mean()) if mismatch.size else 0.0,
            "mismatch/logprob_abs_max": float(mismatch.max()) if mismatch.size else 0.0,
            "memory/host_bytes": int(psutil.Process().memory_info().rss),
            "memory/device_bytes": runtime.device_memory_bytes(),
        }
        for name, values in trajectory.reward_components.items():
            metrics[f"train/reward/{name}"] = float(np.mean(values[:n]))
        metrics.update(update_metrics)
        for name, value in reflection_metrics(
            trajectory.texts, list(trajectory.correct[:n])
        ).items():
            metrics[f"reflection/{name}"] = value
        metrics.update({f"time/{k}_seconds": v for k, v in timings.items()})
        return metrics

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.config
        write_run_json(
            self.output_dir,
            name=c.name,
            seed=c.seed,
            kind="rl",
            config=c.to_dict(),
            devices=[str(d) for d in jax.devices()],
        )
        start = self.restore_checkpoint() if c.resume else 0
        if start:
            truncate_metrics(self.output_dir, start)
        writer = MetricsWriter(
            self.output_dir,
            tensorboard=c.logging.tensorboard,
            wandb=c.logging.wandb,
            wandb_project=c.logging.wandb_project,
            run_name=c.name,
            config=c.to_dict(),
            append=bool(start),
        )
        # Preemption (SIGTERM) or Ctrl-C (SIGINT): finish the generation step, checkpoint, stop.
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, self._request_stop)
        last_saved = start
        try:
            if start == 0 and c.eval.enabled and c.eval.at_start:
                writer.write(self.evaluate(0, 0), generation_step=0, epoch=0)
            progress = _progress(c, start, self.total_steps)
            for step in range(start + 1, self.total_steps + 1):
                epoch = (step - 1) // self.steps_per_epoch + 1
                timings = {}
                t0 = time.perf_counter()
                records, encoded = self.data_flow(step)
                t1 = time.perf_counter()
                completions, timings["sync"] = self.collect_responses(encoded, step)
                t2 = time.perf_counter()
                trajectory = self.make_trajectory(records, encoded, completions)
                t3 = time.perf_counter()
                update_metrics = self.policy_update(trajectory, step)
                t4 = time.perf_counter()
                timings.update(
                    data=t1 - t0,
                    rollout=t2 - t1 - timings["sync"],
                    trajectory=t3 - t2,
                    update=t4 - t3,
                )
                metrics = self.step_metrics(trajectory, update_metrics, timings)
                self.epoch_correct.extend(trajectory.correct[: trajectory.num_rows].tolist())
                if step % self.steps_per_epoch == 0:
                    metrics["train/epoch_accuracy"] = float(np.mean(self.epoch_correct))
                    self.epoch_correct = []
                    if c.eval.enabled and epoch % c.eval.every_epochs == 0:
                        metrics.update(self.evaluate(epoch, step))
                writer.write(metrics, generation_step=step, epoch=epoch)
                if c.logging.save_rollouts:
                    write_rollouts(self.output_dir, step, _rollout_rows(trajectory))
                if self.stop_after_step == step:
                    self.stop_requested = True
                progress.update(1)
                progress.set_postfix(
                    acc=f"{metrics['train/accuracy']:.2f}",
                    len=f"{metrics['response_length/mean']:.0f}",
                )
                if (
                    step % c.checkpoint.every_steps == 0
                    or step == self.total_steps
                    or self.stop_requested
                ):
                    self.save_checkpoint(step)
                    last_saved = step
                if self.stop_requested:
                    log.warning("stopping at generation step %d (signal); checkpoint saved", step)
                    break
            progress.close()
            if c.checkpoint.export_hf and last_saved == self.total_steps:
                from maye_jax.checkpoint import export_hf

                export_hf(
                    self.policy.model(),
                    self.policy.hf_config,
                    self.output_dir / "final_hf",
                    tokenizer_source=self.policy.source_dir,
                )
        finally:
            writer.close()
            self.checkpointer.close()
            self.engine.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return summarize_run(self.output_dir)

    def _request_stop(self, signum, frame):
        del frame
        log.warning("signal %d: will checkpoint and stop after this generation step", signum)
        self.stop_requested = True


def build_trainer(c) -> Trainer:
    """The RL trainer; with `sft.num_epochs > 0` the policy is first warmed up by SFT (the demo),
    unless the run resumes, in which case it restarts from its saved start model."""
    output_dir = Path(c.output_dir).absolute()
    if c.sft.num_epochs <= 0 or (c.resume and has_start_model(output_dir)):
        return Trainer(c)
    from maye_jax.sft import SFTRunner

    # The warm-up teaches a (possibly random) model the answer format: it trains the whole LLM,
    # embeddings included, whatever the RL stage freezes.
    warmup = copy.deepcopy(c)
    warmup.model.train_embeddings = True
    data, policy, processor = runtime.start_for_sft(warmup)
    started = time.perf_counter()
    writer = MetricsWriter(output_dir / "sft_warmup")  # the warm-up's own loss curve
    try:
        policy = SFTRunner(
            warmup, policy, processor, data, num_epochs=c.sft.num_epochs, writer=writer
        ).run(evaluate_at_start=False, evaluate_every_epoch=False)
    finally:
        writer.close()
    log.info("SFT warm-up: %d epochs in %.0f s", c.sft.num_epochs, time.perf_counter() - started)
    return Trainer(c, policy=policy, data=data, processor=processor)


def _rollout_rows(trajectory):
    rows = []
    for i in range(trajectory.num_rows):
        row = dict(
            prompt_id=trajectory.prompt_ids[i],
            response=trajectory.texts[i],
            response_length=int(trajectory.response_lengths[i]),
            finished=bool(trajectory.finished[i]),
            score=float(trajectory.scores[i]),
        )
        for name, values in trajectory.reward_components.items():
            row[f"reward/{name}"] = float(values[i])
        rows.append(row)
    return rows


def _check_batch_sizes(c, num_train: int) -> None:
    rl = c.rl
    problems = []
    if rl.batch_size % c.rollout.num_samples:
        problems.append(
            f"rl.batch_size {rl.batch_size} not divisible by rollout.num_samples {c.rollout.num_samples}"
        )
    if rl.batch_size % rl.ppo_batch_size:
        problems.append(
            f"rl.batch_size {rl.batch_size} not divisible by rl.ppo_batch_size {rl.ppo_batch_size}"
        )
    if rl.ppo_batch_size % rl.micro_batch_size:
        problems.append(
            f"rl.ppo_batch_size {rl.ppo_batch_size} not divisible by rl.micro_batch_size {rl.micro_batch_size}"
        )
    if num_train < rl.batch_size // c.rollout.num_samples:
        problems.append(
            f"{num_train} training records < {rl.batch_size // c.rollout.num_samples} prompts per step"
        )
    if problems:
        raise ValueError("config: " + "; ".join(problems))


def _progress(c, start, total):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc=c.name,
        unit="step",
        disable=not c.logging.progress_bar,
        file=sys.stderr,
    )


FLAGS = flags.FLAGS


def main(argv) -> int:
    del argv
    runtime.setup_cli_logging()
    config = FLAGS.config
    trainer = build_trainer(config)
    summary = trainer.run()
    print(json.dumps(summary, indent=2))
    for key in sorted(k for k in summary if k.startswith("eval/validation/")):
        row = summary[key]
        print(
            f"{key}: start of RL {100 * row['first']:.1f}%, best during RL {100 * row['best']:.1f}%, "
            f"last {100 * row['last']:.1f}%"
        )
    print(f"metrics: {Path(config.output_dir).absolute() / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/*.py).", lock_config=True
    )
    app.run(lambda argv: sys.exit(main(argv)))
