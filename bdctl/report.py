"""The reproduction report: one Markdown page with the tables and figures a stage left behind.

runs/<name>/report.md
runs/<name>/figures/training_curves.png
"""

from __future__ import annotations

import json
from pathlib import Path

from bdctl.methods import beyond_paper
from bdctl.pipeline import stages
from bdctl.recipe.schema import Recipe
from bdctl.rundir import RunDir, write_text_atomic
from bdctl.tracking import read_metrics

TRAINING_STAGES = ("teacher_sft", "student_sft")


def training_stage_dirs(run: RunDir) -> list[Path]:
    dirs = [run.stage(name) for name in TRAINING_STAGES]
    distill = run.stage("distill")
    if distill.is_dir():
        dirs += sorted(p for p in distill.iterdir() if p.is_dir())
    return [d for d in dirs if (d / "metrics.jsonl").is_file()]


def training_curves(run: RunDir, path: Path) -> Path | None:
    """Training loss per step and validation scores per evaluation, one panel per training stage
    (validation Rouge-L on a second axis where the stage selected by it)."""
    dirs = training_stage_dirs(run)
    if not dirs:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(4, len(dirs))  # a grid: a run with a dozen distillation stages stays readable
    rows = -(-len(dirs) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in panels[len(dirs) :]:
        unused.set_visible(False)
    for axes, directory in zip(panels[: len(dirs)], dirs, strict=True):
        records = read_metrics(directory / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
        evals = [r for r in records if r.get("event") == "eval"]
        if train:
            axes.plot(*zip(*train, strict=True), lw=1, label="train loss")
        if evals:
            axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="validation loss")
        # one Rouge-L curve per protocol where the stage validated under several, else the one it selected by
        keys = sorted({k for r in evals for k in r if k.startswith("rouge_l@")}) or ["rouge_l"]
        curves = {key: [(r["step"], r[key]) for r in evals if key in r] for key in keys}
        if any(curves.values()):
            twin = axes.twinx()
            for (key, points), color in zip(
                curves.items(), ("tab:green", "tab:red", "tab:purple", "tab:brown"), strict=False
            ):
                if points:
                    label = "validation Rouge-L" + (f" ({key.split('@')[1]})" if "@" in key else "")
                    twin.plot(*zip(*points, strict=True), "s--", ms=3, color=color, label=label)
            twin.set_ylabel("Rouge-L", color="tab:green")
            twin.legend(fontsize="x-small", loc="lower right")
        axes.set_title(str(directory.relative_to(run.root)))
        axes.set_xlabel("optimizer step")
        axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(path))
    return path


def diagnostic_records(run: RunDir) -> dict[str, list[dict]]:
    """Per distill run that logged them (bdctl.diagnostics), its validation records with diagnostics."""
    found = {}
    for directory in training_stage_dirs(run):
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line]
        evals = [r for r in records if r.get("event") == "eval" and "diag_mass_on_set" in r]
        if evals:
            found[str(directory.relative_to(run.root))] = evals
    return found


def diagnostics_table(run: RunDir) -> list[str]:
    """Every distill method's diagnostics on A_t (docs/method.md §8.4) at its first and last validation."""
    from bdctl.tables import markdown_table

    found = diagnostic_records(run)
    if not found:
        return []

    def pair(evals: list[dict], key: str, digits: int) -> str:
        return f"{evals[0][key]:.{digits}f} / {evals[-1][key]:.{digits}f}"

    rows = [
        [name, f"{evals[0]['step']} / {evals[-1]['step']}", pair(evals, "diag_mass_on_set", 3),
         pair(evals, "diag_argmax_in_set", 3), pair(evals, "diag_dstar_nll", 3), pair(evals, "diag_mean_v", 2),
         f"{evals[-1]['diag_outside_share']:.3f}"]
        for name, evals in found.items()
    ]  # fmt: skip
    headers = ["run", "steps", "student mass on A_t", "arg-max in A_t", "NLL of D*'s actions", "mean V", "outside"]
    return [
        "## Diagnostics on A_t, every method (first / last validation)",
        "",
        "Measured at each validation on the same fixed sample of D*'s transitions (docs/method.md §8.4).",
        "",
        markdown_table(headers, rows).strip(),
    ]


def diagnostic_curves(run: RunDir, path: Path) -> Path | None:
    """One panel per distill run: the student's mass on A_t and arg-max-in-A_t share per validation,
    with validation Rouge-L (where the run selected by it) on a second axis."""
    found = diagnostic_records(run)
    if not found:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(4, len(found))
    rows = -(-len(found) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in panels[len(found) :]:
        unused.set_visible(False)
    for axes, (name, evals) in zip(panels[: len(found)], found.items(), strict=False):
        steps = [r["step"] for r in evals]
        axes.plot(steps, [r["diag_mass_on_set"] for r in evals], "o-", ms=3, label="mass on A_t")
        axes.plot(steps, [r["diag_argmax_in_set"] for r in evals], "^-", ms=3, label="arg-max in A_t")
        axes.set_ylim(0, 1.02)
        if all("rouge_l" in r for r in evals):
            twin = axes.twinx()
            twin.plot(steps, [r["rouge_l"] for r in evals], "s--", ms=3, color="tab:green", label="validation Rouge-L")
            twin.set_ylabel("Rouge-L", color="tab:green")
            twin.legend(fontsize="x-small", loc="lower right")
        axes.set_title(name)
        axes.set_xlabel("optimizer step")
        axes.legend(fontsize="small", loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(path))
    return path


def label(model: str) -> str:
    """A model's name in the tables, marked when its method is beyond the paper."""
    return f"{model} (beyond the paper)" if beyond_paper(model) else model


def rouge_tables(results: dict, recipe: Recipe) -> list[str]:
    """Per sampling protocol: Table 1 (every evaluated model, with the paper's numbers beside ours
    where the recipe has them and says they came from this protocol or does not know) and Tables 2
    / 4 (BD and its ablations), as Markdown sections. Numbers of two protocols never share a table."""
    from bdctl.answers import protocol_label
    from bdctl.tables import markdown_table, mean_std_cell

    sets, paper = results["sets"], recipe.paper_rouge_l
    seeds = ", ".join(str(s) for s in results["seeds"])
    distill = recipe.stages.distill
    runs = {f"distill/{name}": change for name, change in distill.ablations.runs().items()}
    lines: list[str] = []
    for protocol in results["protocols"]:
        scores, name = results["scores"][protocol["name"]], protocol["name"]

        def paper_cell(model: str, set_name: str) -> str:
            if set_name not in paper.get(model, {}):
                return ""
            source = recipe.paper_protocols.get(model, "not stated")
            return f"{paper[model][set_name]:.1f} ({source})"

        def row(model: str, scores=scores) -> list[str]:
            cells = []
            for set_name in sets:
                cells.append(mean_std_cell(scores[model][set_name]["mean"], scores[model][set_name]["std"]))
                if paper:
                    cells.append(paper_cell(model, set_name))
            return cells

        headers = [h for s in sets for h in ([s, f"{s} (paper, its protocol)"] if paper else [s])]
        lines += [
            "" if lines else "", f"## Rouge-L, protocol {protocol_label(protocol)}", "",
            f"Mean ± std over seeds {seeds}, every model sampled under this protocol"
            + ("; the paper's numbers (mean of 5 seeds) beside ours, with the protocol that produced them."
               if paper else "."),
            "", markdown_table(["model", *headers], [[label(m), *row(m)] for m in results["models"]]).strip(),
        ]  # fmt: skip
        lines += paper_selection_notes(recipe, results["models"])
        if any(beyond_paper(m) for m in results["models"]):
            lines += ["", "(beyond the paper): a divergence of other toolkits' menu (docs/method.md §5.1), an extra "
                      "baseline the paper does not have."]  # fmt: skip
        ablated = [m for m in results["models"] if m in runs and runs[m].get("method", "bd") == "bd"]
        lines += other_ablations(results["models"], runs, row, headers, name)
        if ablated and "distill/bd" in results["models"]:
            base = (
                f"p = {distill.p:g}, chi2 {'on' if distill.chi2 else 'off'} (alpha {distill.alpha:g}), "
                f"{distill.variant} variant, outside {distill.outside}, anchor {distill.anchor_coef:g}, "
                f"D* {distill.dstar}"
            )
            described = [["distill/bd", base, *row("distill/bd")]]
            described += [[m, ", ".join(f"{k} = {v}" for k, v in runs[m].items()), *row(m)] for m in ablated]
            lines += [
                "",
                f"### Ablations, protocol {name} (the paper's Tables 2 and 4, and the settings of docs/method.md §3.4)",
                "",
                "Bellman Distill with the named settings of stages.distill changed; everything else as distill/bd. "
                "anchor > 0 is beyond the paper.", "",
                markdown_table(["run", "setting", *headers], described).strip(),
            ]  # fmt: skip
            lines += paper_selection_notes(recipe, [row[0] for row in described])
    return lines


# bdctl's rule, printed beside every note on how the paper's checkpoints were selected
OWN_SELECTION = "bdctl selects every checkpoint on the validation split and tests on the test split, always."


def paper_selection_notes(recipe: Recipe, models: list[str]) -> list[str]:
    """Under a table: how the paper's numbers of the listed models were selected (recipe.paper_selection),
    one line per distinct note naming its rows, then bdctl's own rule."""
    grouped: dict[str, list[str]] = {}
    for model in models:
        note = recipe.paper_selection.get(model)
        if note is not None and recipe.paper_rouge_l.get(model):
            grouped.setdefault(note, []).append(model)
    if not grouped:
        return []
    lines = [""]
    lines += [f"Selection of the paper's numbers for {', '.join(rows)}: {note}" for note, rows in grouped.items()]
    return [*lines, "", OWN_SELECTION]


def other_ablations(models: list[str], runs: dict[str, dict], row, headers: list[str], protocol: str) -> list[str]:
    """A table per method other than BD that stages.distill.ablations ablates (combined runs naming
    `method`): its run beside distill/<method>, with the settings each changes."""
    from bdctl.tables import markdown_table

    lines: list[str] = []
    methods = dict.fromkeys(runs[m]["method"] for m in models if m in runs and runs[m].get("method", "bd") != "bd")
    for method in methods:
        base = f"distill/{method}"
        ablated = [m for m in models if m in runs and runs[m].get("method") == method]
        described = [[label(base), "the recipe's stages.distill", *row(base)]] if base in models else []
        described += [
            [m, ", ".join(f"{k} = {v}" for k, v in runs[m].items() if k != "method"), *row(m)] for m in ablated
        ]
        lines += [
            "", f"### Ablations of {method}, protocol {protocol}", "",
            f"{method} with the named settings of stages.distill changed; everything else as {base}.", "",
            markdown_table(["run", "setting", *headers], described).strip(),
        ]  # fmt: skip
    return lines


def wall_times(metrics: Path) -> dict | None:
    """Seconds of training to the kept (best) validation and in total, from a stage's metrics.jsonl.

    Each process that ran the stage starts its clock at 0 with a "start" record; a resumed run keeps the
    records up to its checkpoint and appends its own, so the work lost after that checkpoint is not counted:
    the times are those of the work that produced the result.
    """
    records = read_metrics(metrics)
    offset = last = 0.0
    best = None
    for record in records:
        if record.get("event") == "start" and last:
            offset, last = offset + last, 0.0
        last = record.get("time", last)
        if record.get("event") == "eval" and record.get("best"):
            best = (record["step"], offset + record["time"])
    if best is None:
        return None
    return {"best_step": best[0], "to_best": best[1], "total": offset + last}


def wall_time_table(run: RunDir) -> list[str]:
    """Per distillation run: wall time to the best validation and in total, and MiniLLM / BD (Table 3)."""
    distill = run.stage("distill")
    times = {}
    for directory in sorted(p for p in distill.iterdir() if p.is_dir()) if distill.is_dir() else []:
        found = wall_times(directory / "metrics.jsonl") if (directory / "metrics.jsonl").is_file() else None
        if found is not None:
            times[f"distill/{directory.name}"] = found
    if not times:
        return []
    from bdctl.tables import markdown_table

    rows = [[name, str(t["best_step"]), f"{t['to_best']:.1f}", f"{t['total']:.1f}"] for name, t in times.items()]
    lines = [
        "## Wall time of the distillation runs (the paper's Table 3)", "",
        "Seconds from the start of training (validation included) to the kept best validation, and in total.", "",
        markdown_table(["run", "best step", "to best (s)", "total (s)"], rows).strip(),
    ]  # fmt: skip
    if "distill/minillm" in times and "distill/bd" in times:
        mini, bd = times["distill/minillm"], times["distill/bd"]
        ratio = lambda a, b: f"{a / b:.1f}x" if b > 0 else "n/a"  # noqa: E731
        lines += [
            "",
            f"MiniLLM / BD: {ratio(mini['to_best'], bd['to_best'])} to the best validation, "
            f"{ratio(mini['total'], bd['total'])} in total.",
        ]
    return lines


def bd_diagnostics(run: RunDir) -> list[str]:
    """What each BD run logged (docs/method.md §3.3's quantities): outside share, mean V and mean set
    size at the first and last step, and the kept step per protocol."""
    from bdctl.rundir import manifest
    from bdctl.tables import markdown_table

    rows = []
    for directory in training_stage_dirs(run):
        records = read_metrics(directory / "metrics.jsonl")
        train = [r for r in records if r.get("event") == "train" and "mean_v" in r]
        if not train:
            continue
        done = manifest(directory) or {}
        kept = [f"{done.get('best_step', '?')}"] + [
            f"{name}: {info['best_step']}" for name, info in (done.get("best_per_protocol") or {}).items()
        ]
        first, last = train[0], train[-1]
        rows.append([
            str(directory.relative_to(run.root)),
            f"{first['outside_share']:.3f} / {last['outside_share']:.3f}",
            f"{first['mean_v']:.2f} / {last['mean_v']:.2f}",
            f"{first['mean_set_size']:.1f} / {last['mean_set_size']:.1f}",
            f"{first['set_mass']:.3f} / {last['set_mass']:.3f}" if "set_mass" in last else "",
            f"{last['anchor_ce']:.3f}" if "anchor_ce" in last else "",
            ", ".join(kept),
        ])  # fmt: skip
    if not rows:
        return []
    headers = [
        "run",
        "outside share (first / last step)",
        "mean V",
        "mean |A_t|",
        "student mass on A_t",
        "anchor CE (last)",
        "kept step",
    ]
    return ["## Bellman Distill diagnostics", "", markdown_table(headers, rows).strip()]


def write_report(run: RunDir, recipe: Recipe, recipe_arg: str, overrides: list[str], timings: dict[str, float]) -> Path:
    sections = [
        f"# Reproduction report: {run.root.name}",
        "",
        f"Recipe: `{recipe_arg}`" + (f" with `{' '.join(overrides)}`" if overrides else ""),
    ]
    results = run.stage("eval") / "results.json"
    if results.is_file():
        scored = json.loads(results.read_text())
        sections += ["", *rouge_tables(scored, recipe)]
        if scored.get("harness"):
            from bdctl.harness import harness_table
            from bdctl.tables import markdown_table

            headers, rows = harness_table(scored["harness"], scored["models"])
            sections += ["", "## lm-evaluation-harness (beyond the paper)", "", markdown_table(headers, rows).strip()]
    diagnostics = bd_diagnostics(run)
    if diagnostics:
        sections += ["", *diagnostics]
    if (run.stage("judge") / "table.md").is_file():
        sections += ["", "## Win rates", "", (run.stage("judge") / "table.md").read_text().strip()]
    for title, png in (("Win rates", run.stage("judge") / "win_rates.png"),):
        if png.is_file():
            sections += ["", f"![{title}]({png.relative_to(run.root)})"]
    sparsity = run.stage("generate") / "sparsity.md"
    if sparsity.is_file():
        # sparsity.md is a page of its own: drop its title, nest its sections under this one
        lines = [line for line in sparsity.read_text().strip().splitlines() if not line.startswith("# ")]
        nested = "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip()
        sections += ["", "## Teacher sparsity (the paper's Figure 1)", "", nested]
        if (run.stage("generate") / "sparsity.png").is_file():
            sections += ["", "![teacher sparsity](generate/sparsity.png)"]
    curves = training_curves(run, run.root / "figures" / "training_curves.png")
    if curves is not None:
        sections += ["", "## Training curves", "", f"![training curves]({curves.relative_to(run.root)})"]
    on_sets = diagnostics_table(run)
    if on_sets:
        sections += ["", *on_sets]
        figure = diagnostic_curves(run, run.root / "figures" / "diagnostics_on_sets.png")
        assert figure is not None  # there are records to plot
        sections += ["", f"![diagnostics on A_t]({figure.relative_to(run.root)})"]
    wall = wall_time_table(run)
    if wall:
        sections += ["", *wall]
    if timings:
        sections += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        order = [stage.directory for stage in stages(recipe)]
        ranked = sorted(timings, key=lambda name: order.index(name) if name in order else len(order))
        sections += [f"| {stage} | {timings[stage]:.1f} |" for stage in ranked]
        sections += [f"| total | {sum(timings.values()):.1f} |"]
    path = run.root / "report.md"
    write_text_atomic(path, "\n".join(sections) + "\n")
    return path
