"""The teacher's sparsity report (the paper's Figure 1): how much of its probability mass the top
few tokens hold, on the sequences it generated.

    stats = sparsity_stats(top_k_captures, wide_captures, cache_manifest)
    write_report(stats, out_dir)      -> sparsity.json, sparsity.md, sparsity.png

Inputs are two scorings of the same sequences by the teacher (`bdctl.sampling.score`):

* ``top_k_captures`` with ``p = 1`` and ``max_k = 50``: the 50 most probable tokens at every
  position, so the mean cumulative probability of the top k is exact for k = 1 ... 50;
* ``wide_captures`` with ``p = max(P_VALUES)`` and no cap: the uncapped top-p set. The top-p
  set of any smaller p is a prefix of it (same order, it stops earlier), so one scoring gives
  the set size for every p in ``P_VALUES``.

All means are token-level: over every response position of every scored sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bdctl.rundir import write_json_atomic, write_text_atomic
from bdctl.topp import Capture

TOP_K = 50
P_VALUES = (0.5, 0.8, 0.9, 0.95)


def top_k_curve(captures: Sequence[Capture], k: int = TOP_K) -> np.ndarray:
    """float64 ``[k]``: mean over positions of the probability held by the top 1, 2, ... k tokens.

    Every position must hold the same number of candidates (``p = 1`` capped at ``k``, or the
    whole vocabulary when it is smaller): a shorter width is what the curve reports.
    """
    kept = np.concatenate([np.asarray(c.kept, dtype=np.int64) for c in captures])
    if kept.size == 0:
        raise ValueError("no positions to report on")
    width = int(kept.min())
    if int(kept.max()) != width:
        raise ValueError("top_k_curve needs the same number of candidates at every position (score with p = 1)")
    probs = np.concatenate([np.asarray(c.probs, dtype=np.float64) for c in captures]).reshape(-1, width)
    return probs.cumsum(axis=1).mean(axis=0)[:k]


def top_p_sizes(captures: Sequence[Capture], p_values: Sequence[float] = P_VALUES) -> dict[float, float]:
    """Mean top-p set size for each p, from uncapped top-p sets of ``p >= max(p_values)``.

    Token j of a position is in the set of ``p`` when the tokens ranked before it hold less
    than ``p`` (docs/method.md §2: the token that crosses ``p`` is kept, token 0 always is).
    """
    probs = np.concatenate([np.asarray(c.probs, dtype=np.float64) for c in captures])
    kept = np.concatenate([np.asarray(c.kept, dtype=np.int64) for c in captures])
    starts = np.concatenate([[0], np.cumsum(kept)[:-1]])
    # The mass ranked before each entry, within its own position (an exclusive cumulative sum).
    total = np.cumsum(probs)
    before = total - probs - np.repeat(total[starts] - probs[starts], kept)
    positions = len(kept)
    return {float(p): float((before < p).sum()) / positions for p in p_values}


def sparsity_stats(
    top_k_captures: Sequence[Capture],
    wide_captures: Sequence[Capture],
    cache_manifest: dict[str, Any],
    *,
    sequences: int,
) -> dict[str, Any]:
    """The report's numbers (JSON-ready): the top-k curve, top-p set sizes and the cache's cost."""
    curve = top_k_curve(top_k_captures)
    counts = cache_manifest["counts"]
    stats: dict[str, Any] = {
        "teacher": cache_manifest["teacher"],
        "scored_sequences": sequences,
        "scored_positions": int(sum(len(c) for c in top_k_captures)),
        "top_k_cumulative_probability": {str(k + 1): round(float(v), 6) for k, v in enumerate(curve)},
        "top_p_mean_set_size": {f"{p:g}": round(v, 4) for p, v in top_p_sizes(wide_captures).items()},
        "cache": {
            "top_p": cache_manifest["top_p"],
            "max_k": cache_manifest["max_k"],
            "examples": counts["examples"],
            "tokens": counts["tokens"],
            "finish": counts["finish"],
            "mean_set_size": round(cache_manifest["mean_set_size"], 4),
            "capped_fraction": round(cache_manifest["capped_fraction"], 6),
            "total_bytes": cache_manifest["total_bytes"],
            "bytes_per_token": round(cache_manifest["bytes_per_token"], 3),
        },
    }
    if "dense_fp16_bytes_per_token" in cache_manifest:
        dense = cache_manifest["dense_fp16_bytes_per_token"]
        stats["cache"]["dense_fp16_bytes_per_token"] = dense
        stats["cache"]["dense_over_cache"] = round(dense / max(cache_manifest["bytes_per_token"], 1e-9), 2)
    return stats


def markdown(stats: dict[str, Any]) -> str:
    """The report as a markdown page: the cache, the top-p set sizes, the top-k table."""
    cache = stats["cache"]
    lines = [
        f"# Teacher sparsity: {stats['teacher']}",
        "",
        f"{stats['scored_sequences']} generated sequences re-scored ({stats['scored_positions']} positions); "
        "token-level means.",
        "",
        "## Cache",
        "",
        "| | |",
        "|---|---|",
        f"| p / cap K | {cache['top_p']:g} / {cache['max_k']} |",
        f"| examples / tokens | {cache['examples']} / {cache['tokens']} |",
        f"| finished by EOS / truncated | {cache['finish']['eos']} / {cache['finish']['length']} |",
        f"| mean set size at p | {cache['mean_set_size']:.3f} |",
        f"| positions cut by the cap | {100 * cache['capped_fraction']:.3f} % |",
        f"| bytes per token | {cache['bytes_per_token']:.2f} |",
    ]
    if "dense_fp16_bytes_per_token" in cache:
        lines.append(
            f"| dense fp16 logits, bytes per token | {cache['dense_fp16_bytes_per_token']} "
            f"({cache['dense_over_cache']:g}x the cache) |"
        )
    lines += ["", "## Mean top-p set size", "", "| p | tokens |", "|---|---|"]
    lines += [f"| {p} | {size:.2f} |" for p, size in stats["top_p_mean_set_size"].items()]
    lines += ["", "## Mean cumulative probability of the top k tokens", "", "| k | probability |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in stats["top_k_cumulative_probability"].items()]
    return "\n".join(lines) + "\n"


def plot(stats: dict[str, Any], path: Path) -> Path:
    """The top-k curve as a PNG, with the cache's p and the top-p set sizes marked."""
    # A bare Figure renders with the Agg canvas and touches no global pyplot state.
    from matplotlib.figure import Figure

    curve = stats["top_k_cumulative_probability"]
    ks = [int(k) for k in curve]
    figure = Figure(figsize=(6.0, 4.0))
    axes = figure.subplots()
    axes.plot(ks, list(curve.values()), marker="o", markersize=3, color="#264653")
    p = stats["cache"]["top_p"]
    axes.axhline(p, color="#e76f51", linestyle=":", linewidth=1)
    axes.text(max(ks), p + 0.01, f"cache p = {p:g}", color="#e76f51", ha="right", va="bottom", fontsize=8)
    sizes = ", ".join(f"p={q}: {size:.1f}" for q, size in stats["top_p_mean_set_size"].items())
    axes.set_xlim(1, max(ks))
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("k (top-k tokens of the teacher)")
    axes.set_ylabel("mean cumulative probability")
    axes.set_title(f"Teacher sparsity ({stats['scored_positions']} positions)", fontsize=10)
    axes.text(
        0.98, 0.04, f"mean top-p set size\n{sizes}", transform=axes.transAxes, ha="right", va="bottom", fontsize=8
    )
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def write_report(stats: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """sparsity.json, sparsity.md and sparsity.png in ``out_dir``."""
    paths = {"json": out_dir / "sparsity.json", "markdown": out_dir / "sparsity.md", "png": out_dir / "sparsity.png"}
    write_json_atomic(paths["json"], stats)
    write_text_atomic(paths["markdown"], markdown(stats))
    # Rendered under a temporary name and renamed: a killed run never leaves half a PNG.
    tmp = out_dir / ".sparsity.png.tmp"
    plot(stats, tmp).replace(paths["png"])
    return paths
