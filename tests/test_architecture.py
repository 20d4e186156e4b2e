"""The layout is the architecture, and this test keeps it so: the core imports nothing else of
onnxprune, no module imports another in a cycle, no module reaches into another's private
names or stores things in an object's __dict__."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where each part of the installed package lives in the repository.
SOURCES = {"onnxprune": ROOT / "onnxprune", "onnxprune.passes": ROOT / "passes"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth,
    except under `if TYPE_CHECKING:` (annotations only)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [alias.name for alias in child.names]
                submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
                found.extend((m, []) for m in submodules)
                rest = [n for n in names if f"{base}.{n}" not in known]
                if rest or not submodules:
                    found.append((base, rest))
            visit(child)

    visit(ast.parse(path.read_text()))
    return [(m, n) for m, n in found if m == "onnxprune" or m.startswith("onnxprune.")]


def graph() -> dict[str, set[str]]:
    known = set(modules())
    edges = {}
    for name, path in modules().items():
        edges[name] = {target if target in known else _owner(target, known) for target, _ in imports(name, path, known)}
    return edges


def _owner(target: str, known: set[str]) -> str:
    while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    assert _cycles(graph()) == []


def test_the_core_imports_nothing_but_the_core():
    bad = {name: sorted(t for t in targets if not t.startswith("onnxprune.core"))
           for name, targets in graph().items() if name.startswith("onnxprune.core")}
    assert {name: targets for name, targets in bad.items() if targets} == {}


def test_no_module_takes_another_modules_private_names():
    known = set(modules())
    bad = []
    for name, path in modules().items():
        for target, names in imports(name, path, known):
            bad.extend(f"{name} takes {target}.{n}" for n in names if n.startswith("_") and n != "__version__")
    assert bad == []


def test_no_side_channels_through_dunder_dict():
    bad = [name for name, path in modules().items() if "__dict__" in path.read_text()]
    assert bad == []


def test_the_checker_finds_what_it_is_meant_to_find():
    """The checks above can fail: a cycle, a core module reaching out, a private import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    known = set(modules())
    sample = ROOT / "tests" / "_architecture_sample.py"
    sample.write_text("from onnxprune.core.plan import _is_int\nfrom onnxprune import api\n")
    try:
        found = imports("onnxprune.core.sample", sample, known)
    finally:
        sample.unlink()
    assert ("onnxprune.core.plan", ["_is_int"]) in found and ("onnxprune.api", []) in found
