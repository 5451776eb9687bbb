"""The MAYE RL loop. Each generation step is the four steps of the paper, one call each:

1. prompts     = data_flow(count)                     the next records of the epoch -> model inputs
2. completions = collect_responses(prompts, step)     the engine gets the weights, samples
3. trajectory  = make_trajectory(groups)              logprobs (policy, reference)
4. metrics     = policy_update(trajectory, step)      advantages + jitted sharded updates

Steps 1-2 and the rewards (scored right after sampling) make the step's prompt groups
(`collect_batch`; with `rl.dynamic_sampling` they repeat for top-ups, rl/dynamic_sampling.py).
The rollouts (rollout/rollouts.py) own the engine and the weights version it holds; with
`rl.async_rollouts` a worker generates step n+1 while steps 3-4 of step n run (rollout/overlap.py).
Everything around the steps (prologue, folder, resume, metrics, signals, evaluations,
checkpoints, export) is the run harness's (run/harness.py, run/startup.py); the step's report is
rl/step_rows.py's.

python -m maye_jax.train --config=configs/demo.py [--config.rl.kl_loss_coeff=0.01 ...]
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from maye_jax.config.settings import Settings, load_settings
from maye_jax.data.processor import get_prompt_template
from maye_jax.data.records import images_per_prompt
from maye_jax.evaluation.evaluate import RunEvaluation
from maye_jax.rl.advantages import compute_advantages
from maye_jax.rl.data_flow import TrainPrompts, step_sampling
from maye_jax.rl.dynamic_sampling import PromptGroups, fill_batch
from maye_jax.rl.step_rows import report_step
from maye_jax.rl.trajectory import build_trajectory, score_responses, shared_lengths
from maye_jax.rollout.engine import Prompt, Sampling
from maye_jax.rollout.factory import make_rollouts
from maye_jax.run import multihost, startup
from maye_jax.run.harness import RunHarness
from maye_jax.run.metrics import summarize_run
from maye_jax.storage.run_inputs import RunInputs
from maye_jax.storage.train_checkpoints import has_start_model
from maye_jax.training.batch import TowerImages, build_minibatches
from maye_jax.training.policy import export_policy, host_local_model, optimizer_for
from maye_jax.training.update import StepUpdates, make_train_step

log = logging.getLogger("maye_jax")


class Trainer:
    """Holds the run's state; `run()` is the loop. Built from the run's typed settings; `data`
    (its `fingerprint` and the `processor` that read it) are read here when not given
    (`startup.load_run_data`)."""

    def __init__(
        self, settings: Settings, *, policy=None, data=None, processor=None, fingerprint=None
    ):
        self.settings = s = settings
        self.output_dir = Path(s.output_dir).absolute()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if data is None:
            data, fingerprint, processor = startup.load_run_data(s, kind="rl")
        self.data, self.fingerprint = data, fingerprint
        startup.check_rl_data(s, data)
        self.prompts_per_step = s.rl.batch_size // s.rollout.num_samples
        # Without dynamic sampling every epoch has exactly steps_per_epoch steps; with it an epoch
        # can end sooner (its top-ups use up the prompts), and total_steps is an upper bound
        # (the learning-rate schedule's horizon; the cosine then stops before its end).
        self.steps_per_epoch = len(self.data["train"]) // self.prompts_per_step
        self.total_steps = self.steps_per_epoch * s.rl.num_epochs
        self.updates_per_step = (s.rl.batch_size // s.rl.ppo_batch_size) * s.rl.ppo_epochs
        startup.check_multiprocess(s, kind="rl")
        optimizer, schedule = optimizer_for(s, self.total_steps * self.updates_per_step)
        self.hf_model_dir = startup.materialize_start_model(s)  # what a worker engine loads first
        self.policy = startup.rl_policy(s, self.hf_model_dir, optimizer, warmed=policy)
        log.info(
            "RL: %d generation steps (%d epochs of %d), %d updates each; rollouts: %s engine",
            self.total_steps,
            s.rl.num_epochs,
            self.steps_per_epoch,
            self.updates_per_step,
            s.rollout.engine,
        )
        self.processor = processor or startup.load_run_processor(
            s, self.policy.source_dir, self.policy.model_config.family
        )
        instruction = get_prompt_template(s.data.prompt_template)
        self.prompts = TrainPrompts(self.data["train"], self.processor, instruction, s)
        startup.save_start_model(s, self.policy)
        self.rollouts = make_rollouts(  # rl.async_rollouts: overlapped with the update
            s,
            self.policy,
            self.processor.tokenizer,
            model_dir=self.hf_model_dir,
            images_per_prompt=images_per_prompt(self.data),
        )
        responses = self.output_dir / "eval_responses"  # with eval.save_responses
        self.evaluation = RunEvaluation(
            self.rollouts, self.processor, self.data, s, instruction, responses
        )
        self.step_fn = make_train_step(
            self.policy.model_def, optimizer, schedule, self.policy.layout, s.update_config()
        )
        self.epoch_correct: list[bool] = []  # the epoch's responses so far: accuracy 1
        self.run_harness: RunHarness | None = None

    # -- the four steps -----------------------------------------------------------------------
    def data_flow(self, count: int):
        """Step 1: the next `count` records of the epoch order (fewer if the epoch has fewer
        left; several processes: this host's share) and their model inputs (rl/data_flow.py)."""
        return self.prompts.take(count)

    def collect_responses(self, encoded, step: int, round_index: int = 0):
        """Step 2: the rollouts load the current weights (in process: no copy; torch-side
        workers: shared memory), then sample; global prompt indices, so each host's prompts draw
        their own seeds. `round_index` > 0: a dynamic-sampling top-up, with its own seed.
        Overlapped: the responses generated ahead for this step, and the next step's starts."""
        return self.rollouts.generate(
            step,
            [Prompt.of(e) for e in encoded],
            self.sampling(step, round_index),
            first_index=self.prompts.share.start if self.prompts.share else 0,
            ahead=lambda: self.ahead_of(step),
        )

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
        options = self.settings.trajectory_config()
        reference = self.policy.reference()  # None without a KL term: no forward pass
        lengths = {}
        if multihost.multiprocess():  # every process lays out its rows with the same P and R
            reference = reference and host_local_model(reference)
            options = dataclasses.replace(options, rows_multiple=1)  # the global batch is whole
            lengths = shared_lengths(groups.encoded, groups.completions)
        return build_trajectory(
            policy=self.policy.local_model(),
            reference=reference,
            config=self.policy.model_config,
            records=groups.records,
            prompts=groups.encoded,
            completions=groups.completions,
            options=options,
            pad_id=self.processor.tokenizer.pad_token_id,
            reference_shares_vision=not self.settings.model.tower_trains,
            rewards=groups.rewards,
            **lengths,
        )

    def policy_update(self, trajectory, step: int) -> dict:
        """Step 4: advantages (several processes whiten with every process's statistics; groups
        stay on one host), then (batch_size // ppo_batch_size) * ppo_epochs jitted updates over
        shuffled mini-batches; the weights are then those of version `step`."""
        s = self.settings
        batch = trajectory.batch
        advantages = np.asarray(
            compute_advantages(
                s.rl.advantage_estimator,
                scores=trajectory.scores,
                response_mask=batch.response_mask,
                logprobs=trajectory.logprobs_old,
                ref_logprobs=trajectory.ref_logprobs,
                num_samples_per_prompt=s.rollout.num_samples,
                config=s.advantage_config(),
                global_sum=multihost.global_sum if multihost.multiprocess() else None,
            )
        )
        tower = None
        if s.model.tower_trains:
            tower = TowerImages(
                trajectory.prompt_images, trajectory.row_prompt, self.policy.model_config.vision
            )
        minibatches = build_minibatches(
            batch,
            per_token=dict(
                advantages=advantages,
                logprobs_old=trajectory.logprobs_old,
                ref_logprobs=trajectory.ref_logprobs if s.rl.kl_loss_coeff != 0 else None,
                logprobs_rollout=trajectory.rollout_logprobs if s.rl.rollout_is_cap else None,
            ),
            features=trajectory.features,
            tower=tower,
            layout=self.policy.layout,
            feature_width=self.policy.model_config.image_feature_width,
            response_buckets=s.trajectory_config().response_buckets,
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
        self.rollouts.weights_changed(step)
        return updates.mean_metrics()

    # -- what the steps use ---------------------------------------------------------------------
    def sampling(self, step: int, round_index: int = 0) -> Sampling:
        return step_sampling(self.settings.rollout, self.settings.seed, step, round_index)

    def ahead_of(self, step: int) -> tuple[list[Prompt], Sampling] | None:
        """Overlapped rollouts: the prompts and sampling of step `step` + 1 (the data does not
        move), or None after the last step."""
        following = self.prompts.next_step()
        return None if following is None else (following, self.sampling(step + 1))

    def sample_groups(self, count: int, step: int, round_index: int = 0) -> PromptGroups | None:
        """Steps 1-2 and the rewards for the next `count` prompts (None when the epoch has none
        left): a step's first round, or a dynamic-sampling top-up."""
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

    # -- around the steps ---------------------------------------------------------------------
    def report(self, step: int, trajectory, sampled: PromptGroups, update_metrics, extra) -> dict:
        """The step's metrics line and rollouts file (rl/step_rows.py), once the generation
        ahead, if any, has ended."""
        run, s = self.run_harness, self.settings
        with run.section("rollout"):
            self.rollouts.wait()
        metrics, correct = report_step(
            trajectory,
            sampled.correct(),
            update_metrics,
            step=step,
            timings=run.timings(),
            extra_metrics={**self.rollouts.metrics(step), **extra},
            weights_versions=self.rollouts.weights_versions,
            output_dir=self.output_dir if s.logging.save_rollouts else None,
        )
        self.epoch_correct.extend(correct)
        return metrics

    def end_of_epoch(self, step: int, epoch: int, metrics: dict) -> Callable[[], dict] | None:
        """After step `step`: at the end of its epoch, train/epoch_accuracy, the run's end when
        the data ran out (dynamic sampling), and the epoch's evaluation when one is due (for the
        harness to run: `end_step_with_evaluation`)."""
        s = self.settings
        if not self.prompts.end_epoch_if_short():
            return None
        metrics["train/epoch_accuracy"] = float(np.mean(self.epoch_correct))
        self.epoch_correct = []
        if self.prompts.epoch >= s.rl.num_epochs:
            self.run_harness.end_early(step)  # a no-op unless dynamic sampling ended it early
        if not (s.eval.enabled and epoch % s.eval.every_epochs == 0):
            return None
        return lambda: self.evaluate(epoch, step)

    def evaluate(self, epoch: int, step: int) -> dict:
        """The scheme's evaluation of the current weights (a stop request abandons it)."""
        stop = self.run_harness.should_stop if self.run_harness else None
        return self.evaluation(step=step, name=f"epoch_{epoch}", should_stop=stop)

    def checkpoint_meta(self) -> dict:
        return dict(
            seed=self.settings.seed,
            weights_version=self.rollouts.version,
            epoch_correct=[bool(x) for x in self.epoch_correct],  # a resume mid-epoch needs it
            data_cursor=self.prompts.state(),  # dynamic sampling: not a function of the step
            # overlapped rollouts: the next step's finished responses (their weights are gone)
            **self.rollouts.checkpoint_fields(),
        )

    def restore(self, run: RunHarness) -> tuple[int, dict]:
        """(start step, checkpoint meta): a resumed run's newest checkpoint, else step 0."""
        s = self.settings
        start, self.policy.state, meta = run.restore(self.policy.state, self.policy.layout.state)
        self.epoch_correct = [bool(x) for x in meta.get("epoch_correct", [])]
        self.rollouts.weights_changed(start)
        self.rollouts.restore(meta)
        self.prompts.restore(
            meta.get("data_cursor"), step=start, steps_per_epoch=self.steps_per_epoch
        )
        if self.prompts.epoch >= s.rl.num_epochs:  # resumed after its last step
            run.end_early(start)
        return start, meta

    def export_hf(self, out_dir: Path) -> None:
        """The current weights (after step `run_harness.last_step`, the step their evaluation
        draws with) as an HF folder: the final export, the best evaluation's."""
        export_policy(
            self.policy,
            out_dir,
            progress=self.settings.logging.progress_bar,
            run_inputs=RunInputs.of_run(self.settings, eval_step=self.run_harness.last_step),
        )

    # -- the loop -----------------------------------------------------------------------------
    def run(self, *, stop_after_step: int | None = None) -> dict:
        """The run's summary (RunStopped when it stopped early); `stop_after_step`: the
        harness's test hook (a preemption after that step)."""
        s = self.settings
        self.run_harness = run = RunHarness(
            self.output_dir,
            kind="rl",
            settings=s,
            total_steps=self.total_steps,
            fingerprint=self.fingerprint,
            export=self.export_hf,
            stop_after_step=stop_after_step,
        )
        self.rollouts.sync_section = lambda: run.section("sync")
        try:
            with run:
                start, meta = self.restore(run)
                if start == 0 and s.eval.enabled and s.eval.at_start:
                    run.evaluate_start(lambda: self.evaluate(0, 0))
                # (the cursor moved on to the next epoch, 0-based, at the end of step `start`)
                epoch = self.prompts.epoch
                run.finish_interrupted_evaluation(
                    start, meta, epoch, lambda: self.evaluate(epoch, start)
                )
                for step in run.steps(start):
                    epoch = self.prompts.epoch + 1
                    groups, sampled, sampling_metrics = self.collect_batch(step)  # steps 1-2
                    with run.section("trajectory"):
                        trajectory = self.make_trajectory(groups)  # step 3
                    with run.section("update"):
                        update_metrics = self.policy_update(trajectory, step)  # step 4
                    metrics = self.report(
                        step, trajectory, sampled, update_metrics, sampling_metrics
                    )
                    evaluate = self.end_of_epoch(step, epoch, metrics)
                    run.end_step_with_evaluation(
                        step,
                        self.policy.state,
                        self.checkpoint_meta(),
                        metrics,
                        epoch=epoch,
                        evaluate=evaluate,
                        progress=_progress(metrics),
                    )
                run.finish(self.export_hf)
                if not run.finished:
                    raise run.stopped_error()
        finally:
            self.rollouts.close()
        return summarize_run(self.output_dir)


def build_trainer(settings: Settings, data, fingerprint, processor) -> Trainer:
    """The RL trainer of `data` (read by `processor`); with `sft.warmup_epochs` the policy is
    first warmed up by SFT (the demo), unless the run resumes from its saved start model."""
    s = settings
    if not s.sft.warmup_epochs or (s.resume and has_start_model(Path(s.output_dir).absolute())):
        return Trainer(s, data=data, fingerprint=fingerprint, processor=processor)
    from maye_jax.sft import warm_up

    startup.check_rl_data(s, data)  # before the warm-up's work
    policy = warm_up(s, data, processor)
    return Trainer(s, policy=policy, data=data, processor=processor, fingerprint=fingerprint)


def run_rl(config) -> dict:
    """The RL run of `config` (an ml_collections config or typed Settings), checked first, in
    its output folder (locked, checked and prepared before any work: `startup.run_prologue`);
    returns the summary of its evaluations (`metrics.summarize_run`). Raises RunStopped when a
    signal stopped it."""
    settings = config if isinstance(config, Settings) else load_settings(config, kind="rl")
    with startup.run_prologue(settings, kind="rl") as (data, fingerprint, processor):
        return build_trainer(settings, data, fingerprint, processor).run()


def _progress(metrics: dict) -> dict:
    """The progress bar's postfix of a step."""
    return dict(
        acc=f"{metrics['train/accuracy']:.2f}", len=f"{metrics['response_length/mean']:.0f}"
    )


def main(argv) -> int:
    del argv
    from absl import flags

    from maye_jax.run.summary import print_summary

    settings = load_settings(flags.FLAGS.config, kind="rl")
    run_rl(settings)
    print_summary(settings.output_dir)
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    run_cli("train", main, config_flag=True)
