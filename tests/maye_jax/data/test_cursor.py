"""maye_jax/data/cursor.py: the records each step reads, across epochs and resumes."""

from maye_jax.data.cursor import EpochCursor
from maye_jax.data.records import epoch_order


def test_steps_read_the_epoch_order_and_an_epoch_ends_without_a_full_step():
    cursor = EpochCursor(num_records=10, seed=3)
    order0, order1 = epoch_order(10, 3, 0), epoch_order(10, 3, 1)
    assert cursor.take(4) == list(order0[:4]) and not cursor.end_epoch_if_short(4)
    assert cursor.take(4) == list(order0[4:8])
    assert cursor.end_epoch_if_short(4)  # 2 left: the epoch ends (drop-last)
    assert cursor.state() == [1, 0] and cursor.take(4) == list(order1[:4])


def test_top_ups_read_on_and_stop_at_the_end_of_the_epoch():
    cursor = EpochCursor(num_records=10, seed=3)
    order = epoch_order(10, 3, 0)
    cursor.take(4)
    assert cursor.take(5) == list(order[4:9])  # a top-up
    assert cursor.take(3) == [int(order[9])]  # only one left
    assert cursor.take(3) == [] and cursor.end_epoch_if_short(4)


def test_restore_from_meta_or_from_the_step_of_an_older_checkpoint():
    saved = EpochCursor(10, 3, epoch=1, position=7)
    again = EpochCursor.restore(10, 3, saved.state(), step=5, steps_per_epoch=2, prompts_per_step=4)
    assert again == saved
    # No cursor in the meta: every epoch had steps_per_epoch = 2 steps of 4 prompts.
    older = EpochCursor.restore(10, 3, None, step=3, steps_per_epoch=2, prompts_per_step=4)
    assert older.state() == [1, 4]
