"""`bdctl recipes list` / `bdctl recipes show NAME`: what a recipe will run and whether it fits."""

from __future__ import annotations

import json
import shlex
from typing import Annotated

import typer

from bdctl.cli.common import RecipeArg, SetOpt, user_errors

EXAMPLE = """[bold]Examples[/]

  bdctl recipes list
  bdctl recipes show gpt2-1.5b-to-120m --gpus 4
"""

app = typer.Typer(help="List the recipes, or show one: resolved settings, stages, sizes.", no_args_is_help=True)


@app.command("list", epilog=EXAMPLE)
def list_() -> None:
    """The recipes in ./recipes and the project's recipes/, with their one-line descriptions.

    A recipe that does not load is listed too, marked broken with its one-line error (the others
    stay usable); the command then exits 2.
    """
    with user_errors():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from bdctl.errors import UserError
        from bdctl.recipe import load_recipe, recipe_dirs

        table = Table("name", "description", "file")
        broken = []
        for directory in recipe_dirs():
            for path in sorted(directory.glob("*.yaml")):
                try:
                    recipe, _ = load_recipe(str(path))
                except UserError as exc:
                    broken.append(path)
                    table.add_row(f"[red]{escape(path.stem)} (broken)[/]", f"[red]{escape(str(exc))}[/]", str(path))
                    continue
                table.add_row(escape(recipe.name), escape(recipe.description), str(path))
        Console().print(table)
        if broken:
            names = ", ".join(str(path) for path in broken)
            raise UserError(f"{len(broken)} recipe(s) do not load: {names} (their errors are in the table)")


@app.command("show", epilog=EXAMPLE)
def show(
    recipe: RecipeArg,
    set_: SetOpt = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs the memory estimate divides over.")] = 4,
) -> None:
    """The resolved recipe, the stages and their commands, and per-GPU memory under ZeRO-2 / ZeRO-3.

    Parameter counts need the model configs: tiny specs and local directories always work, hub
    ids only when already in the local Hugging Face cache (nothing is downloaded).
    """
    with user_errors():
        from rich.console import Console
        from rich.syntax import Syntax
        from rich.table import Table

        from bdctl.pipeline import stages
        from bdctl.recipe import dump_recipe, load_recipe
        from bdctl.sizes import (
            activation_gib,
            config_shape,
            count_parameters,
            cut_choice,
            inference_gib,
            lora_parameters,
            model_config,
            training_gib_per_gpu,
        )

        resolved, path = load_recipe(recipe, set_ or [])
        console = Console()
        console.print(f"[bold]{resolved.name}[/] ({path}): {resolved.description}")
        console.print(Syntax(dump_recipe(resolved), "yaml", theme="ansi_dark"))
        if resolved.sources:
            sourced = Table("setting", "value", "source", title="settings and where their values come from (sources:)")
            for key, value, source in resolved.sourced_settings():
                sourced.add_row(key, json.dumps(list(value) if isinstance(value, tuple) else value), source)
            console.print(sourced)

        plan = Table("stage", "command", "needs", title="stages")
        for stage in stages(resolved):
            command = stage.command.replace("RECIPE", shlex.quote(str(path)))
            plan.add_row(stage.directory, command, ", ".join(stage.needs) or "-")
        console.print(plan)

        precision = "bf16" if resolved.deepspeed.precision == "auto" else resolved.deepspeed.precision
        sizes = Table(
            "model", "parameters", "train ZeRO-2 GiB/GPU", "train ZeRO-3 GiB/GPU", "inference copy GiB",
            "activations GiB/GPU", "memory switches",
            title=f"model states on {gpus} GPUs, {precision}; activations of the largest training micro-batch at "
            f"data.max_length ({resolved.data.max_length} tokens; KV cache not included)",
        )  # fmt: skip
        cut = cut_choice(resolved)
        stages_of = resolved.stages
        micro = {  # the largest micro-batch each role trains with
            "teacher": stages_of.teacher_sft.micro_batch_size,
            "student": max(stages_of.student_sft.micro_batch_size, stages_of.distill.micro_batch_size),
        }
        for role in ("teacher", "student"):
            spec = getattr(resolved.models, role)
            label = spec.label if role == "teacher" or cut is None else f"teacher's layers {cut[0]} of {cut[1]}"
            config = model_config(spec, resolved)
            switches = ", ".join(
                [f"attention {spec.attn_implementation or 'default (sdpa)'}"]
                + (["gradient checkpointing"] if spec.gradient_checkpointing else [])
            )
            if config is None:
                sizes.add_row(f"{role}: {label}", "config not on disk", "-", "-", "-", "-", switches)
                continue
            n = count_parameters(config)
            layers, hidden, heads = config_shape(config)
            activations = activation_gib(
                layers, hidden, heads, resolved.data.max_length, micro[role], spec.gradient_checkpointing,
                spec.attn_implementation, precision,
            )  # fmt: skip
            trained = lora_parameters(config, spec.lora) if spec.lora is not None else None
            name = f"{role}: {label}"
            if (
                spec.lora is not None and trained is not None
            ):  # the adapters are extra parameters, the only trained ones
                name += f" + LoRA r {spec.lora.r} ({trained / 1e6:,.2f} M trained)"
                n += trained
            sizes.add_row(
                name, f"{n / 1e6:,.1f} M",
                f"{training_gib_per_gpu(n, gpus, 2, precision, trained):.2f}",
                f"{training_gib_per_gpu(n, gpus, 3, precision, trained):.2f}",
                f"{inference_gib(n, precision):.2f}", f"{activations:.2f}", switches,
            )  # fmt: skip
        console.print(sizes)
        overhead = _chat_prompt_overhead(resolved)
        if overhead is not None:
            data = resolved.data
            console.print(
                f"chat template: every prompt starts with {overhead} tokens (system turn "
                f"{'the template default' if data.system_prompt is None else repr(data.system_prompt)}, turn markers) "
                f"of data.max_prompt_length {data.max_prompt_length}"
            )


def _chat_prompt_overhead(recipe) -> int | None:
    """Tokens the chat template and data.system_prompt add to every prompt (an empty user turn),
    when the tokenizer is a local directory (nothing is downloaded); None otherwise."""
    from pathlib import Path

    if recipe.data.template != "chat":
        return None
    path = recipe.models.tokenizer.location or recipe.models.teacher.location
    if path is None or not Path(path).is_dir():
        return None
    from bdctl.data.template import render_chat_prompt
    from bdctl.models import load_tokenizer

    tokenizer = load_tokenizer(path, template="chat")
    return len(tokenizer(render_chat_prompt("", "", tokenizer, recipe.data.system_prompt))["input_ids"])


@app.command("cuts", epilog="Example: bdctl recipes cuts recipes/smollm2-cpu.yaml --keep 8 --examples 64")
def cuts(
    recipe: RecipeArg,
    set_: SetOpt = None,
    keep: Annotated[
        int | None, typer.Option("--keep", min=1, help="Layers each candidate keeps (default: the recipe's cut's).")
    ] = None,
    examples: Annotated[int, typer.Option("--examples", min=1, help="Validation examples to score.")] = 64,
) -> None:
    """Compare layer choices for a student cut from its teacher: the golden-answer NLL (nats per
    response token) of the whole teacher and of each cut (the recipe's own, even, ends) on the
    run's validation examples, before training. Builds the teacher and the data split if needed."""
    with user_errors():
        from rich.console import Console
        from rich.table import Table

        from bdctl.cutcompare import compare
        from bdctl.engine import quiet_deepspeed, quiet_libraries
        from bdctl.recipe import load_recipe

        quiet_libraries()
        quiet_deepspeed()  # transformers reaches DeepSpeed while loading: name the CPU before it guesses
        resolved, _ = load_recipe(recipe, set_ or [])
        console = Console()
        found = compare(resolved, keep, examples, log=lambda line: None)
        table = Table(
            "candidate",
            "layers",
            "parameters",
            "NLL",
            title=f"golden-answer NLL, {examples} validation examples at most",
        )
        for candidate in found:
            layers = f"all {len(candidate.layers)}" if candidate.name == "teacher" else str(candidate.layers)
            table.add_row(candidate.name, layers, f"{candidate.parameters:,}", f"{candidate.nll:.3f}")
        console.print(table)
