"""The project's modules import each other as a tree: no import cycle, read statically.

Every ``.py`` of ``fedpeft/``, ``fedpeft/methods/``, ``strategies/`` and ``clients/`` is parsed with
``ast`` and every import is read, those inside functions included (a lazy import closes a cycle as
surely as a top-level one, only later). ``from X import Y`` is an edge to module ``X.Y`` when that is
a project module, else to ``X``; ``import X.Y`` and ``from X.Y import Z`` also run the packages above
(``X/__init__.py``), so they are edges to those too, except from a module inside that package (its
``__init__`` is already running). Relative imports are resolved against the importing module.

The second half checks that the entry points stay light: what ``fedpeft --help`` and ``fedpeft
compare`` import when they start (module level only) reaches no heavy library.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedpeft", "fedpeft/methods", "strategies", "clients")
HEAVY = ("torch", "transformers", "peft", "opacus", "ray", "flwr", "flwr_datasets", "datasets", "matplotlib", "wandb",
         "hydra", "omegaconf", "safetensors", "cryptography")


def project_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` directly in each package folder."""
    modules = {}
    for pkg in packages:
        dotted = pkg.replace("/", ".")
        for f in sorted((root / pkg).glob("*.py")):
            modules[dotted if f.stem == "__init__" else f"{dotted}.{f.stem}"] = f
    return modules


def _statements(tree: ast.AST, module_level: bool):
    """Every import statement of ``tree``; with ``module_level``, not those inside a function body."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: dict[str, Path], *, module_level: bool = False) -> tuple[dict[str, int], set[str]]:
    """The project modules ``name`` imports (each with the line of its first import) and the top-level
    names of the other packages it imports."""
    is_package = path.name == "__init__.py"
    edges: dict[str, int] = {}
    external: set[str] = set()

    def add(target: str, line: int) -> None:
        parts = target.split(".")
        if parts[0] not in {m.split(".")[0] for m in modules}:
            external.add(parts[0])
            return
        for i in range(1, len(parts) + 1):
            ancestor = ".".join(parts[:i])
            if ancestor not in modules or ancestor == name:
                continue
            if i < len(parts) and (name + ".").startswith(ancestor + "."):
                continue  # the package this module belongs to is already being imported
            edges.setdefault(ancestor, line)

    for node in _statements(ast.parse(path.read_text(), str(path)), module_level):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        if node.level:  # relative: from the package of this module (or this package), up level - 1
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            add(sub if sub in modules else source, node.lineno)
    return edges, external


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, int]]:
    modules = project_modules(root, packages)
    return {m: imports_of(m, p, modules)[0] for m, p in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle ``[a, b, ..., a]`` through each strongly connected component of more than
    one module (or a module importing itself), in name order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:  # Tarjan's algorithm, iteratively
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == v:
                            break
                    if len(component) > 1 or v in graph.get(v, {}):
                        components.append(component)
    out = []
    for component in sorted(components, key=min):
        first = min(component)
        previous = {first: None}
        queue = deque([first])
        while queue:  # breadth first, inside the component, back to the first module
            v = queue.popleft()
            if first in graph[v]:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                out.append([*reversed(path), first])
                break
            for w in sorted(graph[v]):
                if w in component and w not in previous:
                    previous[w] = v
                    queue.append(w)
    return out


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """``a -> b -> a`` with the line of each import: ``a:12 -> b:40 -> a``."""
    return " -> ".join(f"{a}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def reachable_at_import(start: str, root: Path = ROOT) -> tuple[set[str], set[str]]:
    """The project modules importing ``start`` runs (module-level imports, followed) and the other
    top-level packages they import."""
    modules = project_modules(root)
    seen, external, todo = {start}, set(), [start]
    while todo:
        name = todo.pop()
        edges, ext = imports_of(name, modules[name], modules, module_level=True)
        external |= ext
        for target in edges:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen, external


# ---------------------------------------------------------------------------------------------


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "fedpeft.cli" in graph and "clients.app" in graph and "strategies.hetlora" in graph
    found = cycles(graph)
    assert not found, "import cycles (module:line of the import):\n" + "\n".join(describe(c, graph) for c in found)


def test_the_walker_reads_imports_inside_functions_of_the_project():
    graph = import_graph()
    assert "fedpeft.compare" in graph["fedpeft.cli"]  # `from fedpeft import compare` inside cli.main
    assert "fedpeft.merges" in graph["clients.app"]  # `from fedpeft import merges as merge_forms`: the module
    assert "strategies" in graph["fedpeft.server"]  # `from strategies.base import ...` runs strategies/__init__


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_walker_finds_a_cycle_closed_inside_a_function(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg import b\n    return b\n",
        "pkg/b.py": "from . import c\n",
        "pkg/c.py": "import os\n\n\nclass C:\n    def g(self):\n        from pkg.a import f\n",
        "pkg/d.py": "from pkg.c import C\n",  # imports into the cycle, is not on it
        "sub/__init__.py": "from sub.x import X\n",
        "sub/x.py": "from .y import Y\nX = 1\n",  # a package and its modules: no cycle (the package is already running)
        "sub/y.py": "Y = 2\n",
    })
    graph = import_graph(tmp_path, ("pkg", "sub"))
    assert graph["pkg.a"] == {"pkg.b": 2} and graph["pkg.b"] == {"pkg.c": 1} and graph["pkg.c"] == {"pkg.a": 6}
    assert graph["sub.x"] == {"sub.y": 1}
    found = cycles(graph)
    assert found == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert describe(found[0], graph) == "pkg.a:2 -> pkg.b:1 -> pkg.c:6 -> pkg.a"


def test_the_walker_sees_a_package_run_by_an_import_from_outside(tmp_path):
    _write(tmp_path, {
        "core/__init__.py": "from core.impl import run\n",
        "core/impl.py": "def run():\n    import app.main\n",
        "core/api.py": "API = 1\n",
        "app/__init__.py": "",
        "app/main.py": "from core.api import API\n",  # runs core/__init__ first: app.main -> core -> core.impl -> app.main
    })
    graph = import_graph(tmp_path, ("core", "app"))
    assert graph["app.main"] == {"core": 1, "core.api": 1}
    assert cycles(graph) == [["app.main", "core", "core.impl", "app.main"]]
    (tmp_path / "core/__init__.py").write_text("")
    assert cycles(import_graph(tmp_path, ("core", "app"))) == []


def test_the_commands_that_must_start_at_once_import_no_heavy_library():
    """``fedpeft --help`` imports fedpeft.cli only; ``fedpeft compare`` adds fedpeft.compare: what
    their module-level imports reach (in the project, followed) names none of :data:`HEAVY`."""
    cli_modules, cli_external = reachable_at_import("fedpeft.cli")
    assert cli_modules == {"fedpeft.cli", "fedpeft.launch"}
    assert not cli_external & set(HEAVY), cli_external & set(HEAVY)
    compare_modules, compare_external = reachable_at_import("fedpeft.compare")
    assert compare_modules == {"fedpeft.compare", "fedpeft.metrics"}
    assert not compare_external & set(HEAVY), compare_external & set(HEAVY)
    assert "numpy" in compare_external  # the walker does see third-party imports


def test_the_simulation_launcher_imports_flower_and_hugging_face_only_after_setting_their_environment():
    """Flower (``FLWR_TELEMETRY_ENABLED``), transformers, datasets and huggingface_hub
    (``HF_HUB_OFFLINE``, ...) read :data:`fedpeft.launch.ENV_DEFAULTS` when imported, and
    :func:`fedpeft.simulation.run` sets them first: importing the launcher must not import them."""
    modules, external = reachable_at_import("fedpeft.simulation")
    assert {"fedpeft.launch", "fedpeft.runconfig", "fedpeft.preflight"} <= modules
    assert not modules & {"fedpeft.serverapp", "clients.app", "fedpeft.models", "fedpeft.data"}, modules
    read_env = external & {"flwr", "transformers", "datasets", "huggingface_hub", "peft", "ray"}
    assert not read_env, read_env


def test_the_client_app_imports_no_privacy_accountant():
    """A deployed node starts a new ClientApp process for every message (Flower 1.41), and each
    imports ``clients.app`` again: Opacus's accountant (1.7 s of each cold start on the loaded
    2-core machine) is the server's and the config checks'; the client path clips and noises with
    torch alone (DP-SGD's PrivacyEngine is imported where a client trains with it)."""
    modules, external = reachable_at_import("clients.app")
    assert "fedpeft.privacy" in modules  # the walker does follow the client path to it
    assert "opacus" not in external, sorted(external)
