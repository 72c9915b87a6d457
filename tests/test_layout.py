"""The package's layout rules, checked from the sources (DESIGN.md "Layers", README "Layout"):

- the import graph of ``seqrec_fast`` (``kernels/`` included, as ``seqrec_fast.kernels``) has no
  cycle, counting imports inside functions too;
- no module outside ``seqrec_fast/ops`` imports a private name of ``ops`` (a ``_module`` or a
  ``_name``);
- the README's layout section names every module and folder of the package, and nothing else.
"""
from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "seqrec_fast"


def _modules() -> dict:
    """{dotted module name: path} for seqrec_fast/** and kernels/** (as seqrec_fast.kernels)."""
    out = {}
    for base, prefix in ((os.path.join(ROOT, PKG), PKG),
                         (os.path.join(ROOT, "kernels"), PKG + ".kernels")):
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            for f in files:
                if not f.endswith(".py"):
                    continue
                name = ".".join([prefix] + parts + ([] if f == "__init__.py" else [f[:-3]]))
                out[name] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, modules: dict):
    """Yield (target module, imported names or None) for every import in the file."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PKG):
                    yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith(PKG):
                continue
            names = [a.name for a in node.names]
            for n in names:              # `from pkg import submodule`
                if f"{mod}.{n}" in modules:
                    yield f"{mod}.{n}", None
            plain = [n for n in names if f"{mod}.{n}" not in modules]
            if plain or not names:
                yield mod, plain


def _graph():
    modules = _modules()
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for target, _ in _imports(m, path, modules):
            if target in modules and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph: dict) -> list:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail():
    # the graph sees real imports, function-level ones included, and a cycle is found
    graph = _graph()
    assert "seqrec_fast.ops.routing" in graph["seqrec_fast.nn.routing"]
    assert "seqrec_fast._checks" in graph["seqrec_fast.nn.routing"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_ops_names_outside_ops():
    modules = _modules()
    bad = []
    for m, path in modules.items():
        if m.startswith(PKG + ".ops"):
            continue
        for target, names in _imports(m, path, modules):
            if not target.startswith(PKG + ".ops"):
                continue
            private_mod = any(p.startswith("_") and p != "__init__"
                              for p in target.split(".")[2:])
            private_names = [n for n in (names or []) if n.startswith("_")]
            if private_mod or private_names:
                bad.append(f"{m}: {target} {private_names or ''}")
    assert not bad, "private ops names used outside ops/:\n" + "\n".join(bad)


def _readout_layout_section() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"^## Layout\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Layout' section"
    return m.group(1)


def test_readme_layout_matches_the_tree():
    section = _readout_layout_section()
    named = set(re.findall(r"`([A-Za-z0-9_./]+\.(?:py|sh|h|cuh|cpp|cu)|[A-Za-z0-9_./]+/)`",
                           section))
    # what the tree holds: every Python module of the package and kernels/, every folder of
    # csrc/, tests/ and bench/ scripts are named by pattern in the README, not one by one
    want = set()
    for base in (PKG, "kernels"):
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, base)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, ROOT).replace(os.sep, "/")
            for f in files:
                if f.endswith(".py") and f != "__init__.py":
                    want.add(f"{rel}/{f}")
    for d in sorted(os.listdir(os.path.join(ROOT, "csrc"))):
        if os.path.isdir(os.path.join(ROOT, "csrc", d)):
            want.add(f"csrc/{d}/")
    missing = sorted(want - named)
    stale = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p.rstrip("/"))))
    assert not missing, f"README layout section misses {missing}"
    assert not stale, f"README layout section names what is not in the tree: {stale}"
