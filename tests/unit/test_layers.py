"""bdctl's layers (docs/architecture.md §1) as a test: imports point down, and there is no cycle.

The import graph is read from the source (every `import`/`from ... import` of a bdctl module,
top-level or inside a function), so a function-local import that dodges a cycle counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bdctl

PACKAGE = Path(bdctl.__file__).parent

# Top to bottom: a module may import modules of its own layer or of a layer below, and the leaves.
LAYERS: list[tuple[str, ...]] = [
    ("bdctl.__main__", "bdctl.cli"),
    ("bdctl.submit", "bdctl.launch", "bdctl.pipeline", "bdctl.reproduce", "bdctl.report"),
    ("bdctl.worker",),
    ("bdctl.stages",),
    ("bdctl.training", "bdctl.selection", "bdctl.answers", "bdctl.evalunits", "bdctl.sampling", "bdctl.topp",
     "bdctl.cache", "bdctl.rollouts", "bdctl.judges", "bdctl.metrics", "bdctl.report_sparsity", "bdctl.distill_data"),
    ("bdctl.engine", "bdctl.models", "bdctl.sizes", "bdctl.modelcard", "bdctl.data", "bdctl.gguf_models", "bdctl.cut"),
    ("bdctl.objectives",),
]  # fmt: skip
# Records and helpers every layer may use; they import nothing but other leaves. The recipe is one:
# the CLI loads it first, but it is data every layer reads (recipe/ imports only its schema).
LEAVES = (
    "bdctl", "bdctl.errors", "bdctl.rundir", "bdctl.recipe", "bdctl.recipe.schema", "bdctl.tracking", "bdctl.tables",
    "bdctl.job", "bdctl.trackers", "bdctl.runs",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """bdctl module -> the bdctl modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bdctl"):
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def is_in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def where(module: str) -> int | str:
    """The layer index of a module, or "leaf"."""
    if module in LEAVES:
        return "leaf"
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer if is_in(module, prefix)]
    assert matches, f"{module} is in no layer: add it to LAYERS or LEAVES (and to docs/architecture.md)"
    return max(matches)[1]  # the most specific prefix wins


def test_every_import_points_down_or_at_a_leaf():
    upward = []
    for module, targets in imports().items():
        for target in targets:
            mine, theirs = where(module), where(target)
            if theirs == "leaf":
                continue
            if mine == "leaf" or theirs < mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(sorted(upward))


def test_a_stage_is_never_a_library_for_another_stage():
    crossing = [
        f"{module} imports {target}"
        for module, targets in imports().items()
        if is_in(module, "bdctl.stages")
        for target in targets
        if is_in(target, "bdctl.stages") and target != "bdctl.stages"
    ]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycle():
    graph = imports()
    # Tarjan's strongly connected components; any component with two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_function_local_imports(tmp_path):
    """The graph includes imports inside functions (the ones that used to hide cycles)."""
    graph = imports()
    assert "bdctl.submit" in graph["bdctl.cli.sft"]  # imported inside the command function
