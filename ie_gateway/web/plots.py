"""Agreement trends as small inline SVG plots, drawn on the server (no JavaScript, no files).

One plot per (model version, structure): each case's Dice in arrival order as a dot, the
rolling median of the drift window as a line, and the baseline minus the margin as the dashed
alarm threshold.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH, HEIGHT, PAD = 400, 150, 30


@dataclass(frozen=True)
class Plot:
    """What the template draws; coordinates are in the SVG's own units."""

    dots: list[tuple[float, float, str]]  # x, y, tooltip
    median_path: str
    threshold_y: float | None
    y_ticks: list[tuple[float, str]]
    y_low: float
    width: int = WIDTH
    height: int = HEIGHT
    pad: int = PAD


def dice_plot(dice: Sequence[float], labels: Sequence[str], window: int, threshold: float | None) -> Plot:
    """Plot ``dice`` (oldest first) with its rolling median over ``window`` cases."""
    values = list(dice) + ([threshold] if threshold is not None else [])
    low = max(0.0, min(min(values, default=0.9), 0.9) - 0.05)
    low = round(low * 20) / 20 if low > 0.05 else 0.0  # ticks on 0.05 steps

    def x(i: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * (i / (len(dice) - 1) if len(dice) > 1 else 0.5)

    def y(v: float) -> float:
        return PAD / 2 + (HEIGHT - 1.5 * PAD) * (1.0 - (v - low) / (1.0 - low))

    dots = [(x(i), y(v), f"{label}: Dice {v:.3f}") for i, (v, label) in enumerate(zip(dice, labels, strict=True))]
    medians = [statistics.median(dice[max(0, i - window + 1) : i + 1]) for i in range(len(dice))]
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(i):.1f},{y(m):.1f}" for i, m in enumerate(medians))
    ticks = [(y(v), f"{v:.2f}") for v in (low, (low + 1.0) / 2, 1.0)]
    return Plot(dots, path, y(threshold) if threshold is not None else None, ticks, low)
