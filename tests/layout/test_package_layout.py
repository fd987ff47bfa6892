"""The package layout keeps its promises (issue 14): data flows one way, names do not collide.

Read statically from the source (ast), so every import counts, the lazy ones inside functions included:
a cycle through a function-level import is still a cycle a reader has to hold in their head.
"""

from __future__ import annotations

import ast
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

import oreal
from oreal import _compat

PACKAGE = Path(oreal.__file__).parent


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The oreal modules `path` imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    # A package's __init__ that only re-exports lazily (PEP 562 tables) is not an edge back into its modules:
    # count only real import statements, which imported_modules already does.
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def test_no_import_cycles():
    graph = import_graph()
    # a package importing its own submodule (to re-export) is not a cycle a reader has to follow
    edges = {a: {b for b in bs if not (b.startswith(a + ".") and (PACKAGE.parent / a.replace(".", "/") / "__init__.py").exists())}
             for a, bs in graph.items()}
    edges = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in edges.items()}  # submodule -> own package
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_check_sees_a_cycle(tmp_path):
    """The checker itself must be able to fail: two modules importing each other inside functions."""
    (tmp_path / "a.py").write_text("def f():\n    from oreal.runtime import build\n")
    graph = {"x.a": imported_modules(tmp_path / "a.py", "x.a", {"oreal.runtime.build"})}
    assert graph["x.a"] == {"oreal.runtime.build"}


def test_no_two_modules_share_a_basename():
    by_base = defaultdict(list)
    for name, path in module_files().items():
        if path.name != "__init__.py":
            by_base[path.name].append(name)
    assert {b: n for b, n in by_base.items() if len(n) > 1} == {}


def test_no_two_public_classes_share_a_name():
    by_name = defaultdict(list)
    for name, path in module_files().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                by_name[node.name].append(name)
    assert {c: m for c, m in by_name.items() if len(m) > 1} == {}


def test_layers_flow_one_way():
    """Data flows prompts -> rollouts -> verdicts -> samples -> batches -> losses -> update: the lower layers
    (kernels-facing ops, judging, data, model, rollout) never import the runtime, the algorithms or the demo,
    and nothing but the demo imports the demo."""
    graph = import_graph()
    lower = ("oreal.ops", "oreal.reward", "oreal.data", "oreal.model", "oreal.rollout")
    upper = ("oreal.runtime", "oreal.algorithms", "oreal.demo")
    wrong = [(a, b) for a, bs in graph.items() for b in bs
             if a.startswith(lower) and b.startswith(upper)]
    wrong += [(a, b) for a, bs in graph.items() for b in bs
              if b.startswith("oreal.demo") and not a.startswith("oreal.demo")]
    wrong += [(a, b) for a, bs in graph.items() for b in bs
              if a.startswith("oreal.runtime") and b.startswith("oreal.algorithms")]
    assert wrong == []


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_old_import_paths_warn_and_give_the_same_module(old):
    import importlib
    import sys

    parent_name, _, child = old.rpartition(".")
    parent = importlib.import_module(parent_name)
    missing = object()
    before = parent.__dict__.get(child, missing)
    sys.modules.pop(old, None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(_compat.MOVED[old])
        assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    finally:
        # importing binds the old name on its package (e.g. `oreal.reward.judge`, which is also a function's
        # name there): put back what was bound, so later tests in this process see the package as it was
        sys.modules.pop(old, None)
        if before is missing:
            parent.__dict__.pop(child, None)
        else:
            setattr(parent, child, before)


def test_package_exports_are_functions_whatever_was_imported_first():
    """`from oreal.reward import judge` is the function even after its module was imported directly (the
    module was called `judge.py` until 0.1, and a direct import made the name mean the module)."""
    import oreal.reward
    import oreal.reward.judging
    from oreal.reward import judge, judge_batch

    assert callable(judge) and callable(judge_batch) and oreal.reward.judge is oreal.reward.judging.judge


def test_renamed_names_warn():
    import oreal.algorithms.advantages as advantages
    import oreal.data as data
    import oreal.reward as reward

    with pytest.warns(DeprecationWarning, match="TrainingSample"):
        assert data.Rollout is data.TrainingSample
    with pytest.warns(DeprecationWarning, match="oreal.algorithms.advantages"):
        assert reward.rloo_advantages is advantages.rloo_advantages
