#!/usr/bin/env python
"""A hostile user's probe of the ``backmix`` command and library: each case is run in a fresh
process against the tree given (default: this one) and judged good or bad.

Good: the expected failure is one line ``backmix: error: ...`` with exit status 2 (a library call
raises ``BackMixError``/``TypeError``/``ValueError`` whose message names the thing at fault), or the
call does the right thing; and either way no temporary file is left in the case's folder. Bad:
anything else (a traceback, two lines, a wrong status, silent success on bad input, a leftover).

    python scripts/probe.py                     # this tree
    python scripts/probe.py --tree /work/wt/x   # another checkout (e.g. main, to compare)
    python scripts/probe.py -k eval             # only the cases whose name holds "eval"
    python scripts/probe.py -k config-,splits-  # those whose name holds either

Prints one line per case and the counts; exit status 1 if any case is bad. A few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

# Runs the backmix of TREE (argv[1]) whatever the interpreter has installed: the stage folders are
# mapped under the backmix name as pyproject.toml's package-dir does.
BOOT = textwrap.dedent("""
    import importlib.util, os, sys
    tree = sys.argv.pop(1)
    MAP = {"backmix": "backmix", "backmix.osr_data": "osr_data", "backmix.models": "models",
           "backmix.cam_cache": "cam_cache", "backmix.pipeline": "pipeline", "backmix.trainers": "trainers",
           "backmix.bench": "bench"}
    class TreeFinder:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name not in MAP:
                return None
            d = os.path.join(tree, MAP[name])
            return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"),
                                                          submodule_search_locations=[d])
    sys.meta_path.insert(0, TreeFinder)
    if sys.argv[1:2] == ["-c"]:
        code = sys.argv[2]
        sys.argv = ["probe"]
        from backmix.osr_data.errors import BackMixError
        try:
            exec(compile(code, "<case>", "exec"), {"__name__": "__case__"})
        except (BackMixError, TypeError, ValueError) as e:
            print(f"RAISED {type(e).__name__}: {e}")
            sys.exit(3)
        sys.exit(0)
    from backmix.cli import main
    sys.exit(main(sys.argv[1:]))
""")

LEFTOVER_MARKS = (".tmp-", ".tmp", "next-", ".partial")


@dataclass
class Case:
    name: str
    args: list = field(default_factory=list)       # CLI words; or code=... for a library call
    code: Optional[str] = None
    expect: str = "error"                          # "error": one-line refusal; "ok": success
    says: str = ""                                 # the refusal must contain this
    setup: Optional[Callable[[Path], None]] = None
    check: Optional[Callable[[Path, subprocess.CompletedProcess], bool]] = None
    timeout: int = 180


def write_images(root: Path, classes=("ant", "bee", "cat", "dog"), per_class=6, size=32, seed=0) -> None:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")


def write_data(root: Path) -> None:
    write_images(root / "train", per_class=6)
    write_images(root / "test", per_class=3, seed=1)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if any(m in p.name for m in LEFTOVER_MARKS) and not p.name.endswith(".lock"))


def judge(case: Case, proc: subprocess.CompletedProcess, folder: Path) -> tuple[bool, str]:
    left = leftovers(folder)
    if left:
        return False, f"left behind: {', '.join(left[:3])}"
    err = proc.stderr.strip().splitlines()
    if case.expect == "error":
        if case.code is not None:
            if proc.returncode != 3:
                return False, f"status {proc.returncode}: {(err or ['(nothing)'])[-1][:150]}"
            said = proc.stdout.strip().splitlines()[-1]
            return (case.says in said, said[:160])
        # One error line, last; before it only the command's own progress lines (e.g. "backmix: mixing on
        # cpu" of a loader that started), never a traceback or a library's warning.
        progress = all(line.startswith("backmix: ") and not line.startswith("backmix: error") for line in err[:-1])
        if proc.returncode != 2 or not err or not err[-1].startswith("backmix: error: ") or not progress:
            return False, f"status {proc.returncode}, {len(err)} stderr lines: {(err or ['(nothing)'])[-1][:150]}"
        return (case.says in err[-1], err[-1][:160])
    if proc.returncode != 0:
        return False, f"status {proc.returncode}: {(err or ['(nothing)'])[-1][:150]}"
    if case.check is not None and not case.check(folder, proc):
        return False, "ran but did the wrong thing: " + (proc.stdout.strip() or proc.stderr.strip())[-150:]
    return True, "ok"


def run_case(case: Case, tree: Path, boot: Path, shared: Path, work: Path) -> tuple[bool, str]:
    folder = work / case.name
    folder.mkdir()
    if case.setup:
        case.setup(folder)
    words = ["-c", case.code] if case.code is not None else case.args
    words = [w.replace("{D}", str(folder)).replace("{S}", str(shared)) for w in words]
    env = dict(os.environ, OMP_NUM_THREADS="1", PROBE_DIR=str(folder), PROBE_SHARED=str(shared))
    try:
        proc = subprocess.run([sys.executable, str(boot), str(tree), *words], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=case.timeout)
    except subprocess.TimeoutExpired:
        return False, f"still running after {case.timeout}s"
    return judge(case, proc, folder)


def cases() -> list[Case]:
    """The cases of probe_cases.py and of every other probe_cases_*.py beside this file."""
    import importlib
    names = sorted(p.stem for p in Path(__file__).resolve().parent.glob("probe_cases*.py"))
    return [case for name in names for case in importlib.import_module(name).cases()]


def main() -> int:
    from probe_cases import shared_setup   # the cases live beside this file
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                    help="checkout whose backmix is probed (default: this one)")
    ap.add_argument("-k", default="", help="only cases whose name contains this (or one of a comma list)")
    ap.add_argument("--json", type=Path, default=None, help="write {case: [good, what]} here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backmix-probe-"))
    try:
        boot = work / "boot.py"
        boot.write_text(BOOT)
        shared = work / "_shared"
        shared.mkdir()
        shared_setup(shared, lambda words: subprocess.run(
            [sys.executable, str(boot), str(args.tree.resolve()), *words], cwd=shared, capture_output=True,
            text=True, env=dict(os.environ, OMP_NUM_THREADS="1")))
        results = {}
        for case in cases():
            if not any(k in case.name for k in args.k.split(",")):
                continue
            good, what = run_case(case, args.tree.resolve(), boot, shared, work)
            results[case.name] = [good, what]
            print(f"{'good' if good else 'BAD '}  {case.name:44s} {what}", flush=True)
        bad = sum(not g for g, _ in results.values())
        print(f"{len(results)} cases: {len(results) - bad} good, {bad} bad ({args.tree})")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
