"""Supervised fine-tuning on the golden `solution` (SPEC §5): the paper's SFT baseline, and the
demo's warm-up before RL.

The loss is the token-mean negative log-likelihood of the response tokens only (the solution
followed by `<|im_end|>`); prompt tokens carry no loss. It runs through the same sharded,
jitted update step as RL (policy loss "nll"), the same update batch (maye_jax/training/batch.py)
and the same run harness (checkpoints, resume, signals, metrics), with the same evaluation
after every epoch (and at epoch 0).

    python -m maye_jax.sft --config=configs/<name>.py
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import numpy as np

from maye_jax.config.settings import Settings, load_settings
from maye_jax.data.processor import get_prompt_template
from maye_jax.data.records import epoch_order
from maye_jax.data.sequences import RESPONSE_LEN_MULTIPLE, make_sequence_batch, tower_features
from maye_jax.evaluation.evaluate import RunEvaluation
from maye_jax.models.shapes import round_up
from maye_jax.qwen_ids import IM_END_ID
from maye_jax.rl.trajectory import prompt_images
from maye_jax.rollout.factory import make_rollouts
from maye_jax.run import multihost, startup
from maye_jax.run.harness import RunHarness
from maye_jax.run.metrics import summarize_run
from maye_jax.storage.run_inputs import RunInputs
from maye_jax.training.batch import TowerImages, UpdateBatch, build_minibatches
from maye_jax.training.policy import (
    Policy,
    build_policy,
    export_policy,
    optimizer_for,
    with_fresh_optimizer,
)
from maye_jax.training.update import StepUpdates, make_train_step

log = logging.getLogger("maye_jax")


def sft_targets(tokenizer, records) -> list[list[int]]:
    """Response ids of each record: its solution, tokenized alone, then <|im_end|>."""
    return [
        tokenizer(r.solution, add_special_tokens=False)["input_ids"] + [IM_END_ID] for r in records
    ]


class SFTRunner:
    """Trains `policy` (training.policy.Policy) on the solutions of the training records for
    `num_epochs`, with a fresh optimizer of its own learning-rate schedule; `evaluate`: with an
    in-process sampler for the evaluations."""

    def __init__(
        self, settings: Settings, policy, processor, data, *, num_epochs: int, evaluate=False
    ):
        s = settings
        startup.check_multiprocess(s, kind="sft")
        self.settings, self.processor, self.data = s, processor, data
        self.num_epochs = num_epochs
        self.batch_size = s.sft.batch_size
        self.steps_per_epoch = max(1, len(data["train"]) // self.batch_size)
        self.total_steps = self.steps_per_epoch * num_epochs
        optimizer, schedule = optimizer_for(
            s,
            self.total_steps,
            learning_rate=s.sft.learning_rate,
            warmup_fraction=s.sft.warmup_fraction,
        )
        # SFT needs no reference model.
        self.policy = with_fresh_optimizer(s, policy, optimizer, with_reference=False)
        self.step_fn = make_train_step(
            self.policy.model_def,
            optimizer,
            schedule,
            self.policy.layout,
            s.sft_update_config(),
        )
        self.instruction = get_prompt_template(s.data.prompt_template)
        self.evaluation = None
        if evaluate:
            rollouts = make_rollouts(s, self.policy, processor.tokenizer, engine="jax")
            self.evaluation = RunEvaluation(rollouts, processor, data, s, self.instruction)
        # One response length for every batch (the longest target), so the step compiles once.
        longest = max(len(t) for t in sft_targets(processor.tokenizer, data["train"]))
        self.response_len = round_up(longest, RESPONSE_LEN_MULTIPLE)

    def minibatch(self, records, num_micro: int) -> UpdateBatch:
        """The step's mini-batch for `records`: their prompts with the solutions as responses,
        in `num_micro` micro-batches. Several processes: each builds the rows of its share of
        `records` (in a layout they agree on) and the mini-batch is global."""
        tokenizer = self.processor.tokenizer
        processes = multihost.process_count()
        rows = self.batch_size // processes
        if processes > 1:
            records = records[multihost.process_index() * rows :][:rows]
        encoded = [self.processor.encode_record(r, self.instruction) for r in records]
        min_prompt_len = 1
        if processes > 1:
            longest = max((len(np.asarray(e["input_ids"]).reshape(-1)) for e in encoded), default=1)
            min_prompt_len = int(multihost.allgather_rows(np.asarray([longest])).max())
        batch = make_sequence_batch(
            encoded,
            sft_targets(tokenizer, records),
            self.policy.model_config,
            pad_id=tokenizer.pad_token_id,
            batch_size=rows,
            prompt_multiple=self.settings.data.prompt_multiple,
            response_len=self.response_len,
            min_prompt_len=min_prompt_len,
        )
        zeros = np.zeros(batch.response_mask.shape, np.float32)
        features, tower = None, None
        if self.settings.model.tower_trains:  # with or without images: one program everywhere
            row_prompt = np.full(rows, -1, np.int32)  # one row per record
            row_prompt[: len(records)] = np.arange(len(records))
            tower = TowerImages(
                [prompt_images(e) for e in encoded], row_prompt, self.policy.model_config.vision
            )
        elif batch.vision is not None:
            model = self.policy.local_model()
            features = tower_features(model, batch.device_arrays()["vision"])
        minibatches = build_minibatches(
            batch,
            per_token=dict(advantages=zeros, logprobs_old=zeros),
            features=features,
            tower=tower,
            layout=self.policy.layout,
            feature_width=self.policy.model_config.image_feature_width,
        )
        return minibatches(None, num_micro)

    def train_step(self, step: int) -> dict:
        """SFT step `step` (1-based): its batch (order fixed by seed and epoch), one update."""
        s = self.settings
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        train = self.data["train"]
        order = epoch_order(len(train), s.seed + 1000, epoch + 1)
        records = [train[i] for i in order[index * self.batch_size : (index + 1) * self.batch_size]]
        minibatch = self.minibatch(records, s.sft.batch_size // s.sft.micro_batch_size)
        self.policy.state, metrics, finite = self.step_fn(
            self.policy.state, self.policy.frozen, minibatch
        )
        updates = StepUpdates(f"SFT {step}")
        updates.add(metrics, finite)
        return {
            f"sft/{k.replace('loss/policy', 'loss')}": v
            for k, v in updates.mean_metrics().items()
            if k in ("loss/policy", "grad_norm", "lr")
        }

    def evaluate(self, epoch: int, step: int, should_stop=None) -> dict:
        """The scheme's evaluation of the weights after step `step` (its draws seeded by the
        epoch); nothing without `evaluate`."""
        if self.evaluation is None:
            return {}
        self.evaluation.rollouts.weights_changed(step)
        return self.evaluation(step=epoch, should_stop=should_stop)

    def run(
        self, run: RunHarness, *, evaluate_at_start: bool, evaluate_every_epoch: bool
    ) -> Policy:
        """Trains under `run` (a harness whose `total_steps` is this runner's); a resumed run
        continues after its latest checkpoint. The batch order derives from (seed, epoch), so a
        resumed run sees the same batches. Evaluations follow the harness's protocol (a stop
        request abandons one; a resume reruns it whole). Raises RunStopped when a signal
        stopped the run before its last step."""
        start, self.policy.state, meta = run.restore(self.policy.state, self.policy.layout.state)
        meta_of_step = dict(seed=self.settings.seed, kind="sft")
        if start == 0 and evaluate_at_start:
            run.evaluate_start(lambda: self.evaluate(0, 0, run.should_stop))
        epoch = (start - 1) // self.steps_per_epoch + 1  # of the restored step
        run.finish_interrupted_evaluation(
            start, meta, epoch, lambda: self.evaluate(epoch, start, run.should_stop)
        )
        losses = []
        for step in run.steps(start):
            epoch = (step - 1) // self.steps_per_epoch + 1
            with run.section("update"):
                metrics = self.train_step(step)
            metrics.update(run.timings())
            losses.append(metrics["sft/loss"])
            evaluate = None
            if step % self.steps_per_epoch == 0:  # the end of an epoch
                log.info("SFT epoch %d: mean loss %.4f", epoch, float(np.mean(losses)))
                losses = []
                if evaluate_every_epoch:
                    evaluate = functools.partial(self.evaluate, epoch, step, run.should_stop)
            run.end_step_with_evaluation(
                step, self.policy.state, meta_of_step, metrics, epoch=epoch, evaluate=evaluate
            )
        if not run.finished:
            raise run.stopped_error()
        return self.policy


def start_for_sft(settings: Settings, data=None, processor=None):
    """(data, policy without reference, processor) of a run that begins with SFT: the SFT
    baseline, or the RL demo's warm-up; `data` and the `processor` that read it are read here
    when not given. The optimizer is rebuilt by the SFT runner."""
    if data is None:
        data, _, processor = startup.load_run_data(settings, kind="sft")
    mesh = startup.build_mesh(settings)
    source = startup.materialize_start_model(settings)
    optimizer, _ = optimizer_for(settings, 1)
    policy = build_policy(settings, mesh, source, optimizer, with_reference=False)
    if processor is None:
        processor = startup.load_run_processor(settings, source, policy.model_config.family)
    return data, policy, processor


def warm_up(settings: Settings, data, processor):
    """The SFT warm-up before RL (`sft.warmup_epochs`) on `data` (read by `processor`): the
    warmed policy.

    It teaches a (possibly random) model the answer format, so it trains the whole LLM,
    embeddings included, whatever RL freezes. Its metrics and checkpoints go to
    OUTPUT_DIR/sft_warmup; a stop (signal) checkpoints it and raises RunStopped, and a resumed
    run continues it."""
    s = settings
    warm = dataclasses.replace(s, model=dataclasses.replace(s.model, train_embeddings=True))
    _, policy, processor = start_for_sft(warm, data, processor)
    runner = SFTRunner(warm, policy, processor, data, num_epochs=s.sft.warmup_epochs)
    folder = Path(s.output_dir).absolute() / "sft_warmup"
    log.info(
        "SFT warm-up: %d epochs of %d steps (metrics and checkpoints in %s)",
        s.sft.warmup_epochs,
        runner.steps_per_epoch,
        folder,
    )
    harness = RunHarness(
        folder, kind="sft_warmup", settings=warm, total_steps=runner.total_steps, describe=False
    )
    started = time.perf_counter()
    with harness as run:
        policy = runner.run(run, evaluate_at_start=False, evaluate_every_epoch=False)
    log.info("SFT warm-up: %d epochs in %.0f s", s.sft.warmup_epochs, time.perf_counter() - started)
    return policy


def run_sft(config) -> dict:
    """The SFT baseline run of `config` (an ml_collections config or typed Settings), in its
    output folder (locked, checked and prepared before any work: `startup.run_prologue`):
    evaluated at epoch 0 and after every epoch like RL, checkpointed by the run harness
    (`resume` continues from the latest), the final policy exported to HF. Returns the summary
    of its evaluations (metrics.summarize_run); raises RunStopped when a signal stopped it."""
    s = config if isinstance(config, Settings) else load_settings(config, kind="sft")
    with startup.run_prologue(s, kind="sft") as (data, fingerprint, processor):
        _, policy, processor = start_for_sft(s, data, processor)
        runner = SFTRunner(
            s, policy, processor, data, num_epochs=s.sft_epochs, evaluate=s.eval.enabled
        )

        def export(out_dir: Path) -> None:
            """The runner's current weights as an HF folder (the final and the best's); their
            evaluation draws with the epoch of the harness's last step."""
            epoch = -(-harness.last_step // runner.steps_per_epoch)
            export_policy(
                runner.policy,
                out_dir,
                progress=s.logging.progress_bar,
                run_inputs=RunInputs.of_run(s, eval_step=epoch),
            )

        harness = RunHarness(
            s.output_dir,
            kind="sft",
            settings=s,
            total_steps=runner.total_steps,
            fingerprint=fingerprint,
            export=export,
        )
        with harness as run:
            runner.run(
                run,
                evaluate_at_start=s.eval.enabled and s.eval.at_start,
                evaluate_every_epoch=s.eval.enabled,
            )
            run.finish(export)
        return summarize_run(s.output_dir)


def main(argv) -> int:
    del argv
    from absl import flags

    from maye_jax.run.summary import print_summary

    settings = load_settings(flags.FLAGS.config, kind="sft")
    run_sft(settings)
    print_summary(settings.output_dir)
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    run_cli("sft", main, config_flag=True)
