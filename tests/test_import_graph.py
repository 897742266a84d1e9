"""No import cycles in the package: the modules form a one-way graph, so each can be read (and
imported) after the ones it needs. The graph is read from the source with ``ast``: every import
statement counts, absolute (``backmix.x.y``) or relative, at module level, inside a function or
under ``TYPE_CHECKING``, because a cycle hidden in a function is still two modules that need each other."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def package_folders() -> dict[str, Path]:
    """{package name: folder}: ``backmix`` and every stage folder it maps as ``backmix.<stage>``."""
    out = {}
    for init in sorted(REPO.glob("*/__init__.py")):
        folder = init.parent
        name = "backmix" if folder.name == "backmix" else f"backmix.{folder.name}"
        spec = importlib.util.find_spec(name)
        if spec is not None and Path(spec.submodule_search_locations[0]).resolve() == folder.resolve():
            out[name] = folder
    return out


def modules() -> dict[str, Path]:
    """{module name: file} of every module of the package (a package's ``__init__`` under its own name)."""
    out = {}
    for package, folder in package_folders().items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [(base, alias.name) for alias in node.names]
        else:
            continue
        for base, name in targets:
            if name is not None and f"{base}.{name}" in known:    # from package import submodule
                out.add(f"{base}.{name}")
            elif base in known:
                out.add(base)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    files = modules()
    return {module: imported(module, path, set(files)) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected group of
    modules that import each other (Tarjan's algorithm, iterative)."""
    order, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in order:
            continue
        work = [(root, iter(sorted(graph[root])))]
        order[root] = low[root] = len(order)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in order:
                    order[step] = low[step] = len(order)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], order[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == order[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(cycle_through(graph, group))
    return found


def cycle_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle from the group's first module back to it, inside the group (breadth first)."""
    start = min(group)
    came_from = {start: None}
    queue = [start]
    for node in queue:
        for step in sorted(graph[node] & group):
            if step == start:
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if step not in came_from:
                came_from[step] = node
                queue.append(step)
    raise AssertionError(f"{sorted(group)} is not a cycle")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"backmix.device", "backmix.pipeline.core", "backmix.cam_cache.store", "backmix.osr_data.prepare",
            "backmix.trainers.train"} <= set(graph)
    assert "backmix.pipeline.config" in graph["backmix.pipeline.core"]          # relative, module level
    assert "backmix.cam_cache.node_folders" in graph["backmix.trainers.run_data"]   # absolute, in a function
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_a_cycle_is_found_and_printed_whichever_way_it_is_imported():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_and_relative_ones_are_edges(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("from . import sibling\nfrom ..other import thing\n"
                    "def f():\n    import backmix.x.far\n    from .sibling import name\n"
                    "if TYPE_CHECKING:\n    from backmix.x import typed\n")
    known = {"backmix.x.y.sibling", "backmix.x.other", "backmix.x.far", "backmix.x.typed"}
    assert imported("backmix.x.y.mod", path, known) == known
