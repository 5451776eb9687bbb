"""Rollouts overlapped with the update (`rl.async_rollouts`): a torch-side worker generates the
responses of generation step n+1 while the trainer computes the trajectory and update of step n.

    step 1:   generate(1, weights v0)            | then submit(2, v0)  | update 1 -> v1
    step 2:   wait for 2 (made by v0)            | sync v1, submit(3)  | update 2 -> v2
    step n:   wait for n (made by v(n-2))        | sync v(n-1), submit(n+1) | update n -> vn

So from step 3 on a step learns from responses one update stale (one step off-policy, as the
leading asynchronous RL systems run): the trainer recomputes `logprobs_old` under the weights it
is about to update (the proximal policy), the worker's own logprobs are the behaviour policy, and
the truncated importance weight between the two (`rl.rollout_is_cap`, required) corrects the
staleness; `mismatch/*` shows its size. The worker answers one request at a time, so a sync only
happens between requests, when an update has ended; every completion records the weights
version that produced it.

It is the run's `Rollouts` (rollout/rollouts.py: the one record of the weights version the
worker holds), generating ahead. The trainer waits for the in-flight request when its update
ends (`wait`), before it evaluates or checkpoints: the checkpoint of step n holds the finished
completions of step n+1 (`state`), which weights that no longer exist made, and a resumed run
uses them (`restore`), so resuming stays exact.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from maye_jax.rollout.engine import Completion, Prompt, Sampling
from maye_jax.rollout.rollouts import Ahead, Rollouts


def prompts_checksum(prompts: Sequence[Prompt]) -> str:
    """CRC32 of the prompts' token ids: pending completions belong to exactly these prompts."""
    crc = 0
    for prompt in prompts:
        ids = np.ascontiguousarray(np.asarray(prompt.prompt_token_ids, np.int64))
        crc = zlib.crc32(ids.tobytes(), zlib.crc32(len(ids).to_bytes(8, "little"), crc))
    return f"{crc:08x}"


class OverlappedRollouts(Rollouts):
    """Generation one step ahead on a worker engine (`WorkerEngine`: `submit_generate`)."""

    def __init__(self, engine, weights):
        if not hasattr(engine, "submit_generate"):
            raise ValueError("overlapped rollouts need a worker engine (rollout.engine=hf|vllm)")
        super().__init__(engine, weights)
        self.step: int | None = None  # the step generated ahead
        self.checksum: str | None = None  # of its prompts
        self._in_flight = None  # PendingGeneration
        self._completions: list[list[Completion]] | None = None
        self.weights_versions = []  # the weights version of each response of the last step

    def generate(
        self,
        step: int,
        prompts: Sequence[Prompt],
        sampling: Sampling,
        *,
        first_index: int = 0,
        ahead: Ahead | None = None,
    ) -> list[list[Completion]]:
        """Step `step`'s completions: the ones generated ahead (when they are for these
        prompts), else generated now with the current weights; then, unless `ahead()` is None
        (the last step), step+1's generation starts with the current weights. One process
        only (refused at validation otherwise): `first_index` is 0."""
        del first_index
        completions = None
        if self.step == step:
            self.wait()
            if self.checksum != prompts_checksum(prompts):
                raise RuntimeError(
                    f"the responses generated ahead for step {step} belong to other prompts "
                    "(the data order changed since they were submitted)"
                )
            completions = self._completions
        self._clear()
        if completions is None:
            self.sync()
            completions = self.engine.generate(prompts, sampling, step=step)
        following = ahead() if ahead is not None else None
        if following is not None:
            next_prompts, next_sampling = following
            self.sync()
            self._in_flight = self.engine.submit_generate(
                next_prompts, next_sampling, step=step + 1
            )
            self.step, self.checksum = step + 1, prompts_checksum(next_prompts)
        self.weights_versions = [
            -1 if c.weights_version is None else int(c.weights_version)
            for row in completions
            for c in row
        ]
        return completions

    def wait(self) -> None:
        """Waits for the generation in flight, if any (its completions are kept)."""
        if self._in_flight is not None:
            self._completions = self._in_flight.result()
            self._in_flight = None

    def metrics(self, step: int) -> dict[str, float]:
        """`rollout/weights_lag`: how many updates behind the trainer's weights before this
        step's update the responses were (0: on-policy, 1: one step stale)."""
        if not self.weights_versions:
            return {}
        lag = [step - 1 - v for v in self.weights_versions]
        return {"rollout/weights_lag": float(np.mean(lag))}

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_fields(self) -> dict:
        return {"pending_rollouts": self.state()}

    def restore(self, meta: dict) -> None:
        self.restore_state(meta.get("pending_rollouts"))

    def state(self) -> dict | None:
        """The finished completions generated ahead (JSON), for the checkpoint; waits first."""
        self.wait()
        if self.step is None or self._completions is None:
            return None
        return dict(
            step=self.step,
            prompts_checksum=self.checksum,
            completions=[
                [
                    dict(
                        token_ids=[int(t) for t in c.token_ids],
                        logprobs=[float(x) for x in c.logprobs],
                        text=c.text,
                        finish_reason=c.finish_reason,
                        weights_version=c.weights_version,
                    )
                    for c in row
                ]
                for row in self._completions
            ],
        )

    def restore_state(self, state: dict | None) -> None:
        """The completions a checkpoint holds for its next step (None: nothing ahead)."""
        self._clear()
        if not state:
            return
        self.step, self.checksum = int(state["step"]), state["prompts_checksum"]
        self._completions = [[Completion(**c) for c in row] for row in state["completions"]]

    # -- internals --------------------------------------------------------------------------
    def _clear(self) -> None:
        if self._in_flight is not None:
            raise RuntimeError(f"the generation of step {self.step} is still in flight")
        self.step = self.checksum = self._completions = None
