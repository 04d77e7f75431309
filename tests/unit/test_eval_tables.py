"""Table helpers and the eval stage's pure functions (seeds, names, shares of prompts)."""

from __future__ import annotations

import csv
import io
import math
import re

import pytest

from bdctl.answers import prompt_seed
from bdctl.evalunits import model_dir_name
from bdctl.sampling import length_grouped_batches
from bdctl.stages.evaluate import _share
from bdctl.tables import csv_table, markdown_table, mean_std_cell, rich_table


def test_mean_std_cell():
    assert mean_std_cell(24.314, 0.5249) == "24.31 ± 0.52"
    assert mean_std_cell(3.0, 0.0, digits=1) == "3.0 ± 0.0"
    assert mean_std_cell(math.nan, 1.0) == "n/a" and mean_std_cell(None, None) == "n/a"
    assert mean_std_cell(1.0, None) == "1.00"


def test_markdown_table_escapes_and_aligns():
    text = markdown_table(["model", "dolly"], [["a|b", "1.00 ± 0.10"], ["c", math.nan]])
    assert text.splitlines() == [
        "| model | dolly |",
        "| :--- | ---: |",
        "| a\\|b | 1.00 ± 0.10 |",
        "| c | n/a |",
    ]


def test_csv_table_keeps_full_precision_and_quotes():
    text = csv_table(["model", "mean"], [["x, y", 1 / 3], ["z", None]])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["model", "mean"], ["x, y", repr(1 / 3)], ["z", ""]]
    assert float(rows[1][1]) == 1 / 3


def test_rich_table_has_the_cells():
    from rich.console import Console

    def render(width: int) -> str:
        console = Console(width=width, record=True, color_system=None)
        console.print(rich_table(["model", "dolly"], [["a-rather-long-model-name", "12.34 ± 0.56"]]))
        return console.export_text()

    assert "12.34 ± 0.56" in render(60)
    assert "a-rather-long-model-name" in render(34)  # a narrow terminal squeezes the numbers, not the name


def test_prompt_seed_is_stable_and_distinct():
    assert prompt_seed(10, 3) == prompt_seed(10, 3)
    seeds = {prompt_seed(seed, prompt) for seed in (10, 20, 30) for prompt in range(200)}
    assert len(seeds) == 600
    assert all(0 <= s < 2**63 for s in seeds)
    # fixed forever: changing it would silently change every saved evaluation
    assert prompt_seed(10, 0) == int.from_bytes(__import__("hashlib").sha256(b"10/0").digest()[:8], "little") & (
        2**63 - 1
    )


def test_model_dir_names_are_safe_and_stable(tmp_path):
    assert model_dir_name("teacher_sft", "stage") == "teacher_sft"
    assert model_dir_name("distill/bd", "stage") == "distill-bd"
    assert model_dir_name("Qwen/Qwen2.5-0.5B", "hub") == "Qwen--Qwen2.5-0.5B"
    one, two = tmp_path / "a" / "export", tmp_path / "b" / "export"
    assert model_dir_name(str(one), "dir") != model_dir_name(str(two), "dir")
    assert model_dir_name(str(one), "dir") == model_dir_name(str(one), "dir")
    assert re.fullmatch(r"export-[0-9a-f]{8}", model_dir_name(str(one), "dir"))
    assert model_dir_name("weird name:with*chars", "hub") == "weird_name_with_chars"


def test_share_counts_a_ranks_prompts():
    lengths = [5, 9, 1, 7, 7, 3, 2]
    for batch_size in (1, 2, 3, 8):
        batches = length_grouped_batches(lengths, batch_size)
        for world in (1, 2, 3):
            shares = [_share(len(lengths), batch_size, rank, world) for rank in range(world)]
            assert shares == [sum(len(b) for b in batches[rank::world]) for rank in range(world)]
            assert sum(shares) == len(lengths)


def test_report_puts_the_papers_numbers_beside_ours_and_lists_ablations():
    """One Table-1 block per protocol; the paper's numbers carry the protocol that produced them."""
    from bdctl.recipe import load_recipe
    from bdctl.report import rouge_tables

    recipe, _ = load_recipe(
        "smoke",
        [
            "stages.eval.models=[teacher_sft, distill/bd, distill/bd-p1.0, distill/bd-chi2-off]",
            "stages.eval.protocols=[{name: minillm}, {name: release, top_p: 0.8}]",
            "stages.distill.ablations={p: [1.0], chi2: [false]}",
            "paper_rouge_l={teacher_sft: {dolly: 27.6}, distill/bd: {dolly: 24.7}, distill/bd-p1.0: {dolly: 23.6}}",
            "paper_protocols={distill/bd: release, distill/bd-p1.0: release}",
        ],
    )

    def score(mean):
        return {"dolly": {"mean": mean, "std": 0.5, "per_seed": {}, "prompts": 32}}

    def scores(shift):
        return {"teacher_sft": score(40.0 + shift), "distill/bd": score(30.0 + shift),
                "distill/bd-p1.0": score(28.0 + shift), "distill/bd-chi2-off": score(29.0 + shift)}  # fmt: skip

    results = {
        "sets": ["dolly"], "seeds": [10, 20],
        "models": ["teacher_sft", "distill/bd", "distill/bd-p1.0", "distill/bd-chi2-off"],
        "protocols": [
            {"name": "minillm", "temperature": 1.0, "top_p": 1.0, "top_k": 0},
            {"name": "release", "temperature": 1.0, "top_p": 0.8, "top_k": 0},
        ],
        "scores": {"minillm": scores(0.0), "release": scores(5.0)},
    }  # fmt: skip
    text = "\n".join(rouge_tables(results, recipe))
    minillm = text[
        text.index("## Rouge-L, protocol minillm (temperature 1, top_p 1, top_k 0)") : text.index(
            "## Rouge-L, protocol release"
        )
    ]
    release = text[text.index("## Rouge-L, protocol release (temperature 1, top_p 0.8, top_k 0)") :]
    assert "| model | dolly | dolly (paper, its protocol) |" in minillm
    assert "| teacher_sft | 40.00 ± 0.50 | 27.6 (not stated) |" in minillm
    assert "| distill/bd-chi2-off | 29.00 ± 0.50 |  |" in minillm  # no paper number for it
    assert "| teacher_sft | 45.00 ± 0.50 | 27.6 (not stated) |" in release
    ablations = minillm[minillm.index("### Ablations") :]
    assert (
        "| distill/bd | p = 0.8, chi2 on (alpha 0.1), paper variant, outside q_min, anchor 0, D* generate "
        "| 30.00 ± 0.50 | 24.7 (release) |" in ablations
    )
    assert "| distill/bd-p1.0 | p = 1.0 | 28.00 ± 0.50 | 23.6 (release) |" in ablations
    assert "| distill/bd-chi2-off | chi2 = False | 29.00 ± 0.50 |  |" in ablations
    assert "| distill/bd-p1.0 | p = 1.0 | 33.00 ± 0.50 | 23.6 (release) |" in release[release.index("### Ablations") :]


def test_report_says_how_the_papers_bd_checkpoints_were_selected():
    """Under Table 1 and the ablation table: the paper_selection note naming the rows it covers (only
    rows with a paper number), then bdctl's own rule; nothing when the recipe has no such note."""
    from bdctl.recipe import load_recipe
    from bdctl.report import OWN_SELECTION, rouge_tables

    overrides = [
        "stages.eval.models=[teacher_sft, distill/bd, distill/bd-p1.0]",
        "stages.distill.ablations={p: [1.0]}",
        "paper_rouge_l={teacher_sft: {dolly: 27.6}, distill/bd: {dolly: 24.7}, distill/bd-p1.0: {dolly: 23.6}}",
    ]
    score = {"dolly": {"mean": 30.0, "std": 0.5, "per_seed": {}, "prompts": 32}}
    results = {
        "sets": ["dolly"], "seeds": [10], "models": ["teacher_sft", "distill/bd", "distill/bd-p1.0"],
        "protocols": [{"name": "minillm", "temperature": 1.0, "top_p": 1.0, "top_k": 0}],
        "scores": {"minillm": {m: score for m in ("teacher_sft", "distill/bd", "distill/bd-p1.0")}},
    }  # fmt: skip
    plain, _ = load_recipe("smoke", overrides)
    assert "Selection of the paper's numbers" not in "\n".join(rouge_tables(results, plain))

    noted, _ = load_recipe("smoke", [*overrides, "paper_selection={distill/bd: on test, distill/bd-p1.0: on test}"])
    lines = rouge_tables(results, noted)
    note = "Selection of the paper's numbers for distill/bd, distill/bd-p1.0: on test"
    assert lines.count(note) == 2 and lines.count(OWN_SELECTION) == 2  # Table 1 and the ablation table
    assert lines.index(note) > lines.index("## Rouge-L, protocol minillm (temperature 1, top_p 1, top_k 0)")


def test_paper_selection_must_name_a_paper_row():
    from bdctl.errors import UserError
    from bdctl.recipe import load_recipe

    with pytest.raises(UserError, match=r"paper_selection: 'distill/bd' has no paper_rouge_l entry"):
        load_recipe("smoke", ["paper_selection={distill/bd: on test}"])


def test_report_tables_and_plots_every_methods_diagnostics(tmp_path):
    """Distill runs that logged bdctl.diagnostics get a row (first / last validation) and a panel."""
    import json

    from bdctl.report import diagnostic_curves, diagnostics_table
    from bdctl.rundir import RunDir

    run = RunDir(tmp_path / "runs/smoke")

    def evals(mass):
        return [
            {"event": "eval", "step": step, "val_loss": 2.0, "rouge_l": 10.0 + step, "diag_mass_on_set": m,
             "diag_argmax_in_set": m / 2, "diag_dstar_nll": 3.0 - m, "diag_outside_share": 0.08, "diag_mean_v": -m}
            for step, m in zip((0, 100), mass, strict=True)
        ]  # fmt: skip

    for name, records in {
        "distill/bd": evals((0.75, 0.08)),
        "distill/kd": evals((0.5, 0.6)),
        "student_sft": [{"event": "eval", "step": 0, "val_loss": 2.0}],  # no diagnostics: no row
    }.items():
        (run.root / name).mkdir(parents=True)
        (run.root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = "\n".join(diagnostics_table(run))
    assert "| distill/bd | 0 / 100 | 0.750 / 0.080 | 0.375 / 0.040 | 2.250 / 2.920 | -0.75 / -0.08 | 0.080 |" in text
    assert "| distill/kd | 0 / 100 | 0.500 / 0.600 |" in text and "student_sft" not in text
    figure = diagnostic_curves(run, tmp_path / "diagnostics.png")
    assert figure is not None and figure.read_bytes()[:4] == b"\x89PNG"
    empty = RunDir(tmp_path / "empty")
    assert diagnostics_table(empty) == [] and diagnostic_curves(empty, figure) is None


JUDGE_LIKE = (
    ["model vs baseline", "win rate", "ci low", "ci high", "wins", "ties", "losses", "unparseable", "position bias"],
    [["distill/bd-released-long-name vs teacher_sft", "0.5234 ± 0.0123", 0.41234, 0.61234, 123, 45, 67, 0, "0.1234"]],
)


def test_a_table_on_a_pipe_keeps_every_number_whole(capsys, monkeypatch):
    """stdout is not a terminal (a pipe, a file, CI): rich assumed 80 columns and printed the
    judge's numeric columns as "…"; now the table keeps its natural width."""
    from bdctl.tables import print_table

    monkeypatch.delenv("COLUMNS", raising=False)
    print_table(*JUDGE_LIKE, title="judge")
    out = capsys.readouterr().out
    assert "…" not in out
    for cell in ("0.5234 ± 0.0123", "0.4123", "0.6123", "123", "67", "position bias", "unparseable"):
        assert cell in out, (cell, out)


def test_a_narrow_width_never_cuts_a_number(capsys, monkeypatch):
    from bdctl.tables import print_table

    monkeypatch.setenv("COLUMNS", "60")
    print_table(*JUDGE_LIKE)
    out = capsys.readouterr().out
    assert "…" not in out and "0.5234 ± 0.0123" in out and "0.6123" in out
