"""Shell completion (`bdctl --install-completion`): recipe names and stage names.

The callbacks run on every Tab press, so they read YAML and directories only (no torch).
"""

from pathlib import Path

import typer

from bdctl.methods import METHODS


def _method_stages() -> list[str]:
    """distill/<method> of every method of the registry (bdctl/methods.py)."""
    return [f"distill/{name}" for name in METHODS]


# Stages a model can be named by before any run exists (eval --model, reproduce --from/--only).
def _model_stages() -> list[str]:
    return ["teacher_sft", "student_sft", *_method_stages()]


def _pipeline_stages() -> list[str]:
    return ["teacher_sft", "generate", "student_sft", *_method_stages(), "eval", "judge"]


def complete_method(incomplete: str) -> list[str]:
    """`bdctl distill --method`: the methods of the registry."""
    return [n for n in METHODS if n.startswith(incomplete)]


def complete_recipe(incomplete: str) -> list[str]:
    """Recipe names from ./recipes and the project's recipes/, or .yaml files for a path."""
    from bdctl.recipe import recipe_dirs

    if "/" in incomplete or incomplete.startswith("."):
        folder = Path(incomplete).parent if not incomplete.endswith("/") else Path(incomplete)
        if not folder.is_dir():
            return []
        prefix = "" if str(folder) == "." and not incomplete.startswith("./") else f"{folder.as_posix()}/"
        found = [f"{prefix}{p.name}/" for p in folder.iterdir() if p.is_dir()]
        found += [f"{prefix}{p.name}" for p in folder.iterdir() if p.suffix in (".yaml", ".yml")]
        return sorted(p for p in found if p.startswith(incomplete))
    names = {p.stem for d in recipe_dirs() for p in [*d.glob("*.yaml"), *d.glob("*.yml")]}
    return sorted(n for n in names if n.startswith(incomplete))


def _recipe_arg(ctx: typer.Context) -> str | None:
    """The recipe argument already typed. While an option still lacks its value (`--model <Tab>`),
    click's resilient parse leaves the positional arguments in ctx.args instead of ctx.params."""
    recipe = (ctx.params or {}).get("recipe")
    if recipe:
        return str(recipe)
    positional = [a for a in ctx.args if not a.startswith("-")]
    return positional[0] if positional else None


def _run_dir(ctx: typer.Context) -> Path | None:
    """The run directory of the recipe already on the command line (its name, or run_dir)."""
    import yaml

    from bdctl.errors import UserError
    from bdctl.recipe import find_recipe

    recipe = _recipe_arg(ctx)
    if not recipe:
        return None
    try:
        raw = yaml.safe_load(find_recipe(recipe).read_text())
    except (UserError, OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict) or not raw.get("name"):
        return None
    return Path(raw.get("run_dir") or f"runs/{raw['name']}")


def _existing_stages(ctx: typer.Context, with_export: bool) -> list[str]:
    from bdctl.runs import stage_dirs

    run = _run_dir(ctx)
    if run is None or not run.is_dir():
        return []
    found = [d.relative_to(run).as_posix() for d in stage_dirs(run)]
    return [s for s in found if not with_export or (run / s / "export").is_dir()]


def complete_model_stage(ctx: typer.Context, incomplete: str) -> list[str]:
    """Stages whose export can be evaluated: the usual ones and those of the recipe's run directory."""
    names = dict.fromkeys([*_model_stages(), *_existing_stages(ctx, with_export=True)])
    return [n for n in names if n.startswith(incomplete)]


def complete_pipeline_stage(ctx: typer.Context, incomplete: str) -> list[str]:
    """Stages of the pipeline (reproduce --from / --only)."""
    names = dict.fromkeys([*_pipeline_stages(), *_existing_stages(ctx, with_export=False)])
    return [n for n in names if n.startswith(incomplete)]


def complete_ablation(ctx: typer.Context, incomplete: str) -> list[str]:
    """The recipe's stages.distill.ablations run names (bd-p1.0, bd-chi2-off, ...)."""
    from bdctl.errors import UserError
    from bdctl.recipe import load_recipe

    recipe = _recipe_arg(ctx)
    if not recipe:
        return []
    try:
        loaded, _ = load_recipe(recipe)
    except UserError:
        return []
    return [n for n in loaded.stages.distill.ablations.runs() if n.startswith(incomplete)]
