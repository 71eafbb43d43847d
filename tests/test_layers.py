"""The harness's layers follow the flow of data, and no lower layer imports a higher one.

    foundation (config, metrics, provenance) -> grid -> store -> launch -> data -> measure -> run -> report -> cli

Every ``import`` is counted, at module level or inside a function. Within a layer, modules may import each
other, but the module graph has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[1] / "harness"
LAYERS = (
    ("harness.config", "harness.metrics", "harness.provenance", "harness.text"),
    ("harness.grid",),
    ("harness.store",),
    ("harness.launch",),
    ("harness.data",),
    ("harness.measure",),
    ("harness.run",),
    ("harness.report",),
    ("harness.cli",),
)
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(HARNESS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS in {__file__}")


def _imports(path: Path, module: str) -> set:
    """Modules of harness that ``path`` imports (``from harness.x import y`` counts harness.x.y when that is
    a module, else harness.x)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("harness"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("harness"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _exists(candidate) else base)
    return {m for m in found if m != module}


def _exists(module: str) -> bool:
    path = HARNESS.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted(HARNESS.rglob("*.py"))}


def test_no_lower_layer_imports_a_higher_one():
    wrong = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in _graph().items()
        for d in deps
        if _layer(d) > _layer(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = _graph()
    state: dict = {}

    def visit(module, stack):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if dep.startswith(module + "."):  # a package's __init__ re-exporting its own modules
                continue
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_modules_stay_small():
    """A module over MAX_LINES says why at its top (a ``Length:`` paragraph in its docstring)."""
    long = [
        f"{p.relative_to(HARNESS.parent)}: {n} lines"
        for p in sorted(HARNESS.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
        and "\nLength: " not in (ast.get_docstring(ast.parse(p.read_text())) or "")
    ]
    assert not long, "\n".join(long)


def test_planning_and_reporting_do_not_load_torch():
    """--dry-run, --status and --report work on a login node without loading torch (seconds, not minutes)."""
    code = (
        "import sys, harness.cli, harness.grid, harness.store, harness.launch, harness.report.markdown; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=HARNESS.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
