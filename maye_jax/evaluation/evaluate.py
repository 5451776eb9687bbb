"""The MAYE evaluation scheme (SPEC §6): accuracy under three generation settings.

    pass@8_t1.0   8 samples, temperature 1.0, top_p 1.0; a prompt counts if any is correct
    pass@1_t0.6   1 sample,  temperature 0.6, top_p 1.0
    pass@1_t0.01  1 sample,  temperature 0.01, top_p 0.001

RL and SFT evaluate their current weights with `RunEvaluation` after every epoch and at epoch 0;
the CLI evaluates any checkpoint or HF model offline with the same code (`evaluate_split`):

    python -m maye_jax.evaluate --model=DIR --data=FILE.jsonl [--engine=jax|hf|vllm]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maye_jax.data.records import Record
from maye_jax.errors import EvaluationInterrupted, UserError
from maye_jax.qwen_ids import STOP_TOKEN_IDS
from maye_jax.rollout.engine import Prompt, Sampling
from maye_jax.storage.atomic import atomic_write_text

SETTINGS: dict[str, dict] = {
    "pass@8_t1.0": dict(n=8, temperature=1.0, top_p=1.0),
    "pass@1_t0.6": dict(n=1, temperature=0.6, top_p=1.0),
    "pass@1_t0.01": dict(n=1, temperature=0.01, top_p=0.001),
}


def sampling_for(setting: str, *, max_tokens: int, seed: int, stop_token_ids) -> Sampling:
    if setting not in SETTINGS:
        raise ValueError(f"unknown evaluation setting {setting!r}; known: {sorted(SETTINGS)}")
    return Sampling(
        max_tokens=max_tokens, seed=seed, stop_token_ids=tuple(stop_token_ids), **SETTINGS[setting]
    )


def encode_prompts(
    processor, records: Sequence[Record], instruction: str
) -> tuple[list[dict], list[Prompt]]:
    encoded = [processor.encode_record(r, instruction) for r in records]
    prompts = [Prompt.of(e) for e in encoded]
    return encoded, prompts


def evaluate_split(
    engine,
    processor,
    records: Sequence[Record],
    *,
    split: str,
    settings: Sequence[str],
    max_tokens: int,
    seed: int,
    step: int,
    instruction: str,
    batch_size: int = 64,
    stop_token_ids=STOP_TOKEN_IDS,
    reward_timeout_s: float = 5.0,
    reward_workers: int | None = None,
    should_stop=None,
    progress: bool = True,
    first_index: int = 0,
    combine=None,
    num_batches: int | None = None,
):
    """Returns ({f"eval/{split}/{setting}": accuracy}, [response rows]) for one split.
    `records[i]` samples with the seeds of global prompt index `first_index + i`, so the results
    do not depend on `batch_size` or on how records are shared between hosts; `combine`
    (several processes: `multihost.allgather_objects`) turns this process's per-setting
    correctness and rows into every process's, in order, before the accuracies are taken;
    `num_batches` (several processes: the largest share's) keeps every process's loop, and so
    its `should_stop` calls, in step.
    `should_stop()` is asked before every batch: True abandons the evaluation
    (EvaluationInterrupted), so a stop request is honoured within one batch's time.

    `progress`: one progress bar (stderr, with ETA) over every sample of every setting of
    the split, so pass@8's eight samples per prompt weigh eight times pass@1's one."""
    from tqdm import tqdm

    from maye_jax.evaluation.scheme import pass_at_k

    samplings = {
        setting: sampling_for(
            setting, max_tokens=max_tokens, seed=seed, stop_token_ids=stop_token_ids
        )
        for setting in settings
    }
    correct_by_setting, rows = {}, []
    num_batches = -(-len(records) // batch_size) if num_batches is None else num_batches
    total_samples = len(records) * sum(sampling.n for sampling in samplings.values())
    bar = tqdm(
        total=total_samples,
        desc=f"eval {split}",
        unit="sample",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        for setting, sampling in samplings.items():
            bar.set_postfix_str(setting)
            correct_matrix = []  # per prompt: one flag per sample
            for start in range(0, num_batches * batch_size, batch_size):
                if should_stop is not None and should_stop():
                    raise EvaluationInterrupted(
                        f"evaluation of {split} abandoned at a stop request"
                    )
                chunk = records[start : start + batch_size]
                if not chunk:  # this process's share ended before another's
                    continue
                # A distinct step per (split, setting) keeps the evaluation draws independent
                # of the training draws of the same generation step.
                chunk_correct, chunk_rows = _generate_and_score(
                    engine,
                    processor,
                    chunk,
                    sampling,
                    instruction=instruction,
                    step=_eval_step(step, split, setting),
                    reward_timeout_s=reward_timeout_s,
                    reward_workers=reward_workers,
                    first_index=first_index + start,
                )
                correct_matrix += chunk_correct
                rows += [dict(split=split, setting=setting, **row) for row in chunk_rows]
                bar.update(len(chunk) * sampling.n)
            correct_by_setting[setting] = correct_matrix
    if combine is not None:  # every process's results, in process (= record) order
        parts = combine((correct_by_setting, rows))
        correct_by_setting = {s: [c for part, _ in parts for c in part[s]] for s in samplings}
        rows = [row for _, part_rows in parts for row in part_rows]
    metrics = {f"eval/{split}/{s}": pass_at_k(correct_by_setting[s]) for s in samplings}
    return metrics, rows


def _generate_and_score(
    engine,
    processor,
    records,
    sampling,
    *,
    instruction,
    step,
    reward_timeout_s,
    reward_workers,
    first_index,
) -> tuple[list[list[bool]], list[dict]]:
    """(per record: correct flag of each sample, one row per sample) of one generate call."""
    from maye_jax.rl.rewards import accuracy_rewards

    _, prompts = encode_prompts(processor, records, instruction)
    completions = engine.generate(prompts, sampling, step=step, first_index=first_index)
    texts = [c.text for samples in completions for c in samples]
    solutions = [r.reward_solution for r, samples in zip(records, completions) for _ in samples]
    answers = [r.answer for r, samples in zip(records, completions) for _ in samples]
    scores = accuracy_rewards(
        texts, solutions, answers, timeout_s=reward_timeout_s, num_workers=reward_workers
    )
    correct, rows, offset = [], [], 0
    for record, samples in zip(records, completions):
        flags_ = [score >= 1.0 for score in scores[offset : offset + len(samples)]]
        correct.append(flags_)
        for completion, ok in zip(samples, flags_):
            rows.append(
                dict(
                    id=record.id,
                    response=completion.text,
                    correct=bool(ok),
                    finish_reason=completion.finish_reason,
                )
            )
        offset += len(samples)
    return correct, rows


def evaluate_configured_splits(
    engine,
    processor,
    data,
    settings,
    *,
    step: int,
    instruction: str,
    responses_path=None,
    should_stop=None,
) -> dict:
    """Every split of `settings.eval.splits` present in `data` (RL and SFT share this); with
    `responses_path(split)` given and `eval.save_responses` on, writes each split's responses.
    The engine must hold the weights to evaluate (`engine.load_policy`); a progress bar per
    split unless `logging.progress_bar` is off."""
    from maye_jax.run import multihost

    e = settings.eval
    metrics = {}
    for split in e.splits:
        if split not in data:  # never drop an asked-for evaluation silently
            raise UserError(f"config.eval.splits: {split}: the run has no {split} data")
        # Several processes: each evaluates its contiguous share of the records on its own
        # engine, and the results are gathered (as strings and flags, not arrays).
        records = data[split]
        per_process = -(-len(records) // multihost.process_count())
        first = min(multihost.process_index() * per_process, len(records))
        split_metrics, rows = evaluate_split(
            engine,
            processor,
            records[first : first + per_process],
            split=split,
            settings=list(e.settings),
            max_tokens=e.max_tokens,
            seed=settings.seed,
            step=step,
            instruction=instruction,
            batch_size=e.batch_size,
            reward_timeout_s=settings.rewards.timeout_s,
            reward_workers=settings.rewards.num_workers,
            should_stop=should_stop,
            progress=settings.logging.progress_bar,
            first_index=first,
            combine=multihost.allgather_objects if multihost.multiprocess() else None,
            num_batches=-(-per_process // e.batch_size),
        )
        metrics.update(split_metrics)
        if responses_path is not None and e.save_responses and multihost.is_leader():
            path = Path(responses_path(split))
            path.parent.mkdir(parents=True, exist_ok=True)
            # whole or absent: a kill while writing leaves the previous file, never half of it
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return metrics


@dataclasses.dataclass
class RunEvaluation:
    """The scheme's evaluation of a run's current weights, RL's and SFT's alike:

        evaluation = RunEvaluation(rollouts, processor, data, settings, instruction=...)
        metrics = evaluation(step=..., name="epoch_3", should_stop=run.should_stop)

    `rollouts` (rollout/rollouts.py) get the current weights first (after any generation in
    flight); then every split of `eval.splits` (`evaluate_configured_splits`). `step` seeds the
    draws; with `responses_dir` and `eval.save_responses`, each split's responses go to
    `<responses_dir>/<name>_<split>.jsonl`."""

    rollouts: Any
    processor: Any
    data: Mapping[str, Sequence[Record]]
    settings: Any
    instruction: str
    responses_dir: Path | None = None

    def __call__(self, *, step: int, name: str = "", should_stop=None) -> dict:
        self.rollouts.sync()
        folder = self.responses_dir
        return evaluate_configured_splits(
            self.rollouts.engine,
            self.processor,
            self.data,
            self.settings,
            step=step,
            instruction=self.instruction,
            responses_path=None
            if folder is None
            else lambda split: folder / f"{name}_{split}.jsonl",
            should_stop=should_stop,
        )


def _eval_step(step: int, split: str, setting: str) -> int:
    import zlib

    return 1_000_000 + step * 1000 + zlib.crc32(f"{split}/{setting}".encode()) % 997
