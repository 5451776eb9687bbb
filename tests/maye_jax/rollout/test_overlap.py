"""Overlapped rollouts' schedule on a recording engine: which weights generate which step, syncs
only between requests, the generation ahead saved and restored with its checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from maye_jax.rollout.engine import Completion, Prompt, Sampling
from maye_jax.rollout.overlap import OverlappedRollouts


class RecordingEngine:
    """A worker engine stand-in: completions name the step and the weights that made them; a
    sync or a request while one is in flight fails as the real worker's does."""

    def __init__(self):
        self.version = None
        self.log: list[tuple] = []
        self.in_flight = False

    def load_policy(self, model, version):
        assert not self.in_flight, "sync while a generation is in flight"
        if version != self.version:
            self.version = version
            self.log.append(("sync", version))

    def _completions(self, prompts, step):
        return [
            [
                Completion(
                    [step, int(p.prompt_token_ids[0])], [-1.0, -1.0], "", "length", self.version
                )
            ]
            for p in prompts
        ]

    def generate(self, prompts, sampling, *, step):
        assert not self.in_flight
        self.log.append(("generate", step, self.version))
        return self._completions(prompts, step)

    def submit_generate(self, prompts, sampling, *, step):
        assert not self.in_flight
        self.in_flight = True
        self.log.append(("submit", step, self.version))
        engine, result = self, self._completions(prompts, step)

        class Pending:
            def result(self):
                engine.in_flight = False
                engine.log.append(("done", step))
                return result

        return Pending()


def prompts_of(step: int) -> list[Prompt]:
    return [Prompt(np.array([100 * step + i, 7])) for i in range(2)]


def run(overlap: OverlappedRollouts, steps: range, total: int, weights: dict) -> dict:
    """The trainer's side: collect, 'update' (weights version = step), wait when it ends."""
    seen = {}
    for step in steps:
        completions = overlap.collect(
            step,
            prompts_of(step),
            Sampling(),
            model=None,
            version=weights["version"],
            next_prompts=prompts_of(step + 1) if step < total else None,
        )
        seen[step] = [c.weights_version for row in completions for c in row]
        assert [row[0].token_ids[0] for row in completions] == [step, step]
        weights["version"] = step  # the update of `step`
        overlap.wait()
    return seen


def test_step_n_plus_1_is_generated_with_the_weights_after_update_n_minus_1():
    engine = RecordingEngine()
    overlap = OverlappedRollouts(engine)
    seen = run(overlap, range(1, 5), total=4, weights={"version": 0})
    assert seen == {1: [0, 0], 2: [0, 0], 3: [1, 1], 4: [2, 2]}
    assert engine.log == [
        ("sync", 0),
        ("generate", 1, 0),  # step 1: synchronous, start weights
        ("submit", 2, 0),  # step 2: also the start weights, while update 1 runs
        ("done", 2),
        ("sync", 1),  # after update 1 ended and the request finished
        ("submit", 3, 1),
        ("done", 3),
        ("sync", 2),
        ("submit", 4, 2),
        ("done", 4),
    ]
    assert overlap.metrics(4) == {"rollout/weights_lag": 1.0}


def test_checkpoint_holds_the_next_steps_finished_completions_and_resume_uses_them():
    weights = {"version": 0}
    first = OverlappedRollouts(RecordingEngine())
    run(first, range(1, 3), total=4, weights=weights)
    state = first.state()  # the checkpoint of step 2: step 3's completions, made by v1
    assert state["step"] == 3
    assert [row[0]["weights_version"] for row in state["completions"]] == [1, 1]

    engine = RecordingEngine()  # a fresh worker after the restart
    resumed = OverlappedRollouts(engine)
    resumed.restore(state)
    seen = run(resumed, range(3, 5), total=4, weights=weights)
    assert seen == {3: [1, 1], 4: [2, 2]}  # as the uninterrupted run
    assert engine.log == [("sync", 2), ("submit", 4, 2), ("done", 4)]
    assert resumed.state() is None  # nothing ahead after the last step


def test_responses_ahead_for_other_prompts_are_refused():
    overlap = OverlappedRollouts(RecordingEngine())
    overlap.collect(1, prompts_of(1), Sampling(), model=None, version=0, next_prompts=prompts_of(2))
    overlap.wait()
    with pytest.raises(RuntimeError, match="belong to other prompts"):
        overlap.collect(2, prompts_of(5), Sampling(), model=None, version=1, next_prompts=None)


def test_needs_a_worker_engine():
    with pytest.raises(ValueError, match="worker engine"):
        OverlappedRollouts(object())
