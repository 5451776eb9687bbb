"""The MAYE RL loop. Each generation step is the four steps of the paper, one call each:

1. prompts     = data_flow(count)                     the next records of the epoch -> model inputs
2. completions = collect_responses(prompts, step)     the engine loads the weights, samples
3. trajectory  = make_trajectory(prompts, completions) rewards, logprobs (policy, reference)
4. metrics     = policy_update(trajectory, step)      advantages + jitted sharded updates

With `rl.dynamic_sampling` (DAPO), steps 1-3's rewards repeat for top-up prompts until the
batch holds only prompt groups whose scores differ (maye_jax/rl/dynamic_sampling.py); an epoch
then ends when its prompts run out, which can be after fewer steps (maye_jax/data/cursor.py).

With `rl.async_rollouts` a torch-side worker generates step n+1's responses while steps 3-4 of
step n run (maye_jax/rollout/overlap.py: one step off-policy, corrected by the truncated
importance weight); the trainer waits for them when its update ends.

Everything around the steps (output folder, resume, metrics, progress, signals, checkpoints,
the final export) is the run harness's (maye_jax/run/harness.py).

python -m maye_jax.train --config=configs/demo.py [--config.rl.kl_loss_coeff=0.01 ...]
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np

from maye_jax.config.settings import Settings, load_settings
from maye_jax.data.cursor import EpochCursor
from maye_jax.data.processor import get_prompt_template
from maye_jax.errors import EvaluationInterrupted
from maye_jax.evaluation.evaluate import evaluate_configured_splits
from maye_jax.qwen_ids import STOP_TOKEN_IDS
from maye_jax.rl.advantages import (
    WHITENING_ESTIMATORS,
    compute_advantages,
    masked_whiten_across_processes,
)
from maye_jax.rl.dynamic_sampling import PromptGroups, fill_batch, top_up_seed
from maye_jax.rl.step_rows import gather_step_rows, rollout_rows, step_metrics
from maye_jax.rl.trajectory import build_trajectory, score_responses
from maye_jax.rollout.engine import Prompt, Sampling
from maye_jax.rollout.factory import make_engine
from maye_jax.rollout.overlap import OverlappedRollouts
from maye_jax.run import multihost, startup
from maye_jax.run.folder import check_fingerprint, prepare_run_folder
from maye_jax.run.harness import RunHarness
from maye_jax.run.lock import configured_process_id, hold_output_folder
from maye_jax.run.metrics import print_summary, summarize_run, write_rollouts
from maye_jax.storage.train_checkpoints import has_start_model, start_model_dir
from maye_jax.training.batch import MinibatchMaker, TowerImages
from maye_jax.training.global_batch import GlobalMinibatches, agree_on_image_features
from maye_jax.training.policy import (
    build_policy,
    host_local_model,
    optimizer_for,
    with_fresh_optimizer,
)
from maye_jax.training.update import StepUpdates, make_train_step

log = logging.getLogger("maye_jax")


class Trainer:
    """Holds the run's state; `run()` is the loop. Built from the run's typed settings."""

    def __init__(
        self, settings: Settings, *, policy=None, data=None, processor=None, fingerprint=None
    ):
        self.settings = s = settings
        self.output_dir = Path(s.output_dir).absolute()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if data is None:
            files = startup.data_files(s)
            fingerprint = check_fingerprint(s, files)
            data = startup.prepare_data(s, files)
        self.data, self.fingerprint = data, fingerprint
        startup.check_rl_data(s, data)
        self.prompts_per_step = s.rl.batch_size // s.rollout.num_samples
        # Without dynamic sampling every epoch has exactly steps_per_epoch steps; with it an epoch
        # can end sooner (its top-ups use up the prompts), and total_steps is an upper bound
        # (the learning-rate schedule's horizon; the cosine then stops before its end).
        self.steps_per_epoch = len(self.data["train"]) // self.prompts_per_step
        self.total_steps = self.steps_per_epoch * s.rl.num_epochs
        self.cursor = EpochCursor(len(self.data["train"]), s.seed)
        self.updates_per_step = (s.rl.batch_size // s.rl.ppo_batch_size) * s.rl.ppo_epochs
        self.processes = jax.process_count()  # several: each takes its share of every step
        self.share = slice(0, self.prompts_per_step)
        if self.processes > 1:
            startup.check_multiprocess(s, kind="rl")
            self.share = multihost.share(self.prompts_per_step, "config.rl.batch_size's prompts")
        optimizer, schedule = optimizer_for(s, self.total_steps * self.updates_per_step)
        self.hf_model_dir = startup.materialize_start_model(s)  # what a worker engine loads first
        # The reference model is held only when a KL term uses it.
        with_reference = s.rl.uses_reference
        if policy is None:
            # A resumed run restarts from its own start point (e.g. the SFT-warmed model).
            resumes_from_start_model = s.resume and has_start_model(self.output_dir)
            source = start_model_dir(self.output_dir) if resumes_from_start_model else None
            mesh = startup.build_mesh(s)
            policy = build_policy(
                s, mesh, source or self.hf_model_dir, optimizer, with_reference=with_reference
            )
        else:  # e.g. after an SFT warm-up: keep the weights, start a fresh optimizer
            policy = with_fresh_optimizer(s, policy, optimizer, with_reference=with_reference)
        self.policy = policy
        log.info(
            "RL: %d generation steps (%d epochs of %d), %d updates each; rollouts: %s engine",
            self.total_steps,
            s.rl.num_epochs,
            self.steps_per_epoch,
            self.updates_per_step,
            s.rollout.engine,
        )
        self.processor = processor or startup.load_run_processor(
            s, policy.source_dir, policy.model_config.family
        )
        self.instruction = get_prompt_template(s.data.prompt_template)
        startup.save_start_model(self.output_dir, policy)
        self.engine = make_engine(
            s.rollout.engine,
            model=policy.model(),
            config=policy.model_config,
            tokenizer=self.processor.tokenizer,
            model_dir=str(self.hf_model_dir),
            rollout=s.rollout,
            dtype=s.model.dtype,
            frozen_params=set(policy.frozen),
        )
        # rl.async_rollouts: step n+1 is generated while step n updates (rollout/overlap.py)
        self.overlap = OverlappedRollouts(self.engine) if s.rl.async_rollouts else None
        self.step_fn = make_train_step(
            policy.model_def, optimizer, schedule, policy.layout, s.update_config()
        )
        self.weights_version = 0  # the generation step whose update made the current weights
        self.engine_version = None  # the version the rollout engine holds
        self.stop_after_step: int | None = None  # tests: simulate a preemption after this step
        self.epoch_correct: list[bool] = []
        self.run_harness: RunHarness | None = None

    # -- the four steps -----------------------------------------------------------------------
    def data_flow(self, count: int):
        """Step 1: the next `count` records of the epoch order (fewer if the epoch has fewer
        left) and their model inputs; the data cursor moves past them."""
        picked = list(self.cursor.take(count))
        if self.processes > 1:  # this host's contiguous share of the step's prompts
            picked = picked[self.share]
        records = [self.data["train"][i] for i in picked]
        encoded = [
            self.processor.encode(r.load_image(), r.question, self.instruction) for r in records
        ]
        return records, encoded

    def collect_responses(self, encoded, step: int, round_index: int = 0):
        """Step 2: the rollout engine loads the current weights (in process: no copy; torch-side
        workers: shared memory), then samples. `round_index` > 0: a dynamic-sampling top-up,
        with its own seed. Overlapped: the responses generated ahead for this step, and the
        next step's generation starts."""
        prompts = [_prompt(e) for e in encoded]
        if self.overlap is not None:  # one process only (refused at validation otherwise)
            return self.overlap.collect(
                step,
                prompts,
                self.sampling(step),
                model=self.policy.model(),
                version=self.weights_version,
                next_prompts=self.prompts_after(step),
                next_sampling=self.sampling(step + 1),
                on_sync=lambda: self.run_harness.section("sync"),
            )
        with self.run_harness.section("sync"):
            self.load_rollout_weights()
        # Global prompt indices: each host's prompts draw their own seeds.
        return self.engine.generate(
            prompts, self.sampling(step, round_index), step=step, first_index=self.share.start
        )

    def sampling(self, step: int, round_index: int = 0) -> Sampling:
        r, seed = self.settings.rollout, self.settings.seed
        return Sampling(
            n=r.num_samples,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=-1 if r.top_k is None else r.top_k,
            max_tokens=r.max_tokens,
            seed=seed if round_index == 0 else top_up_seed(seed, step, round_index),
            stop_token_ids=STOP_TOKEN_IDS,
        )

    def prompts_after(self, step: int) -> list[Prompt] | None:
        """The prompts step `step` + 1 will read (without moving the data cursor); None when
        `step` is the run's last."""
        cursor = dataclasses.replace(self.cursor)
        cursor.end_epoch_if_short(self.prompts_per_step)
        if step >= self.total_steps or cursor.epoch >= self.settings.rl.num_epochs:
            return None
        records = [self.data["train"][i] for i in cursor.take(self.prompts_per_step)]
        return [
            _prompt(self.processor.encode(r.load_image(), r.question, self.instruction))
            for r in records
        ]

    def finish_rollouts(self) -> None:
        """When an update ends: wait for the responses generated ahead (overlapped rollouts)."""
        if self.overlap is not None:
            with self.run_harness.section("rollout"):
                self.overlap.wait()

    def load_rollout_weights(self) -> None:
        """The engine gets the current weights once per version; several processes: this
        host's copy (`Policy.local_model`), so no host waits on another to sample."""
        if self.engine_version != self.weights_version:
            self.engine.load_policy(self.policy.local_model(), self.weights_version)
            self.engine_version = self.weights_version

    def sample_groups(self, count: int, step: int, round_index: int = 0) -> PromptGroups | None:
        """Steps 1-2 and the rewards of step 3 for the next `count` prompts (None when the epoch
        has none left): a step's first round, or a dynamic-sampling top-up."""
        run = self.run_harness
        with run.section("data"):
            records, encoded = self.data_flow(count)
        if not records:
            return None
        with run.section("rollout"):
            completions = self.collect_responses(encoded, step, round_index)
        with run.section("trajectory"):
            rewards = score_responses(records, completions, self.settings.trajectory_config())
        return PromptGroups(records, encoded, completions, rewards)

    def collect_batch(self, step: int) -> tuple[PromptGroups, PromptGroups, dict]:
        """Steps 1-2 and the rewards for one update batch: (its prompt groups, every group
        sampled, dynamic-sampling metrics). With `rl.dynamic_sampling`, groups whose scores are
        all equal are dropped and replaced by top-ups (maye_jax/rl/dynamic_sampling.py)."""
        groups = self.sample_groups(self.prompts_per_step, step)
        if not self.settings.rl.dynamic_sampling:
            return groups, groups, {}
        batch, metrics, sampled = fill_batch(
            groups,
            wanted=self.prompts_per_step,
            sample_more=lambda count, round_index: self.sample_groups(count, step, round_index),
            max_rounds=self.settings.rl.dynamic_sampling_max_rounds,
        )
        return batch, sampled, metrics

    def make_trajectory(self, groups: PromptGroups):
        """Step 3: query+response sequences, logprobs (policy, reference); the rewards were
        scored with the samples (`sample_groups`). Several processes: each on its own rows,
        with its copy of the weights, in a layout every process shares."""
        records, encoded, completions = groups.records, groups.encoded, groups.completions
        options = self.settings.trajectory_config()
        reference = self.policy.reference()  # None without a KL term: no forward pass
        min_prompt_len = min_response_len = 1
        if self.processes > 1:  # every process lays out its rows with the same P and R
            reference = reference and host_local_model(reference)
            options = dataclasses.replace(options, rows_multiple=1)  # the global batch is whole
            longest = [
                max(len(np.asarray(e["input_ids"]).reshape(-1)) for e in encoded),
                max(len(c.token_ids) for samples in completions for c in samples),
            ]
            longest = multihost.allgather_rows(np.asarray([longest])).max(axis=0)
            min_prompt_len, min_response_len = int(longest[0]), int(longest[1])
        return build_trajectory(
            policy=self.policy.local_model(),
            reference=reference,
            config=self.policy.model_config,
            records=records,
            prompts=encoded,
            completions=completions,
            options=options,
            pad_id=self.processor.tokenizer.pad_token_id,
            reference_shares_vision=not self.settings.model.tower_trains,
            rewards=groups.rewards,
            min_prompt_len=min_prompt_len,
            min_response_len=min_response_len,
        )

    def policy_update(self, trajectory, step: int) -> dict:
        """Step 4: advantages, then (batch_size // ppo_batch_size) * ppo_epochs jitted updates
        over shuffled mini-batches."""
        s = self.settings
        batch = trajectory.batch
        config = s.advantage_config()
        # Several processes whiten with every process's statistics (groups stay on one host).
        whiten_across = (
            self.processes > 1
            and config.whiten
            and s.rl.advantage_estimator in WHITENING_ESTIMATORS
        )
        advantages = np.asarray(
            compute_advantages(
                s.rl.advantage_estimator,
                scores=trajectory.scores,
                response_mask=batch.response_mask,
                logprobs=trajectory.logprobs_old,
                ref_logprobs=trajectory.ref_logprobs,
                num_samples_per_prompt=s.rollout.num_samples,
                config=dataclasses.replace(config, whiten=False) if whiten_across else config,
            )
        )
        if whiten_across:
            advantages = masked_whiten_across_processes(
                advantages,
                batch.response_mask,
                shift_mean=config.shift_mean,
                eps=config.whiten_eps,
                global_sum=multihost.global_sum,
            )
        features, min_features_per_row = trajectory.features, 0
        if self.processes > 1:  # every process's rows get the same feature table size
            features, min_features_per_row = agree_on_image_features(batch, features)
        tower = None
        if s.model.tower_trains:
            tower = TowerImages(
                trajectory.prompt_images, trajectory.row_prompt, self.policy.model_config.vision
            )
        minibatches = MinibatchMaker.build(
            batch,
            per_token=dict(
                advantages=advantages,
                logprobs_old=trajectory.logprobs_old,
                ref_logprobs=trajectory.ref_logprobs if s.rl.kl_loss_coeff != 0 else None,
                logprobs_rollout=trajectory.rollout_logprobs if s.rl.rollout_is_cap else None,
            ),
            features=features,
            tower=tower,
            min_features_per_row=min_features_per_row,
            response_buckets=s.trajectory_config().response_buckets,
        )
        if self.processes > 1:  # every process's rows, one global batch
            minibatches = GlobalMinibatches(
                minibatches.rows, self.policy.layout, num_processes=self.processes
            )
        num_micro = s.rl.ppo_batch_size // s.rl.micro_batch_size
        rng = np.random.default_rng([s.seed, step, 7])
        updates = StepUpdates(f"{step}", name_updates=True)
        for _ in range(s.rl.ppo_epochs):
            order = rng.permutation(minibatches.num_rows)
            for start in range(0, minibatches.num_rows, s.rl.ppo_batch_size):
                minibatch = minibatches(order[start : start + s.rl.ppo_batch_size], num_micro)
                self.policy.state, metrics, finite = self.step_fn(
                    self.policy.state, self.policy.frozen, minibatch
                )
                updates.add(metrics, finite)
        self.weights_version = step
        return updates.mean_metrics()

    # -- around the steps ---------------------------------------------------------------------
    def evaluate(self, epoch: int, step: int) -> dict:
        """The scheme's evaluation of the current weights; a stop request abandons it
        (EvaluationInterrupted). Overlapped rollouts: after the request in flight."""
        if self.overlap is not None:
            self.overlap.wait()
        self.load_rollout_weights()
        folder = self.output_dir / "eval_responses"
        return evaluate_configured_splits(
            self.engine,
            self.processor,
            self.data,
            self.settings,
            step=step,
            instruction=self.instruction,
            responses_path=lambda split: folder / f"epoch_{epoch}_{split}.jsonl",
            should_stop=self.run_harness.should_stop if self.run_harness else None,
        )

    def checkpoint_meta(self) -> dict:
        return dict(
            seed=self.settings.seed,
            weights_version=self.weights_version,
            # this epoch's correctness so far: train/epoch_accuracy of a run resumed mid-epoch
            epoch_correct=[bool(x) for x in self.epoch_correct],
            # where the next step reads its prompts (dynamic sampling moves it by more than a
            # step's prompts)
            data_cursor=self.cursor.state(),
            # overlapped rollouts: the next step's finished responses (their weights are gone)
            **({"pending_rollouts": self.overlap.state()} if self.overlap is not None else {}),
        )

    def export_hf(self, out_dir: Path) -> None:
        from maye_jax.storage.model_folders import export_hf

        policy = self.policy
        model = policy.local_model()  # several processes: every one takes part (a gather)
        if multihost.is_leader():
            export_hf(
                model,
                policy.hf_config,
                out_dir,
                tokenizer_source=policy.source_dir,
                progress=self.settings.logging.progress_bar,
            )
        multihost.barrier("final export written")

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.settings
        harness = RunHarness(
            self.output_dir,
            kind="rl",
            settings=s,
            total_steps=self.total_steps,
            fingerprint=self.fingerprint,
            export=self.export_hf,
        )
        harness.stop_after_step = self.stop_after_step
        self.run_harness = harness
        try:
            with harness as run:
                start, self.policy.state, meta = run.restore(
                    self.policy.state, self.policy.layout.state
                )
                self.epoch_correct = [bool(x) for x in meta.get("epoch_correct", [])]
                self.weights_version = start
                self.cursor = EpochCursor.restore(
                    len(self.data["train"]),
                    s.seed,
                    meta.get("data_cursor"),
                    step=start,
                    steps_per_epoch=self.steps_per_epoch,
                    prompts_per_step=self.prompts_per_step,
                )
                if self.overlap is not None:
                    self.overlap.restore(meta.get("pending_rollouts"))
                if self.cursor.epoch >= s.rl.num_epochs:  # resumed after its last step
                    run.end_early(start)
                if start == 0 and s.eval.enabled and s.eval.at_start:
                    try:
                        run.log(self.evaluate(0, 0), step=0, epoch=0)
                    except EvaluationInterrupted:  # nothing trained yet: nothing to save
                        raise run.stopped_error() from None
                    run.keep_best(0)
                if "pending_metrics" in meta:  # stopped during step `start`'s evaluation
                    self.finish_pending_step(run, start, meta["pending_metrics"])
                for step in run.steps(start):
                    epoch = self.cursor.epoch + 1
                    groups, sampled, sampling_metrics = self.collect_batch(step)  # steps 1, 2
                    with run.section("trajectory"):
                        trajectory = self.make_trajectory(groups)
                    with run.section("update"):
                        update_metrics = self.policy_update(trajectory, step)
                    self.finish_rollouts()
                    rows = gather_step_rows(trajectory)  # every process's
                    metrics = step_metrics(
                        rows, update_metrics, run.timings(), startup.device_memory_bytes()
                    )
                    if self.overlap is not None:
                        metrics.update(self.overlap.metrics(step))
                        rows.weights_versions = self.overlap.last_versions
                    metrics.update(sampling_metrics)
                    # Training accuracy over every response sampled (dynamic sampling's dropped
                    # groups too: leaving out all-correct groups would bias it down).
                    correct = multihost.allgather_rows(np.asarray(_correct(sampled))).tolist()
                    metrics["train/accuracy"] = float(np.mean(correct))
                    self.epoch_correct.extend(correct)
                    if s.logging.save_rollouts and multihost.is_leader():
                        write_rollouts(self.output_dir, step, rollout_rows(rows))
                    if self.cursor.end_epoch_if_short(self.prompts_per_step):
                        metrics["train/epoch_accuracy"] = float(np.mean(self.epoch_correct))
                        self.epoch_correct = []
                        if self.cursor.epoch >= s.rl.num_epochs:
                            run.end_early(step)  # a no-op unless dynamic sampling ended it early
                        if self.evaluation_due(epoch):
                            try:
                                metrics.update(self.evaluate(epoch, step))
                            except EvaluationInterrupted:
                                # The step is done but its line waits for the evaluation:
                                # both are saved, and a resume reruns the evaluation whole.
                                meta = dict(self.checkpoint_meta(), pending_metrics=metrics)
                                run.end_step(step, self.policy.state, meta)
                                raise run.stopped_error() from None
                    progress = dict(
                        acc=f"{metrics['train/accuracy']:.2f}",
                        len=f"{metrics['response_length/mean']:.0f}",
                    )
                    run.log(metrics, step=step, epoch=epoch, progress=progress)
                    run.end_step(step, self.policy.state, self.checkpoint_meta())
                run.finish(self.export_hf)
                if not run.finished:
                    raise run.stopped_error()
        finally:
            self.engine.close()
        return summarize_run(self.output_dir)

    def evaluation_due(self, epoch: int) -> bool:
        return self.settings.eval.enabled and epoch % self.settings.eval.every_epochs == 0

    def finish_pending_step(self, run: RunHarness, step: int, metrics: dict) -> None:
        """The evaluation a stop abandoned at step `step`, rerun; then the step's line."""
        epoch = self.cursor.epoch  # the cursor moved on to the next epoch (0-based) at its end
        try:
            metrics = dict(metrics, **self.evaluate(epoch, step))
        except EvaluationInterrupted:
            raise run.stopped_error() from None
        run.log(metrics, step=step, epoch=epoch)
        run.keep_best(step)


def build_trainer(settings: Settings) -> Trainer:
    """The RL trainer; with `sft.warmup_epochs` the policy is first warmed up by SFT (the demo),
    unless the run resumes from its saved start model. The data is read (and checked against
    the config and a resumed run's record) before any model work."""
    s = settings
    files = startup.data_files(s)
    fingerprint = check_fingerprint(s, files)
    data = startup.prepare_data(s, files)
    log.info(
        "data: %s", ", ".join(f"{split} {len(records)} records" for split, records in data.items())
    )
    startup.check_rl_data(s, data)
    if not s.sft.warmup_epochs or (s.resume and has_start_model(Path(s.output_dir).absolute())):
        return Trainer(s, data=data, fingerprint=fingerprint)
    from maye_jax.sft import warm_up

    policy, processor = warm_up(s, data)
    return Trainer(s, policy=policy, data=data, processor=processor, fingerprint=fingerprint)


def run_rl(config) -> dict:
    """The RL run of `config` (an ml_collections config or typed Settings), checked first, in
    its output folder (checked and prepared before any work); returns the summary of its
    evaluations (`metrics.summarize_run`). Raises RunStopped when a signal stopped it. The
    folder is locked from before its check (and, with overwrite, its clearing) to the end: one
    run per folder, so a second run never touches a running one's outputs."""
    settings = config if isinstance(config, Settings) else load_settings(config, kind="rl")
    startup.init_distributed(settings)  # several processes: before any folder work (barriers)
    with hold_output_folder(settings.output_dir, process_id=configured_process_id(settings)):
        prepare_run_folder(settings)
        return build_trainer(settings).run()


def _prompt(encoded: dict) -> Prompt:
    return Prompt(encoded["input_ids"], encoded["pixel_values"], encoded["image_grid_thw"])


def _correct(groups: PromptGroups) -> list[bool]:
    """Per response: the accuracy reward is 1 (all False without an accuracy reward)."""
    accuracy = groups.rewards.get("accuracy")
    if accuracy is None:
        return [False] * sum(len(samples) for samples in groups.completions)
    return [score >= 1.0 for score in accuracy]


def main(argv) -> int:
    del argv
    from absl import flags

    settings = load_settings(flags.FLAGS.config, kind="rl")
    summary = run_rl(settings)
    print_summary(summary, settings.output_dir)
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    run_cli("train", main, config_flag=True)
