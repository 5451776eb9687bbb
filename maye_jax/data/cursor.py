"""Where the RL loop reads its training records: an epoch and a position in its order.

Each epoch reads the records in `epoch_order(num_records, seed, epoch)`. A generation step
takes its prompts from `position` on; dynamic sampling may take more (its top-ups) from the same
order. An epoch ends when fewer than a full step's prompts are left (the rest is skipped, as a
drop-last loader does), so without dynamic sampling every epoch has exactly
`num_records // prompts_per_step` steps, and with it an epoch can end after fewer steps.

The cursor is saved in each checkpoint (`state()`), so a resumed run reads exactly the prompts
the uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses

from maye_jax.data.records import epoch_order


@dataclasses.dataclass
class EpochCursor:
    num_records: int
    seed: int
    epoch: int = 0  # 0-based
    position: int = 0  # records of this epoch's order consumed so far

    def remaining(self) -> int:
        return self.num_records - self.position

    def take(self, count: int) -> list[int]:
        """The indices of the next `count` records of this epoch's order (fewer when the epoch
        has fewer left); the cursor moves past them."""
        order = epoch_order(self.num_records, self.seed, self.epoch)
        picked = order[self.position : self.position + count]
        self.position += len(picked)
        return [int(i) for i in picked]

    def end_epoch_if_short(self, prompts_per_step: int) -> bool:
        """Moves to the next epoch when fewer than `prompts_per_step` records are left; True
        when the epoch ended."""
        if self.remaining() >= prompts_per_step:
            return False
        self.epoch, self.position = self.epoch + 1, 0
        return True

    def state(self) -> list[int]:
        """[epoch, position], for a checkpoint's meta."""
        return [self.epoch, self.position]

    @classmethod
    def restore(
        cls,
        num_records: int,
        seed: int,
        state: list[int] | None,
        *,
        step: int,
        steps_per_epoch: int,
        prompts_per_step: int,
    ) -> EpochCursor:
        """The cursor of a checkpoint's meta; for a checkpoint written before cursors were saved
        (every epoch then had `steps_per_epoch` steps), the one its step implies."""
        if state is not None:
            epoch, position = state
        else:
            epoch, index = divmod(step, steps_per_epoch)
            position = index * prompts_per_step
        return cls(num_records, seed, int(epoch), int(position))
