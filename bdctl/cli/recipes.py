"""`bdctl recipes list` / `bdctl recipes show NAME`: what a recipe will run and whether it fits."""

from __future__ import annotations

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
        from bdctl.sizes import count_parameters, inference_gib, model_config, training_gib_per_gpu

        resolved, path = load_recipe(recipe, set_ or [])
        console = Console()
        console.print(f"[bold]{resolved.name}[/] ({path}): {resolved.description}")
        console.print(Syntax(dump_recipe(resolved), "yaml", theme="ansi_dark"))

        plan = Table("stage", "command", "needs", title="stages")
        for stage in stages(resolved):
            plan.add_row(stage.directory, stage.command.replace("RECIPE", str(path)), ", ".join(stage.needs) or "-")
        console.print(plan)

        precision = "bf16" if resolved.deepspeed.precision == "auto" else resolved.deepspeed.precision
        sizes = Table(
            "model", "parameters", "train ZeRO-2 GiB/GPU", "train ZeRO-3 GiB/GPU", "inference copy GiB",
            title=f"model states on {gpus} GPUs, {precision} (activations and KV cache not included)",
        )  # fmt: skip
        for role in ("teacher", "student"):
            spec = getattr(resolved.models, role)
            config = model_config(spec, resolved)
            if config is None:
                sizes.add_row(f"{role}: {spec.label}", "config not on disk", "-", "-", "-")
                continue
            n = count_parameters(config)
            sizes.add_row(
                f"{role}: {spec.label}", f"{n / 1e6:,.1f} M",
                f"{training_gib_per_gpu(n, gpus, 2, precision):.2f}",
                f"{training_gib_per_gpu(n, gpus, 3, precision):.2f}",
                f"{inference_gib(n, precision):.2f}",
            )  # fmt: skip
        console.print(sizes)
