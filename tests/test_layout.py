"""The package layout: data flows one way through the stages, and the instruments stay outside them.

osr_data -> models -> cam_cache -> pipeline -> trainers: a stage imports only the stages before it.
backmix.bench (the benchmarks, the experiment runner, the viewer) may import every stage; nothing in
the stages or in backmix/ imports it, except the names of backmix/cli.py's command table, which the
command imports only when that command runs.

Read from the source, not by importing it: every import statement counts, at module level or inside a
function, relative (``from ..x import``) or absolute, and so do lazily imported module names written as
strings (``"backmix.x.y:f"``, and ``".y"`` in the export tables).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("osr_data", "models", "cam_cache", "pipeline", "trainers")   # in the order data flows
FOLDERS = (*STAGES, "backmix")
# Lazily imported module names written as strings: "backmix.a.b[:f]" or, relative to the package, ".b[:f]".
MODULE_STRING = re.compile(r"(backmix|\.+[a-z_])[a-z0-9_]*(\.[a-z_][a-z0-9_]*)*(:[A-Za-z_]\w*)?")
LAZY_TABLES = {"backmix/cli.py": "COMMANDS"}   # may name backmix.bench: its registrars are imported per command


def package_of(relative: str) -> list[str]:
    """The dotted package a repository file belongs to: pipeline/core.py -> [backmix, pipeline]."""
    folder = Path(relative).parts[0]
    return ["backmix"] if folder == "backmix" else ["backmix", folder]


def resolve(package: list[str], level: int, module: str) -> str:
    """The absolute name of ``from <level dots><module> import`` in ``package``."""
    base = package[:len(package) - level + 1] if level else []
    return ".".join(base + ([module] if module else []))


def imported_names(source: str, relative: str) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, in the lazy command table) of everything ``source`` imports."""
    package = package_of(relative)
    tree = ast.parse(source)
    table_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == LAZY_TABLES.get(relative)
                                                for t in node.targets):
            table_lines |= {n.lineno for n in ast.walk(node.value) if hasattr(n, "lineno")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = resolve(package, node.level, node.module or "")
            found.append((node.lineno, module, False))
            # ``from backmix import bench`` and ``from . import x`` import submodules by name
            found += [(node.lineno, f"{module}.{alias.name}", False) for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and MODULE_STRING.fullmatch(node.value)):
            name = node.value.partition(":")[0]
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = resolve(package, level, name.lstrip("."))
            found.append((node.lineno, name, node.lineno in table_lines))
    return sorted(found)   # in line order (ast.walk goes breadth first)


def violations(source: str, relative: str) -> list[str]:
    """What ``source`` (the file ``relative`` of the repository) imports against the layout."""
    package = package_of(relative)
    rank = STAGES.index(package[1]) if len(package) > 1 else None
    bad, seen = [], set()
    for line, name, in_table in imported_names(source, relative):
        parts = name.split(".")
        if parts[0] != "backmix" or len(parts) < 2 or (line, parts[1]) in seen:
            continue   # one line per statement and package: ``from x import a, b`` names x once
        seen.add((line, parts[1]))
        if parts[1] == "bench" and not in_table:
            bad.append(f"{relative}:{line} imports {name}: the instruments stay outside the stages and backmix/")
        elif rank is not None and parts[1] in STAGES and STAGES.index(parts[1]) > rank:
            bad.append(f"{relative}:{line} imports {name}: {package[1]} comes before {parts[1]}")
    return bad


def library_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def test_no_stage_imports_a_later_stage_and_nothing_outside_bench_imports_bench():
    files = library_files()
    assert {p.relative_to(REPO).parts[0] for p in files} == set(FOLDERS)
    bad = [v for p in files for v in violations(p.read_text(), str(p.relative_to(REPO)))]
    assert bad == []


def test_the_command_table_names_bench_registrars_and_they_exist():
    # what the exception above lets through: module names in COMMANDS, each importable, each a registrar
    import importlib

    from backmix.cli import COMMANDS
    bench = {where for _, where in COMMANDS.values() if where.startswith("backmix.bench.")}
    assert len(bench) >= 6
    for where in bench:
        module, function = where.split(":")
        assert callable(getattr(importlib.import_module(module), function)), where


def test_the_checker_finds_each_kind_of_import_against_the_layout():
    source = ("import backmix.bench.loader\n"
              "from backmix import bench\n"
              "from ..trainers.train import main\n"
              "def f():\n"
              "    from backmix.pipeline import make_loader\n"
              "    from . import core\n"
              "    from ..osr_data import ImageIndex\n"
              "TABLE = {'x': 'backmix.bench.show:register', 'y': '..trainers.cli:register', 'z': '.maps'}\n"
              "NOT_A_MODULE = 'see backmix.bench.show for the sheet'\n")
    assert violations(source, "cam_cache/store.py") == [
        "cam_cache/store.py:1 imports backmix.bench.loader: the instruments stay outside the stages and backmix/",
        "cam_cache/store.py:2 imports backmix.bench: the instruments stay outside the stages and backmix/",
        "cam_cache/store.py:3 imports backmix.trainers.train: cam_cache comes before trainers",
        "cam_cache/store.py:5 imports backmix.pipeline: cam_cache comes before pipeline",
        "cam_cache/store.py:8 imports backmix.bench.show: the instruments stay outside the stages and backmix/",
        "cam_cache/store.py:8 imports backmix.trainers.cli: cam_cache comes before trainers",
    ]
    # backmix/ may import every stage; only its command table may name the instruments
    face = "from .trainers import train\nCOMMANDS = {('a', 'b'): ('c', 'backmix.bench.show:register')}\n"
    assert violations(face, "backmix/cli.py") == []
    assert violations(face, "backmix/api.py") == [
        "backmix/api.py:2 imports backmix.bench.show: the instruments stay outside the stages and backmix/"]
