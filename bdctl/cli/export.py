"""`bdctl export RUN STAGE DIR`: a finished stage's model, copied out as a plain Hugging Face directory with its
model card (README.md with the hub's metadata) and a tokenizer that carries the prompt format it was trained with,
ready for `huggingface-cli upload`. Imports no torch: it copies files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bdctl.cli.common import user_errors

EXAMPLE = """[bold]Examples[/]

  bdctl export runs/tiny distill/bd exports/tiny-bd
  bdctl export runs/tiny distill/bd exports/tiny-bd-release --protocol release   # export-release/
  huggingface-cli upload my-name/tiny-bd exports/tiny-bd                           # push it to the hub
"""

#: The stages that export a model (distill/<method or ablation> besides these).
MODEL_STAGES = ("teacher_sft", "student_sft")


def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>).", show_default=False)],
    stage: Annotated[
        str, typer.Argument(help="teacher_sft, student_sft or distill/<name> (e.g. distill/bd).", show_default=False)
    ],
    out_dir: Annotated[Path, typer.Argument(help="New (or empty) directory to write.", show_default=False)],
    protocol: Annotated[
        str | None,
        typer.Option(
            "--protocol", help="The export kept for this eval protocol (export-<protocol>/, select_each_protocol)."
        ),
    ] = None,
) -> None:
    """Copy a finished stage's exported model (weights, config, tokenizer, model card) to DIR."""
    with user_errors():
        copied = export_stage(run_dir, stage, out_dir, protocol)
        size = sum(p.stat().st_size for p in copied.iterdir() if p.is_file())
        print(f"exported {run_dir / stage} to {copied} ({size / 2**20:.1f} MiB)")
        print(f"push it to the hub with: huggingface-cli upload <your-name>/<model-name> {copied}")


def export_stage(run_dir: Path, stage: str, out_dir: Path, protocol: str | None = None) -> Path:
    """The copy of `run_dir/stage`'s export in `out_dir`; one line (UserError) for a run, stage or
    directory that does not fit. Written beside `out_dir` first and renamed: all or nothing."""
    import shutil

    from bdctl.errors import UserError
    from bdctl.rundir import manifest, read_json, replace_dir
    from bdctl.runs import find_runs, stage_dirs

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if find_runs(run_dir) != [run_dir]:
        raise UserError(f"{run_dir}: not a run directory (a run holds stage directories with a job.json)")
    exporting = [
        d.relative_to(run_dir).as_posix()
        for d in stage_dirs(run_dir)
        if d.name in MODEL_STAGES or d.parent.name == "distill"
    ]
    finished = [name for name in exporting if manifest(run_dir / name) is not None]
    choices = ", ".join(finished) or "none yet"
    if stage not in exporting:
        raise UserError(f"{run_dir}: no stage {stage!r} that exports a model (finished ones: {choices})")
    if stage not in finished:
        raise UserError(f"{run_dir / stage}: not finished (no MANIFEST.json); finished stages: {choices}")
    name = f"export-{protocol}" if protocol else "export"
    source = run_dir / stage / name
    if not source.is_dir():
        kept = sorted(p.name for p in (run_dir / stage).glob("export*") if p.is_dir())
        raise UserError(f"{source}: no such export (this stage has: {', '.join(kept) or 'none'})")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: a file, not a directory; name a new directory to export to")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: not empty; name a new (or empty) directory to export to")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    _add_prompt_format(tmp, read_json(run_dir / stage / "job.json"))
    replace_dir(tmp, out_dir)  # an empty out_dir is replaced by the copy
    return out_dir


def _add_prompt_format(directory: Path, job: dict) -> None:
    """An export of a run prepared before bdctl wrote its prompt format into the tokenizer
    (data/prepare.py) gets it here, as a chat_template.jinja: the template the model was trained with."""
    import json

    from bdctl.data.template import jinja_chat_template
    from bdctl.recipe.schema import Template

    config = directory / "tokenizer_config.json"
    has_template = (directory / "chat_template.jinja").is_file() or (
        config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    )
    template = job["recipe"]["data"].get("template")
    if has_template or template == "chat":  # chat: the tokenizer's own template, saved with it
        return
    own = Template(**template) if isinstance(template, dict) else None
    (directory / "chat_template.jinja").write_text(jinja_chat_template(own), encoding="utf-8")
