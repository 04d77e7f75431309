"""The win-rate chart, after the paper's Figure 2: one stacked horizontal bar per baseline."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from bdctl.judges.stats import WinRate

_COLOURS = {"win": "#2a9d8f", "tie": "#c9c9c9", "loss": "#e76f51"}


def win_rate_chart(
    results: Mapping[str, WinRate],
    path: str | os.PathLike[str],
    *,
    model_name: str = "model",
    title: str | None = None,
) -> Path:
    """Write a PNG of win / tie / loss shares of ``model_name`` against each baseline.

    ``results`` maps a baseline's name to the model's record against it; bars appear in the
    mapping's order, top to bottom. Each bar is annotated with the win rate and its interval.
    Returns the path written.
    """
    if not results:
        raise ValueError("win_rate_chart needs at least one baseline")
    # A bare Figure renders with the Agg canvas and, unlike pyplot, touches no global backend
    # or figure registry: safe without a display and inside a process that also plots.
    from matplotlib.figure import Figure

    names = list(results)
    rows = range(len(names))
    figure = Figure(figsize=(8.0, 1.0 + 0.7 * len(names)))
    axes = figure.subplots()
    left = [0.0] * len(names)
    for outcome, label in (("win", f"{model_name} wins"), ("tie", "tie"), ("loss", f"{model_name} loses")):
        shares = [_percent(results[name].share(outcome)) for name in names]
        axes.barh(rows, shares, left=left, color=_COLOURS[outcome], label=label, height=0.6)
        for row, (start, share) in enumerate(zip(left, shares, strict=True)):
            if share >= 6:  # room for the number inside the segment
                axes.text(start + share / 2, row, f"{share:.0f}", ha="center", va="center", fontsize=9)
        left = [start + share for start, share in zip(left, shares, strict=True)]
    for row, name in enumerate(names):
        axes.text(101, row, _annotation(results[name]), va="center", fontsize=9)
    axes.axvline(50, color="black", linewidth=0.8, linestyle=":")
    axes.set_yticks(list(rows), [f"vs {name}" for name in names])
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("share of judgments (%), both answer orders")
    axes.set_title(title or f"{model_name}: win rate against baselines")
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=3, frameon=False, fontsize=9)
    axes.spines[["top", "right"]].set_visible(False)
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=150, bbox_inches="tight")
    return output


def _percent(fraction: float) -> float:
    return 0.0 if math.isnan(fraction) else 100.0 * fraction


def _annotation(record: WinRate) -> str:
    if math.isnan(record.win_rate):
        return f"win rate n/a ({record.unparseable} unparsed)"
    text = f"{100 * record.win_rate:.1f}% [{100 * record.ci_low:.1f}, {100 * record.ci_high:.1f}]  n={record.pairs}"
    if record.unparseable:
        text += f", {record.unparseable} unparsed"
    # Beside the rate, how far the judge followed the answers rather than their positions.
    if not math.isnan(record.consistency):
        text += f", consistent {100 * record.consistency:.0f}%"
    if record.position_driven:
        text += " POSITION-DRIVEN JUDGE"
    return text
