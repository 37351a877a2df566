"""The import graph of ``scott_kernels`` and ``mimjepa``: no cycle between modules, and the kernel
package never imports the training loop (mimjepa builds on scott_kernels, not the reverse).

Every module is parsed (``ast``): ``import a.b``, ``from a import b`` (b a module or a name),
relative imports, and imports inside functions, classes and ``if`` blocks all count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"scott_kernels": ROOT / "scott_kernels", "mimjepa": ROOT / "python" / "mimjepa"}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the two packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` (and any ``mimjepa``/``scott_kernels`` name, known or not) that
    ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[:-(node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets.add(base)
            for alias in node.names:       # `from pkg import submodule`
                if f"{base}.{alias.name}" in known:
                    targets.add(f"{base}.{alias.name}")
    edges = set()
    for target in targets:
        # `import a.b.c` executes a, a.b and a.b.c: an edge to each (the parents run their __init__)
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in known or parts[0] in PACKAGES:
                edges.add(name)
    # A module's own ancestor packages are initialised before it runs (Python imports a package's
    # __init__ first), so `from . import sibling` is an edge to the sibling, not to the package.
    parts = module.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    return edges - ancestors - {module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imported(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_every_module_and_its_imports():
    graph = _graph()
    assert "scott_kernels.timm_models" in graph and "mimjepa.models" in graph and "scott_kernels.vit" in graph
    # mimjepa builds on the shared SCOTT ViT pieces
    assert "scott_kernels.vit" in graph["mimjepa.models"]
    assert "scott_kernels.vit" in graph["scott_kernels.timm_models"]
    # relative imports resolve to the sibling modules; other packages' __init__ counts
    assert "scott_kernels.module" in graph["scott_kernels.timm_models"]
    assert "scott_kernels" in graph["mimjepa.models"]


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles between modules: {cycles}"


def test_scott_kernels_never_imports_mimjepa():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "mimjepa")
                 for name, targets in _graph().items() if name.split(".")[0] == "scott_kernels"}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"scott_kernels modules importing the training loop: {offenders}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The cycle finder and the parser on a made-up package: a function-level relative import
    closing a cycle is found."""
    pkg = tmp_path / "scott_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import thing\n    import mimjepa.models\n")
    modules = {"scott_kernels": pkg / "__init__.py", "scott_kernels.a": pkg / "a.py", "scott_kernels.b": pkg / "b.py"}
    known = set(modules) | {"mimjepa", "mimjepa.models"}
    graph = {name: _imported(name, path, known) for name, path in modules.items()}
    assert graph["scott_kernels.b"] >= {"scott_kernels.a", "mimjepa", "mimjepa.models"}
    assert "scott_kernels" not in graph["scott_kernels.a"]   # its own package
    assert _cycles(graph) == [["scott_kernels.a", "scott_kernels.b"]]
