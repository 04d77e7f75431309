"""The reproduction report: one Markdown page with the tables and figures a stage left behind.

    runs/<name>/report.md
    runs/<name>/figures/training_curves.png
"""

from __future__ import annotations

import json
from pathlib import Path

from bdctl.rundir import RunDir, write_text_atomic

TRAINING_STAGES = ("teacher_sft", "student_sft")


def training_stage_dirs(run: RunDir) -> list[Path]:
    dirs = [run.stage(name) for name in TRAINING_STAGES]
    distill = run.stage("distill")
    if distill.is_dir():
        dirs += sorted(p for p in distill.iterdir() if p.is_dir())
    return [d for d in dirs if (d / "metrics.jsonl").is_file()]


def training_curves(run: RunDir, path: Path) -> Path | None:
    """Training loss per step and validation loss per evaluation, one panel per training stage."""
    dirs = training_stage_dirs(run)
    if not dirs:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(dirs), 3.2), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    for axes, directory in zip(figure.subplots(1, len(dirs), squeeze=False)[0], dirs, strict=True):
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
        valid = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
        if train:
            axes.plot(*zip(*train), lw=1, label="train loss")
        if valid:
            axes.plot(*zip(*valid), "o-", ms=3, label="validation loss")
        axes.set_title(str(directory.relative_to(run.root)))
        axes.set_xlabel("optimizer step")
        axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(path))
    return path


def write_report(run: RunDir, recipe_arg: str, overrides: list[str], timings: dict[str, float]) -> Path:
    sections = [f"# Reproduction report: {run.root.name}", "", f"Recipe: `{recipe_arg}`" + (f" with `{' '.join(overrides)}`" if overrides else "")]
    for title, table in (("Rouge-L", run.stage("eval") / "table.md"), ("Win rates", run.stage("judge") / "table.md")):
        if table.is_file():
            sections += ["", f"## {title}", "", table.read_text().strip()]
    for title, png in (("Win rates", run.stage("judge") / "win_rates.png"),):
        if png.is_file():
            sections += ["", f"![{title}]({png.relative_to(run.root)})"]
    sparsity = run.stage("generate") / "sparsity.md"
    if sparsity.is_file():
        sections += ["", "## Teacher sparsity (the paper's Figure 1)", "", sparsity.read_text().strip()]
        if (run.stage("generate") / "sparsity.png").is_file():
            sections += ["", "![teacher sparsity](generate/sparsity.png)"]
    curves = training_curves(run, run.root / "figures" / "training_curves.png")
    if curves is not None:
        sections += ["", "## Training curves", "", f"![training curves]({curves.relative_to(run.root)})"]
    if timings:
        sections += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        sections += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    path = run.root / "report.md"
    write_text_atomic(path, "\n".join(sections) + "\n")
    return path
