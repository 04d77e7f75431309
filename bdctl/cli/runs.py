"""`bdctl runs [RUN_DIR]`: the runs and their stages, finished or not (and why not), wall time and
headline score, as a table or as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bdctl.cli.common import user_errors

EXAMPLE = """[bold]Examples[/]

  bdctl runs                      # every run under ./runs
  bdctl runs runs/tiny            # one run
  bdctl runs --json | jq '.[0].stages[] | select(.state != "finished")'
"""


def runs(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run directory (runs/<name>), or a directory of runs.", show_default="runs"),
    ] = Path("runs"),
    json_: Annotated[bool, typer.Option("--json", help="Print JSON (a list of runs, each with its stages).")] = False,
) -> None:
    """Each run's stages: finished, stale (finished, but an upstream stage, the data split or a data
    file was made again or changed since), running (who holds the stage's lock), failed (the first line of
    logs/error-rank*.txt) or interrupted at step N (and the checkpoint a rerun resumes from), the wall
    time metrics.jsonl covers (summed over attempts; eval and judge: from the job file to the
    manifest), the disk the stage directory holds, and the headline score: the selected validation
    score, eval's best model, judge's win rates."""
    with user_errors():
        import json

        from bdctl.errors import UserError
        from bdctl.runs import as_json, find_runs, format_bytes, format_wall, run_status

        found = find_runs(run_dir)
        if not found:
            raise UserError(f"{run_dir}: no run directories here (a run holds stage directories with a job.json)")
        statuses = [run_status(run) for run in found]
        if json_:
            print(json.dumps(as_json(statuses), indent=2))
            return
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        colours = {"finished": "green", "stale": "magenta", "running": "cyan", "failed": "red", "interrupted": "yellow"}
        table = Table("run", "stage", "state", "why / who", "wall", "disk", "headline")
        for status in statuses:
            for index, stage in enumerate(status.stages):
                colour = colours.get(stage.state, "dim")
                table.add_row(
                    escape(status.run) if index == 0 else "", escape(stage.stage), f"[{colour}]{stage.state}[/]",
                    escape(stage.detail), format_wall(stage.wall_s), format_bytes(stage.disk_bytes),
                    escape(stage.headline),
                )  # fmt: skip
            table.add_section()
        Console(highlight=False).print(table)
