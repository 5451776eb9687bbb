"""Supervised fine-tuning on the golden `solution` (SPEC §5): the paper's SFT baseline, and the
demo's warm-up before RL.

The loss is the token-mean negative log-likelihood of the response tokens only (the solution
followed by `<|im_end|>`); prompt tokens carry no loss. It runs through the same sharded,
jitted update step as RL (policy loss "nll"), with the same checkpoints, the same evaluation
after every epoch (and at epoch 0) and the same metrics file format.

    python -m maye_jax.sft --config=configs/<name>.py
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from maye_jax import runtime
from maye_jax.data import epoch_order
from maye_jax.evaluate import evaluate_configured_splits
from maye_jax.losses import LossConfig
from maye_jax.metrics import MetricsWriter, summarize_run, truncate_metrics, write_run_json
from maye_jax.processor import get_prompt_template
from maye_jax.rollout.factory import make_engine
from maye_jax.sequences import RESPONSE_LEN_MULTIPLE, make_sequence_batch
from maye_jax.tokenizer import IM_END_ID
from maye_jax.train_checkpoint import TrainCheckpointer
from maye_jax.trajectory import _features, prompt_images
from maye_jax.update import (
    UpdateConfig,
    check_finite,
    make_minibatch,
    make_tower_minibatch,
    make_train_step,
    per_row_image_features,
)
from models.vision_inputs import bucket

log = logging.getLogger("maye_jax")


def sft_targets(tokenizer, records) -> list[list[int]]:
    """Response ids of each record: its solution, tokenized alone, then <|im_end|>."""
    return [
        tokenizer(r.solution, add_special_tokens=False)["input_ids"] + [IM_END_ID] for r in records
    ]


class SFTRunner:
    """Trains `policy` (runtime.Policy) on the solutions of `records` for `num_epochs`."""

    def __init__(
        self,
        config,
        policy,
        processor,
        data,
        *,
        num_epochs: int,
        writer: MetricsWriter | None,
        eval_engine=None,
        checkpointer: TrainCheckpointer | None = None,
    ):
        c = config
        # A training tower runs inside the step on each micro-batch's own images.
        self.tower_trains = bool(c.model.train_vit or c.model.train_connector)
        self.config, self.policy, self.processor, self.data = c, policy, processor, data
        self.num_epochs = num_epochs
        self.batch_size = c.sft.batch_size
        self.steps_per_epoch = max(1, len(data["train"]) // self.batch_size)
        total_updates = self.steps_per_epoch * num_epochs
        self.optimizer, self.schedule = runtime.optimizer_for(
            c,
            total_updates,
            learning_rate=c.sft.learning_rate,
            warmup_fraction=c.sft.warmup_fraction,
        )
        self.policy = runtime.with_fresh_optimizer(c, policy, self.optimizer)
        self.policy.ref_params = None  # SFT needs no reference model
        self.update_config = UpdateConfig(
            loss=LossConfig(policy_loss="nll", kl_loss_coeff=0.0, loss_agg="token_mean"),
            temperature=1.0,
            logprob_chunk_size=c.rl.logprob_chunk_size,
        )
        self.step_fn = make_train_step(
            self.policy.model_def,
            self.optimizer,
            self.schedule,
            self.policy.layout,
            self.update_config,
        )
        self.writer = writer
        self.instruction = get_prompt_template(c.data.prompt_template)
        self.eval_engine = eval_engine
        self.checkpointer = checkpointer  # None: no train checkpoints (e.g. the RL warm-up)
        self.stop_requested = False  # set by a signal handler: checkpoint and stop
        self.stop_after_step: int | None = None  # tests: simulate a preemption after this step
        # One response length for every batch (the longest target), so the step compiles once.
        longest = max(len(t) for t in sft_targets(processor.tokenizer, data["train"]))
        self.response_len = -(-longest // RESPONSE_LEN_MULTIPLE) * RESPONSE_LEN_MULTIPLE

    def minibatch(self, records, num_micro: int) -> dict:
        """The step's mini-batch for `records`: their prompts with the solutions as responses,
        in `num_micro` micro-batches."""
        tokenizer = self.processor.tokenizer
        encoded = [
            self.processor.encode(r.load_image(), r.question, self.instruction) for r in records
        ]
        batch = make_sequence_batch(
            encoded,
            sft_targets(tokenizer, records),
            self.policy.model_config,
            pad_id=tokenizer.pad_token_id,
            batch_size=self.batch_size,
            prompt_multiple=64,
            response_len=self.response_len,
        )
        zeros = np.zeros(batch.response_mask.shape, np.float32)
        rows = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            positions=batch.positions,
            response_mask=batch.response_mask,
            advantages=zeros,
            logprobs_old=zeros,
        )
        if batch.vision is None:
            return make_minibatch(rows, num_micro)
        if self.tower_trains:
            row_prompt = np.full(self.batch_size, -1, np.int32)  # one row per record
            row_prompt[: len(records)] = np.arange(len(records))
            return make_tower_minibatch(
                dict(rows, image_feature_index=batch.image_feature_index),
                num_micro,
                prompt_images=[prompt_images(e) for e in encoded],
                row_prompt=row_prompt,
                vision_config=self.policy.model_config.vision,
            )
        features = _features(self.policy.model(), jax.tree.map(jnp.asarray, batch.vision))
        per_row = int((batch.image_feature_index >= 0).sum(axis=1).max())
        rows["image_features"], rows["image_feature_index"] = per_row_image_features(
            features, batch.image_feature_index, features_per_row=bucket(per_row, 4)
        )
        return make_minibatch(rows, num_micro)

    def evaluate(self, epoch: int) -> dict:
        if self.eval_engine is None:
            return {}
        self.eval_engine.set_model(self.policy.model())
        return evaluate_configured_splits(
            self.eval_engine,
            self.processor,
            self.data,
            self.config,
            step=epoch,
            instruction=self.instruction,
        )

    def save_checkpoint(self, step: int) -> None:
        meta = dict(generation_step=step, seed=self.config.seed, kind="sft")
        self.checkpointer.save(step, self.policy.state, meta)

    def restore_checkpoint(self) -> int:
        """The SFT step of the latest checkpoint (0: none); the state is restored in place."""
        restored = self.checkpointer.restore_latest(self.policy.state, self.policy.layout.state)
        if restored is None:
            return 0
        self.policy.state, meta = restored
        log.info("SFT resumed from step %d", meta["generation_step"])
        return int(meta["generation_step"])

    def run(
        self, *, evaluate_at_start: bool, evaluate_every_epoch: bool, resume: bool = False
    ) -> runtime.Policy:
        """Trains; with `resume` (and a checkpointer) continues after its latest checkpoint.
        The batch order derives from (seed, epoch), so a resumed run sees the same batches."""
        c = self.config
        num_micro = c.sft.batch_size // c.sft.micro_batch_size
        total_steps = self.steps_per_epoch * self.num_epochs
        start = self.restore_checkpoint() if resume and self.checkpointer is not None else 0
        if start == 0 and evaluate_at_start and self.writer is not None:
            self.writer.write(self.evaluate(0), generation_step=0, epoch=0)
        train = self.data["train"]
        losses = []
        for step in range(start + 1, total_steps + 1):
            epoch, index = divmod(step - 1, self.steps_per_epoch)
            epoch += 1
            order = epoch_order(len(train), c.seed + 1000, epoch)
            started = time.perf_counter()
            records = [
                train[i] for i in order[index * self.batch_size : (index + 1) * self.batch_size]
            ]
            minibatch = self.minibatch(records, num_micro)
            self.policy.state, metrics, finite = self.step_fn(
                self.policy.state, self.policy.frozen, minibatch
            )
            check_finite(finite, metrics, step=f"SFT {step}")
            metrics = {
                f"sft/{k.replace('loss/policy', 'loss')}": float(v)
                for k, v in jax.device_get(metrics).items()
                if k in ("loss/policy", "grad_norm", "lr")
            }
            metrics["time/update_seconds"] = time.perf_counter() - started
            losses.append(metrics["sft/loss"])
            end_of_epoch = index == self.steps_per_epoch - 1
            if end_of_epoch and evaluate_every_epoch:
                metrics.update(self.evaluate(epoch))
            if self.writer is not None:
                self.writer.write(metrics, generation_step=step, epoch=epoch)
            if end_of_epoch:
                log.info("SFT epoch %d: mean loss %.4f", epoch, float(np.mean(losses)))
                losses = []
            if self.stop_after_step == step:
                self.stop_requested = True
            if self.checkpointer is not None and (
                step % c.checkpoint.every_steps == 0 or step == total_steps or self.stop_requested
            ):
                self.save_checkpoint(step)
            if self.stop_requested:
                log.warning("SFT stopping at step %d (signal); checkpoint saved", step)
                break
        return self.policy

    def request_stop(self, signum, frame):
        del frame
        log.warning("signal %d: will checkpoint and stop after this SFT step", signum)
        self.stop_requested = True


FLAGS = flags.FLAGS


def run_sft(c) -> dict:
    """The SFT baseline run of config `c`: evaluated at epoch 0 and after every epoch like RL,
    Orbax train checkpoints every `checkpoint.every_steps` SFT steps (and at the end, and on
    SIGTERM/SIGINT), `c.resume` continues from the latest; the final policy exported to HF.
    Returns the summary of its validation accuracy (metrics.summarize_run)."""
    output_dir = Path(c.output_dir).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    data, policy, processor = runtime.start_for_sft(c)
    source = policy.source_dir
    write_run_json(
        output_dir,
        name=c.name,
        seed=c.seed,
        kind="sft",
        config=c.to_dict(),
        devices=[str(d) for d in jax.devices()],
    )
    checkpointer = TrainCheckpointer(output_dir, keep=c.checkpoint.keep)
    start = (checkpointer.latest_step() or 0) if c.resume else 0
    if start:
        truncate_metrics(output_dir, start)
    writer = MetricsWriter(
        output_dir,
        tensorboard=c.logging.tensorboard,
        wandb=c.logging.wandb,
        wandb_project=c.logging.wandb_project,
        run_name=c.name,
        config=c.to_dict(),
        append=bool(start),
    )
    engine = make_engine(
        "jax", model=policy.model(), config=policy.model_config, tokenizer=processor.tokenizer
    )
    # Preemption (SIGTERM) or Ctrl-C (SIGINT): finish the step, checkpoint, stop.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        runner = SFTRunner(
            c,
            policy,
            processor,
            data,
            num_epochs=c.sft.num_epochs,
            writer=writer,
            eval_engine=engine if c.eval.enabled else None,
            checkpointer=checkpointer,
        )
        for sig in previous:
            signal.signal(sig, runner.request_stop)
        policy = runner.run(
            evaluate_at_start=c.eval.enabled and c.eval.at_start,
            evaluate_every_epoch=c.eval.enabled,
            resume=c.resume,
        )
        if c.checkpoint.export_hf and not runner.stop_requested:
            from maye_jax.checkpoint import export_hf

            export_hf(
                policy.model(), policy.hf_config, output_dir / "final_hf", tokenizer_source=source
            )
    finally:
        writer.close()
        checkpointer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return summarize_run(output_dir)


def main(argv) -> int:
    del argv
    runtime.setup_cli_logging()
    print(json.dumps(run_sft(FLAGS.config), indent=2))
    return 0


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/*.py).", lock_config=True
    )
    app.run(lambda argv: sys.exit(main(argv)))
