"""The import rules of the design: the library's numpy side (and the registry the server uses) never
pulls in torch, hydra or wandb; and the import graph of twin_ml, training and serving has no
circles and goes down the layers."""

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

CODE = """
import sys, tempfile, twin_ml, twin_ml.physics, twin_ml.data, twin_ml.registry
from twin_ml.data import Dataset, ScenarioDesign, generate_dataset
from twin_ml.data.plots import plot_dataset
res = generate_dataset(twin_ml.physics.make_system('pendulum'), ScenarioDesign(t_end=1.0),
                       n_scenarios=4, seed=0, out_dir=tempfile.mkdtemp(), workers=2, shard_size=2,
                       progress=False)
plot_dataset(Dataset.open(res.path), res.path / 'overview.png')
bad = [m for m in ('torch', 'lightning', 'hydra', 'wandb', 'training', 'serving')
       if m in sys.modules]
print(','.join(bad))
"""


def test_physics_and_data_do_not_import_torch_hydra_wandb_or_upper_layers():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported: {r.stdout.strip()}"


# ---- the import graph: no circles, and imports go down the layers --------------------------------
# An `ast` walk over every module of twin_ml, training and serving: each `import`, `from ... import`
# (inside functions too) and `importlib.import_module("literal")` is an edge. `from pkg import
# name` is an edge to the submodule pkg.name when that is a module, else to pkg itself (its
# __init__, whose own re-exports are edges too). A package's parent is not an edge of its
# submodules (Python imports it first, but nothing circular follows from that).


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("twin_ml", "training", "serving")


def package_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every module of `packages` under `root`."""
    mods = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _literal_import_module(node: ast.AST) -> str | None:
    """ "x.y" of `importlib.import_module("x.y")` / `import_module("x.y")`."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
    arg = node.args[0]
    if name == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def import_graph(mods: dict[str, Path]):
    """({module: {imported module: line}}, [(module, imported module, name, line)] of the names
    imported from another module of the graph)."""
    graph: dict[str, dict[str, int]] = {}
    names: list[tuple[str, str, str, int]] = []
    for mod, path in mods.items():
        edges: dict[str, int] = {}
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

        def add(target: str, line: int, mod=mod, edges=edges) -> None:
            while target and target not in mods:  # `import a.b.c`: the deepest module named
                target = target.rpartition(".")[0]
            if target and target != mod:
                edges.setdefault(target, line)

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package, up level - 1
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    if f"{base}.{alias.name}" in mods:
                        add(f"{base}.{alias.name}", node.lineno)
                    else:
                        add(base, node.lineno)
                        if base in mods and base != mod:
                            names.append((mod, base, alias.name, node.lineno))
            elif (literal := _literal_import_module(node)) is not None:
                add(literal, node.lineno)
        graph[mod] = edges
    return graph, names


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (the graph is a few hundred modules)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        start = min(group)
        prev: dict[str, str] = {}
        queue = deque([start])
        while start not in prev:  # breadth first within the group: the shortest way back
            v = queue.popleft()
            for w in sorted(graph[v]):
                if w in group and w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = [start]
        v = prev[start]
        while v != start:
            path.append(v)
            v = prev[v]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def describe(cycle: list[str], graph) -> str:
    return (
        " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:]))
        + f" -> {cycle[-1]}"
    )


def upward(graph: dict[str, dict[str, int]]) -> list[str]:
    """Imports against the layers of DESIGN.md: twin_ml never imports training or serving,
    serving never imports training, and a training module imports no other training module but
    training._common (which imports none)."""
    bad = []
    for a, edges in graph.items():
        top = a.split(".")[0]
        for b, line in edges.items():
            to = b.split(".")[0]
            if (
                (top == "twin_ml" and to in ("training", "serving"))
                or (top == "serving" and to == "training")
                or (top == to == "training" and (b != "training._common" or a == b))
                or (a == "training._common" and to == "training")
            ):
                bad.append(f"{a} (line {line}) imports {b}")
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph(package_modules(ROOT))


def test_no_import_cycles(graph):
    edges, _ = graph
    found = [describe(c, edges) for c in import_cycles(edges)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_imports_go_down_the_layers(graph):
    edges, _ = graph
    assert edges["training.train"] and edges["serving.service"]  # the walk found imports
    bad = upward(edges)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_module(graph):
    _, names = graph
    bad = [
        f"{a} (line {line}) imports {name} from {b}"
        for a, b, name, line in names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]
    assert not bad, "\n".join(bad)


def test_the_walk_finds_lazy_cycles_re_exports_and_upward_imports(tmp_path):
    """The walker itself, on a made-up tree: a cycle closed by an import inside a function and a
    package's re-export, `from pkg import module`, a relative import, import_module("...")."""
    files = {
        "twin_ml/__init__.py": "",
        "twin_ml/physics/__init__.py": "from twin_ml.physics.catalog import find as find\n",
        "twin_ml/physics/catalog.py": (
            "def find():\n    import twin_ml.physics.systems.pendulum\n"
        ),
        "twin_ml/physics/systems/__init__.py": "",
        "twin_ml/physics/systems/pendulum.py": "from twin_ml.physics import find\n",
        "twin_ml/data/__init__.py": "from . import real\n",
        "twin_ml/data/real.py": "from twin_ml.data import telemetry\n",
        "twin_ml/data/telemetry.py": (
            "import importlib\nX = lambda: importlib.import_module('training.train')\n"
        ),
        "training/__init__.py": "",
        "training/_common.py": "",
        "training/train.py": "from training._common import x\nfrom training import monitor\n",
        "training/monitor.py": "from training.train import _helper\n",
        "serving/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges, names = import_graph(package_modules(tmp_path))
    assert edges["twin_ml.data"] == {"twin_ml.data.real": 1}
    assert edges["twin_ml.data.real"] == {"twin_ml.data.telemetry": 1}
    assert edges["twin_ml.physics.systems.pendulum"] == {"twin_ml.physics": 1}
    cycles = {tuple(c) for c in import_cycles(edges)}
    assert cycles == {
        (
            "twin_ml.physics",
            "twin_ml.physics.catalog",
            "twin_ml.physics.systems.pendulum",
            "twin_ml.physics",
        ),
        ("training.monitor", "training.train", "training.monitor"),
    }
    assert sorted(upward(edges)) == [
        "training.monitor (line 1) imports training.train",
        "training.train (line 2) imports training.monitor",
        "twin_ml.data.telemetry (line 2) imports training.train",
    ]
    assert ("training.monitor", "training.train", "_helper", 1) in names
