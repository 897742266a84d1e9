"""The ``backmix`` command: commands of every stage, each registered by its package when it is run."""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator, Optional

from backmix.osr_data.errors import NO_SPACE_ERRNOS, BackMixError, Terminated, no_space


# Every command: (group or None, name) -> (one-line summary, "module:function" that registers it).
# Only the registrar of the command being run is imported, so `backmix --help` and light
# commands such as `backmix cache info` never import torch. A registrar may add several
# commands (e.g. train and eval); they are listed under it.
GROUPS = {
    "data": "prepare bundled data sets, convert folders",
    "cache": "build and inspect foreground-map caches",
    "bench": "benchmarks that print a table and write JSON",
}
COMMANDS = {
    ("data", "prepare"): ("write a bundled real data set as an image folder", "backmix.osr_data.cli:register"),
    ("data", "write-beton"): ("convert an image folder to an FFCV .beton (once, for the FFCV loader)",
                              "backmix.pipeline.cli:register_data"),
    ("cache", "init"): ("create generation 0 (0.5 everywhere) for a data folder", "backmix.cam_cache.cli:register"),
    ("cache", "build"): ("compute the next generation from a checkpoint's CAMs", "backmix.cam_cache.cli:register"),
    ("cache", "info"): ("generation, rows, grid, digests and size of a cache", "backmix.cam_cache.cli:register"),
    ("cache", "show"): ("draw a cache's maps, masks and a mixed batch as a PNG sheet",
                        "backmix.bench.show:register_cache_show"),
    (None, "train"): ("train an open-set classifier with BackMix (or the plain baseline)",
                      "backmix.trainers.cli:register"),
    (None, "eval"): ("open-set metrics of a checkpoint on a data set's test folder", "backmix.trainers.cli:register"),
    (None, "experiment"): ("baseline vs BackMix over data sets and splits, as one table",
                           "backmix.bench.experiment:register"),
    ("bench", "cache"): ("precompute vs inference throughput, publish time/size, gather latency",
                         "backmix.bench.cache_cli:register_bench"),
    ("bench", "loader"): ("images/s of each loader with and without BackMix", "backmix.bench.loader:register_bench"),
    ("bench", "peers"): ("backmix's loaders beside the stock torchvision, FFCV and DALI loaders",
                         "backmix.bench.peers:register"),
    ("bench", "train"): ("images/s of whole training steps: the plain baseline vs each BackMix recipe",
                         "backmix.bench.train_step:register"),
    ("bench", "scale"): ("index, cache, first-batch, memory and rebuild costs on an ImageNet-sized folder",
                         "backmix.bench.scale:register_bench"),
    (None, "show"): ("draw one mixed batch as a PNG sheet", "backmix.bench.show:register"),
}


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, like every other bad input (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"backmix: error: {message} (see `{self.prog} --help`)\n")


def chosen_command(argv: list[str]) -> tuple[Optional[str], Optional[str]]:
    """(group, name) of the command in ``argv`` as far as it names one ((None, None): none yet)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return None, None
    if words[0] in GROUPS:
        return words[0], words[1] if len(words) > 1 else None
    return None, words[0]


def build_parser(argv: Optional[list[str]] = None) -> argparse.ArgumentParser:
    """The parser, with the real options of the command ``argv`` names and a summary of every other."""
    parser = OneLineParser(   # its subparsers are of its class too
        prog="backmix",
        description="Train open-set recognition models with BackMix: prepare data, precompute "
                    "foreground caches, load and mix batches fast, train and evaluate.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = chosen_command(sys.argv[1:] if argv is None else argv)
    registrar = COMMANDS.get(chosen, (None, None))[1]
    groups = {None: top}
    for key, (summary, where) in COMMANDS.items():   # in table order, so --help lists them so
        group, name = key
        if group not in groups:
            groups[group] = top.add_parser(group, help=GROUPS[group]).add_subparsers(
                dest=f"{group}_command", metavar="SUBCOMMAND", required=True)
        if where != registrar:
            groups[group].add_parser(name, help=summary)
        elif key == chosen:
            module, function = where.split(":")
            getattr(importlib.import_module(module), function)(groups[group])
    return parser


def share_cores_with_workers() -> None:
    """Unless the user chose otherwise, OpenMP threads sleep when they wait instead of spinning.

    A command's main process shares the cores with its DataLoader workers; torch's OpenMP threads,
    spinning between parallel regions, take the CPU the workers decode on, and their own barriers wait
    on threads the workers have preempted. On 2 cores that made a training step of the small CNN up to
    several times as long whenever the workers (or anything else) ran beside it. The threads and their
    share of each operation are unchanged, so are the numbers. Set before torch is imported: the OpenMP
    runtime reads it once, when it loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextlib.contextmanager
def imports_frozen() -> Iterator[None]:
    """The block (the command's imports) runs without garbage collection; the objects alive at its end
    are then frozen (``gc.freeze``): later collections skip them until ``gc.unfreeze``.

    torch and the compiler stack torch.optim pulls in make millions of objects that live as long as
    the process; the collector would walk all of them again and again while they load (a noticeable
    share of a training run's start), and again in every forked DataLoader worker, writing to their
    pages. Disable, import, freeze is what the ``gc`` documentation recommends before forking workers.
    The cyclic garbage the imports leave (thousands of objects) is frozen with them instead of paid
    for with a full collection."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


def main(argv: list[str] | None = None) -> int:
    share_cores_with_workers()
    try:
        with imports_frozen():
            args = build_parser(argv).parse_args(argv)
        return run_command(args)
    finally:
        gc.unfreeze()   # a process that calls main again (tests, a notebook) may collect them after all


def quiet_stopped_sharer(hook):
    """``threading.excepthook`` once the command is stopping: a thread of multiprocessing's resource
    sharer (which hands a worker's tensors over by file descriptor) fails its handshake with a worker
    that was just stopped, and only that is left unprinted: the command's one line says what happened."""
    sharer = os.path.join("multiprocessing", "resource_sharer.py")

    def excepthook(args):
        tb = args.exc_traceback
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(sharer):
                return
            tb = tb.tb_next
        hook(args)
    return excepthook


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM (a service manager, a job scheduler, ``kill``) stops the command as
    Ctrl-C does: it raises ``Terminated`` in this process, so every ``finally`` runs (the atomic
    writers remove their temporaries, the loaders stop their workers) and the command ends with
    ``backmix: interrupted``, exit 130.

    A process forked inside the block (a DataLoader worker) inherits the handler; there it ends the
    process as SIGTERM's default action would, since it owns nothing that needs cleaning up and an
    exception would only print a worker's traceback. A second SIGTERM, while the first one's cleanup
    runs, ends the process at once: whoever sends it does not want to wait."""
    owner = os.getpid()

    def interrupt(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        if os.getpid() != owner:
            os.kill(os.getpid(), signum)
            return
        threading.excepthook = quiet_stopped_sharer(threading.excepthook)
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:   # not the main thread (a library caller's): signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_during(error: BaseException) -> bool:
    """True when ``error`` was raised while an interrupt (Ctrl-C, SIGTERM) unwound the command: code that
    cannot be stopped half way (torch.save's zip writer) may raise its own error in its place."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def run_command(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="backmix: %(message)s", stream=sys.stderr)
    try:
        with sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except (KeyboardInterrupt, Terminated):
        print("backmix: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if interrupted_during(e):
            print("backmix: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, BackMixError):
            print(f"backmix: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, BrokenPipeError):   # an OSError too: before the check below
            # The reader went away (`backmix cache info | head`): stop quietly, as coreutils do.
            sys.stdout = None
            return 141
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            print(f"backmix: error: {no_space(e)}", file=sys.stderr)
            return 2
        raise
