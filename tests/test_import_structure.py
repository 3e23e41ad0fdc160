"""The package's import structure: every module imports on its own, and the module-level imports between the
package's modules form no cycle (docs/architecture.md: each layer imports only the ones before it)."""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import defocus_mllm

PACKAGE = "defocus_mllm"
ROOT = Path(defocus_mllm.__file__).parent

# Modules built on an optional dependency that they import unguarded (lmms-eval loads the plugin only where it is
# installed, through its entry point): without that dependency, importing them must fail by naming it.
NEEDS = {"defocus_mllm.evaluation.lmms_eval_plugin": "lmms_eval"}


def package_modules() -> list[str]:
    """Every module and subpackage of `defocus_mllm`, the package itself first; not the `__main__` modules, which
    `python -m` runs as scripts and nothing imports."""
    return [PACKAGE] + sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], prefix=f"{PACKAGE}.")
                              if not m.name.endswith(".__main__"))


# Run in a fresh interpreter: before each import, every `defocus_mllm` module is dropped from `sys.modules`, so that
# each module is imported as if alone (its own imports pull in whatever it needs, nothing more is loaded).
_IMPORT_EACH = r"""
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "defocus_mllm" or m.startswith("defocus_mllm.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as error:
        failures[name] = f"{type(error).__name__}: {error}"
print(json.dumps(failures))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = package_modules()
    assert len(modules) > 40 and {"defocus_mllm.ops.registry", "defocus_mllm.encoder.mixers.base"} <= set(modules)
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(modules)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    for module, dependency in NEEDS.items():
        if importlib.util.find_spec(dependency) is None:
            assert dependency in failures.pop(module, ""), f"{module} should fail only for want of {dependency}"
    assert failures == {}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a `from ... import` statement reads."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _module_level_imports(tree: ast.Module):
    """The import statements a module runs when imported: its top level and the bodies of top-level `try` / `if`,
    except `if TYPE_CHECKING:` blocks (never run); imports inside functions and classes run later."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]


def import_graph() -> dict[str, set[str]]:
    """`module -> the package's modules it imports at module level`, read statically. `from pkg import name` reads
    `pkg.name` when that is a module, else `pkg` (a name re-exported by the package's `__init__`)."""
    modules = set(package_modules())
    graph: dict[str, set[str]] = {}
    for module in modules:
        path = ROOT.parent.joinpath(*module.split("."))
        is_package = path.is_dir()
        source = path / "__init__.py" if is_package else path.with_suffix(".py")
        edges = set()
        for node in _module_level_imports(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != module}
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as `[a, b, ..., a]`, or `[]` when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_is_read_from_the_sources():
    graph = import_graph()
    # edges this project relies on, from each form of import statement
    assert "defocus_mllm.ops.registry" in graph["defocus_mllm.ops.selective_scan"]  # from .registry import ...
    assert "defocus_mllm.ops" in graph["defocus_mllm.encoder.mixers.mamba"]  # from ...ops import <re-exported name>
    assert "defocus_mllm.ops.selective_scan" in graph["defocus_mllm.ops.triton_scan"]
    assert "defocus_mllm.encoder.mixers.attention" in graph["defocus_mllm.encoder.mixers"]


def test_the_package_imports_form_no_cycle():
    assert find_cycle(import_graph()) == []


def test_the_encoder_config_imports_nothing_of_the_model():
    # anywhere in the module, functions included, except the module `__getattr__` that keeps the names moved out of
    # it (FILTER_MODES, ATTENTION_BACKENDS) importable from their old path
    config = "defocus_mllm.encoder.configuration_defocus"
    tree = ast.parse((ROOT / "encoder" / "configuration_defocus.py").read_text())
    kept = [node for node in tree.body if not (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")]
    imported = set()
    for node in (node for top in kept for node in ast.walk(top)):
        if isinstance(node, ast.ImportFrom):
            imported.add(_resolve(config, False, node))
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert not {name for name in imported if name.split(".")[0] == PACKAGE}, sorted(imported)
