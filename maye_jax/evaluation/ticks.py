"""How the report's axes label their ticks: each y label with its own power of ten (nothing
above the axis to overlap the panel's title), integer x ticks for steps and epochs, and a
single x value as the axis' only tick."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import Formatter, MaxNLocator


class ScaledTickLabels(Formatter):
    """Tick labels as plain numbers, each with its own power of ten (`1.5e-8`) when the axis
    needs one, instead of matplotlib's one `1e-8` above the axis, where it overlaps the
    panel's title; never an offset (values read as logged)."""

    exponent, decimals = 0, 0

    def set_locs(self, locs) -> None:
        super().set_locs(locs)
        finite = [abs(v) for v in locs if np.isfinite(v)]
        largest = max(finite, default=0.0)
        exponent = int(np.floor(np.log10(largest))) if largest else 0
        self.exponent = exponent if not -3 <= exponent <= 4 else 0
        scaled = [v / 10.0**self.exponent for v in locs if np.isfinite(v)]
        # the fewest decimals that write every tick exactly (ticks are round numbers)
        self.decimals = next(
            (d for d in range(7) if all(abs(round(v, d) - v) < 1e-9 for v in scaled)), 6
        )

    def __call__(self, x, pos=None) -> str:
        text = f"{x / 10.0**self.exponent:.{self.decimals}f}"
        return f"{text}e{self.exponent}" if self.exponent and x != 0 else text


def integer_x_axis(ax, x: np.ndarray) -> None:
    """Integer x ticks (epochs, steps); an axis with a single x value shows it alone, not
    matplotlib's fractional ticks around it."""
    seen = getattr(ax, "maye_x_values", set()) | {int(v) for v in x}
    ax.maye_x_values = seen
    if len(seen) == 1:
        (only,) = seen
        ax.set_xlim(only - 1, only + 1)
        ax.set_xticks([only])
    else:
        ax.set_xlim(auto=True)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
