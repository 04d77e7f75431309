"""Recipes: find a YAML file, apply `--set` overrides, validate, and say exactly what is wrong.

    recipe = load_recipe("smoke", ["stages.teacher_sft.lr=1e-3"])

Errors name the file (or the `--set` that caused them) and the key path:
    recipes/x.yaml: stages.teacher_sft.lr: expected a number, got 'fast'
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from bdctl.errors import UserError, decode_utf8, not_a_regular_file
from bdctl.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "find_recipe", "recipe_dirs", "dump_recipe"]

# Where recipes are looked up by name: the working directory's recipes/ first, then the project's.
_PROJECT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def recipe_dirs() -> list[Path]:
    dirs = [Path.cwd() / "recipes", _PROJECT_RECIPES]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def find_recipe(name_or_path: str) -> Path:
    """A recipe by path (`recipes/tiny.yaml`) or by name (`tiny`, looked up in recipes/)."""
    path = Path(name_or_path)
    problem = not_a_regular_file(path)
    if problem is None:
        return path
    if path.is_dir():
        raise UserError(f"{name_or_path}: a directory, not a recipe file (expected a .yaml file or a recipe name)")
    if problem != "file not found":  # a FIFO would block the read, a link loop is not "not found"
        raise UserError(f"{name_or_path}: {problem}")
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise UserError(f"{name_or_path}: recipe file not found")
    for directory in recipe_dirs():
        for candidate in (directory / f"{name_or_path}.yaml", directory / f"{name_or_path}.yml"):
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for d in recipe_dirs() for p in d.glob("*.y*ml")})
    raise UserError(f"{name_or_path}: no such recipe file or name (known names: {', '.join(known) or 'none'})")


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Load, override and validate a recipe; returns it with the file it came from."""
    path = find_recipe(name_or_path)
    try:
        raw = yaml.safe_load(decode_utf8(path.read_bytes(), path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of keys, got {type(raw).__name__}")
    overridden = {}
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_path(raw, key, value, item)
        overridden[key] = item
    try:
        return Recipe.model_validate(raw), path
    except ValidationError as exc:
        raise UserError(_describe(exc, path, overridden)) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled in), as saved into run directories."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string and let validation judge it
    return key.strip(), value


def _set_path(raw: dict, key: str, value: Any, item: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {item}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


_EXPECTED = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping of keys",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "string_too_short": "expected a non-empty string",
    "bool_for_number": "expected a number",
}


def _describe(exc: ValidationError, path: Path, overridden: dict[str, str]) -> str:
    """The first validation error as one line: source, key path, what was expected, what was given."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    source = str(path)
    for over_key, item in overridden.items():
        if key == over_key or key.startswith(over_key + ".") or over_key.startswith(key + "."):
            source = f"{path} (--set {item})"
    kind, given = error["type"], error.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        message = f"unknown key ({hint}expected one of: {', '.join(allowed)})"
    elif kind == "missing":
        message = "missing required key"
    elif kind in _EXPECTED:
        message = f"{_EXPECTED[kind]}, got {_as_written(given)}"
    elif kind == "literal_error":
        message = f"expected one of {error['ctx']['expected']}, got {given!r}"
    elif kind == "value_error":
        message = str(error["ctx"]["error"])
    else:
        message = f"{error['msg'][0].lower()}{error['msg'][1:]}, got {given!r}"
    return f"{source}: {key or '(top level)'}: {message}" if key else f"{source}: {message}"


def _as_written(value: Any) -> str:
    """A value as the user wrote it in YAML (`true`, not Python's `True`)."""
    if isinstance(value, (bool, list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return repr(value)


def _allowed_keys(loc: list[str]) -> list[str]:
    """Field names of the section at `loc` (numeric parts index into lists)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if part.isdigit():
            continue
        annotation = model.model_fields[part].annotation
        model = next((t for t in _flatten(annotation) if isinstance(t, type) and issubclass(t, BaseModel)), model)
    return list(model.model_fields)


def _flatten(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    return [t for arg in args for t in _flatten(arg)]
