"""Every option several commands share is declared once (backmix/options.py): the same help text in
every command that has it, a default read from the config field it fills, and no command declaring
one of them by hand."""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from backmix.cli import COMMANDS, build_parser
from backmix.options import OPTIONS, add_option, add_options, default_of

REPO = Path(__file__).resolve().parent.parent
SHARED = {option.flag: name for name, option in OPTIONS.items()}
# What a command or the shared module appends: its default, in words or as ArgumentDefaultsHelpFormatter writes it.
NOT_SOURCE = {"build", "dist", "tests"}   # a built copy; the tests' own parsers
DEFAULT_SUFFIX = re.compile(r"( \(default: .*\))+\Z", re.DOTALL)


def subparsers(parser: argparse.ArgumentParser):
    """``parser`` and every parser below it."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from subparsers(child)


def every_command_parser() -> dict[str, argparse.ArgumentParser]:
    """{prog: parser} of every command, each built as running it builds it (its real options), and
    the one-measurement parser ``bench peers`` runs in a child process."""
    from backmix.bench.peer_run import parser as peer_run_parser
    out = {}
    for group, name in COMMANDS:
        argv = [group, name] if group else [name]
        found = dict(subparsers(build_parser(argv)))
        out[f"backmix {' '.join(argv)}"] = found[f"backmix {' '.join(argv)}"]
    out["peer_run"] = peer_run_parser()
    return out


def shared_actions():
    for prog, parser in every_command_parser().items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in SHARED:
                    yield prog, SHARED[flag], action


def test_every_shared_option_has_one_help_text_wherever_it_appears():
    texts: dict[str, dict[str, list[str]]] = {}
    for prog, name, action in shared_actions():
        texts.setdefault(name, {}).setdefault(DEFAULT_SUFFIX.sub("", action.help), []).append(prog)
    for name, by_text in texts.items():
        assert list(by_text) == [OPTIONS[name].help], (name, by_text)
    # the walk reached the commands: each shared option is in several of them
    assert {name for name in texts if sum(map(len, texts[name].values())) >= 3} >= {
        "canvas", "crop", "canvas_mode", "augment", "backend", "on_error", "ray_address", "prefetch",
        "workers", "device", "batch_size"}, texts.keys()


def test_the_commands_share_the_options_and_keep_their_defaults():
    parsers = every_command_parser()
    train = parsers["backmix train"].parse_args(["--data", "d"])
    assert not {"canvas", "backend", "device", "workers", "on_error"} & set(vars(train))   # only what was given
    show = parsers["backmix show"].parse_args(["--data", "d", "--out", "o.png"])
    assert (show.canvas, show.crop, show.grid, show.canvas_mode, show.augment, show.backend, show.on_error,
            show.ray_address, show.prefetch) == (40, 32, 8, "center", "crop", "reference", "raise", None, None)
    bench = parsers["backmix bench loader"].parse_args([])
    assert (bench.canvas, bench.crop, bench.batch_size, bench.workers, bench.device) == (224, 192, 64, 2, "auto")
    assert bench.backend == "reference,torchvision,dali,ffcv,ray"
    assert parsers["backmix bench cache"].parse_args(["--image-size", "96"]).canvas == 96
    assert parsers["backmix cache build"].parse_args(
        ["--data", "d", "--checkpoint", "c", "--cache", "k"]).canvas_mode is None
    assert parsers["peer_run"].parse_args(["--family", "torch", "--loader", "stock", "--data", "d"]).device == "cpu"
    for prog in ("backmix bench loader", "backmix bench train", "backmix experiment", "backmix eval", "peer_run"):
        device = [a for a in parsers[prog]._actions if "--device" in a.option_strings][0]
        assert device.type("cuda:1") == "cuda:1", prog      # every --device takes cuda:N
        with pytest.raises(argparse.ArgumentTypeError):
            device.type("gpu")


def test_a_default_is_the_config_fields_unless_the_command_gives_its_own():
    from backmix.pipeline.config import LoaderConfig
    p = argparse.ArgumentParser()
    add_options(p, ("canvas", "crop", "workers"), defaults={"crop": 24})
    add_option(p, "ray_address")
    args = p.parse_args([])
    assert (args.canvas, args.crop, args.workers) == (LoaderConfig.canvas, 24, LoaderConfig.num_workers)
    help_of = {a.dest: a.help for a in p._actions}
    assert (help_of["canvas"], help_of["crop"]) == (OPTIONS["canvas"].help, OPTIONS["crop"].help)
    assert help_of["ray_address"].startswith(OPTIONS["ray_address"].help + " (default: start Ray on this machine")
    assert default_of("backmix.trainers.config:TrainConfig.backend") == "reference"
    assert default_of("backmix.cam_cache.store:init_cache.grid") == 8


def declared_by_hand() -> list[str]:
    """``file:line flag`` of every ``add_argument`` call outside backmix/options.py naming a shared flag."""
    out = []
    sources = [folder for folder in REPO.iterdir() if folder.is_dir() and folder.name not in NOT_SOURCE
               and not folder.name.startswith(".")]
    for path in sorted(p for folder in sources for p in folder.rglob("*.py")):
        if path == REPO / "backmix" / "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                flags = {a.value for a in node.args if isinstance(a, ast.Constant)} & set(SHARED)
                out += [f"{path.relative_to(REPO)}:{node.lineno} {flag}" for flag in sorted(flags)]
    return out


def test_no_shared_option_is_declared_by_hand():
    assert declared_by_hand() == []
