"""`checkpoint.keep_best`: the weights of the run's best evaluation, kept.

Table 3's "max" names the epoch of a metric's best value; with the newest `checkpoint.keep`
checkpoints only, that epoch's weights are usually gone by the end of the run. With
`checkpoint.keep_best = "eval/<split>/<setting>"` the run harness keeps, besides the newest
checkpoints, the checkpoint of the step whose evaluation gave the metric's highest value (ties:
the earlier step), exports those weights to `best_hf/` and records which step it was in
`best.json`. The order (checkpoint, then export, then record) and the recovery on resume (the
best is recomputed from metrics.jsonl, the source of truth, and an export that a crash cut off
is redone from the restored weights) keep the three in agreement after any crash.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

BEST_RECORD = "best.json"
BEST_MODEL = "best_hf"


@dataclasses.dataclass
class BestEvaluation:
    metric: str
    value: float | None = None
    step: int | None = None
    epoch: int | None = None
    pending: bool = False  # a new best at `step` whose checkpoint/export/record are not done

    def note(self, metrics: dict, *, step: int, epoch: int | None) -> bool:
        """Takes a metrics line; True when it holds a new best value (a strictly higher one)."""
        value = metrics.get(self.metric)
        if value is None or (self.value is not None and not float(value) > self.value):
            return False
        self.value, self.step, self.epoch, self.pending = float(value), step, epoch, True
        return True

    @classmethod
    def from_lines(cls, metric: str, lines: list[dict]) -> BestEvaluation:
        """The best so far of a resumed run's metric lines (nothing pending)."""
        best = cls(metric)
        for line in lines:
            best.note(line, step=int(line["generation_step"]), epoch=line.get("epoch"))
        best.pending = False
        return best

    def record(self) -> dict:
        return dict(
            metric=self.metric,
            value=self.value,
            generation_step=self.step,
            epoch=self.epoch,
            model=BEST_MODEL,
            checkpoint=None if not self.step else f"checkpoints/{self.step}",
        )

    def matches(self, record: dict | None) -> bool:
        """True when `record` (best.json) describes this best."""
        return (
            record is not None
            and record.get("metric") == self.metric
            and record.get("generation_step") == self.step
        )


def read_best_record(output_dir) -> dict | None:
    """best.json of a run, or None when it has none (or it cannot be read)."""
    path = Path(output_dir) / BEST_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
