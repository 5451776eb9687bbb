"""The run's rollouts on a recording engine: a weights version is loaded once (so an evaluation
right before a step does not sync twice); overlapped, which weights generate which step, syncs
only between requests, the generation ahead saved and restored with its checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from maye_jax.rollout.engine import Completion, Prompt, Sampling
from maye_jax.rollout.overlap import OverlappedRollouts
from maye_jax.rollout.rollouts import Rollouts
from tests.fake_engines import fake_draw

FAKE_LOGITS = [0.0, 1.0, 2.0, 3.0]  # of the 4 tokens the stand-in samples its last token from


class RecordingEngine:
    """A worker engine stand-in: completions name the step and the weights that made them, and
    end with a token drawn as a real engine draws it (seed, step, prompt, temperature); a sync
    or a request while one is in flight fails as the real worker's does."""

    def __init__(self):
        self.version = None
        self.log: list[tuple] = []
        self.in_flight = False

    def load_policy(self, model, version):
        assert not self.in_flight, "sync while a generation is in flight"
        assert model == f"weights v{version}"  # the trainer's weights of that version
        self.version = version
        self.log.append(("sync", version))

    def _completions(self, prompts, sampling, step, first_index=0):
        completions = []
        for index, prompt in enumerate(prompts, start=first_index):
            token, logprob = fake_draw(
                FAKE_LOGITS, sampling, step=step, prompt_index=index, sample_index=0
            )
            ids = [step, int(prompt.prompt_token_ids[0]), token]
            completions.append([Completion(ids, [-1.0, -1.0, logprob], "", "length", self.version)])
        return completions

    def generate(self, prompts, sampling, *, step, first_index=0):
        assert not self.in_flight
        self.log.append(("generate", step, self.version))
        return self._completions(prompts, sampling, step, first_index)

    def submit_generate(self, prompts, sampling, *, step):
        assert not self.in_flight
        self.in_flight = True
        self.log.append(("submit", step, self.version))
        engine, result = self, self._completions(prompts, sampling, step)

        class Pending:
            def result(self):
                engine.in_flight = False
                engine.log.append(("done", step))
                return result

        return Pending()


def prompts_of(step: int) -> list[Prompt]:
    return [Prompt(np.array([100 * step + i, 7])) for i in range(2)]


def rollouts_of(engine, kind=OverlappedRollouts):
    rollouts = kind(engine, weights=lambda: f"weights v{rollouts.version}")
    return rollouts


def run(overlap: OverlappedRollouts, steps: range, total: int) -> dict:
    """The trainer's side: collect, 'update' (weights version = step), wait when it ends."""
    seen = {}
    for step in steps:
        completions = overlap.generate(
            step,
            prompts_of(step),
            Sampling(),
            ahead=lambda: (prompts_of(step + 1), Sampling()) if step < total else None,  # noqa: B023
        )
        seen[step] = [c.weights_version for row in completions for c in row]
        assert [row[0].token_ids[0] for row in completions] == [step, step]
        overlap.weights_changed(step)  # the update of `step`
        overlap.wait()
    return seen


def test_a_version_is_loaded_once_and_every_sync_is_timed():
    engine = RecordingEngine()
    rollouts = rollouts_of(engine, Rollouts)
    timed = []

    class Section:
        def __enter__(self):
            timed.append(rollouts.engine_version)

        def __exit__(self, *exc_info):
            return False

    rollouts.sync_section = Section
    rollouts.sync()  # an evaluation of the start weights
    rollouts.generate(1, prompts_of(1), Sampling())  # step 1 right after it: no second sync
    rollouts.weights_changed(1)
    rollouts.generate(2, prompts_of(2), Sampling())
    assert engine.log == [("sync", 0), ("generate", 1, 0), ("sync", 1), ("generate", 2, 1)]
    assert timed == [None, 0, 0]  # every step's sync section is entered
    assert rollouts.checkpoint_fields() == {} and rollouts.metrics(2) == {}


def test_step_n_plus_1_is_generated_with_the_weights_after_update_n_minus_1():
    engine = RecordingEngine()
    overlap = rollouts_of(engine)
    seen = run(overlap, range(1, 5), total=4)
    assert seen == {1: [0, 0], 2: [0, 0], 3: [1, 1], 4: [2, 2]}
    assert engine.log == [
        ("sync", 0),
        ("generate", 1, 0),  # step 1: synchronous, start weights
        ("submit", 2, 0),  # step 2: also the start weights (not loaded again), while update 1
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
    first = rollouts_of(RecordingEngine())
    run(first, range(1, 3), total=4)
    meta = first.checkpoint_fields()  # the checkpoint of step 2: step 3's completions, by v1
    state = meta["pending_rollouts"]
    assert state["step"] == 3
    assert [row[0]["weights_version"] for row in state["completions"]] == [1, 1]

    engine = RecordingEngine()  # a fresh worker after the restart
    resumed = rollouts_of(engine)
    resumed.weights_changed(2)  # the restored weights
    resumed.restore(meta)
    seen = run(resumed, range(3, 5), total=4)
    assert seen == {3: [1, 1], 4: [2, 2]}  # as the uninterrupted run
    assert engine.log == [("sync", 2), ("submit", 4, 2), ("done", 4)]
    assert resumed.state() is None  # nothing ahead after the last step


def test_the_step_ahead_is_sampled_with_its_own_sampling():
    """Step 2's responses, generated while step 1 updates, are drawn with the sampling `ahead`
    gives (here greedy) at step 2's seeds; step 1's with its own (temperature 1)."""
    overlap = rollouts_of(RecordingEngine())
    sampled, greedy = Sampling(temperature=1.0, seed=5), Sampling(temperature=0.0, seed=5)
    first = overlap.generate(1, prompts_of(1), sampled, ahead=lambda: (prompts_of(2), greedy))
    overlap.wait()
    overlap.weights_changed(1)
    second = overlap.generate(2, prompts_of(2), greedy)
    for step, completions, sampling in ((1, first, sampled), (2, second, greedy)):
        expected = [
            fake_draw(FAKE_LOGITS, sampling, step=step, prompt_index=i, sample_index=0)
            for i in range(2)
        ]
        assert [(row[0].token_ids[-1], row[0].logprobs[-1]) for row in completions] == expected
    assert [row[0].token_ids[-1] for row in second] == [3, 3]  # greedy: the largest logit
    # temperature 1 at these seeds drew something else than the mode at least once
    assert [row[0].token_ids[-1] for row in first] != [3, 3]


def test_responses_ahead_for_other_prompts_are_refused():
    overlap = rollouts_of(RecordingEngine())
    overlap.generate(1, prompts_of(1), Sampling(), ahead=lambda: (prompts_of(2), Sampling()))
    overlap.wait()
    overlap.weights_changed(1)
    with pytest.raises(RuntimeError, match="belong to other prompts"):
        overlap.generate(2, prompts_of(5), Sampling())


def test_needs_a_worker_engine():
    with pytest.raises(ValueError, match="worker engine"):
        OverlappedRollouts(object(), weights=lambda: None)
