"""SIGTERM ends a command as Ctrl-C does: ``backmix: interrupted``, exit 130, the loaders' workers
stopped, no temporary file or folder left, and a cut training run resumes."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from backmix.cli import sigterm_as_interrupt
from backmix.osr_data.errors import Terminated

from test_trainer import REPO, cli_args, env, tiny


def temporaries(folder: Path) -> list[str]:
    """Every ``.NAME.tmp-PID...`` file or folder an atomic writer makes, anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name)


def wait_for(condition, proc: subprocess.Popen, seen: set, timeout: float = 120) -> None:
    """Poll until ``condition()``, adding the pids of ``proc``'s children to ``seen`` as they come."""
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < end, "timed out"
        seen |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        time.sleep(0.02)


def signal_while(condition, proc: subprocess.Popen, signum: int, timeout: float = 120) -> None:
    """Send ``signum`` to ``proc`` at a moment ``condition()`` holds: the process is stopped (SIGSTOP)
    while the condition is checked, so it cannot get past that state before the signal is sent. (A
    prepare's temporary folder lives for a fraction of a second: on a loaded machine a check and a
    signal sent after it may straddle its rename.)"""
    end = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < end, "timed out"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            if condition():
                proc.send_signal(signum)   # pending until the process runs again
                return
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)


def alive(pids: set) -> list[int]:
    """Those of ``pids`` that still run (a zombie is ended: only its exit status is left)."""
    live = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.append(pid)
        except psutil.NoSuchProcess:
            pass
    return live


def assert_interrupted(proc: subprocess.Popen, children: set) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "backmix: interrupted" and "Traceback" not in err, err
    assert alive(children) == [], "workers outlived the command"


def test_sigterm_inside_the_block_raises_terminated_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)   # the handler runs before this ends
    assert signal.getsignal(signal.SIGTERM) == before


def sleep_long():
    time.sleep(60)


def test_a_forked_child_ends_on_sigterm_as_by_default():
    """A worker forked inside the block dies of the signal (no KeyboardInterrupt traceback there)."""
    with sigterm_as_interrupt():
        child = multiprocessing.get_context("fork").Process(target=sleep_long)
        child.start()
        time.sleep(0.2)
        child.terminate()        # SIGTERM
        child.join(10)
    assert child.exitcode == -signal.SIGTERM


def test_sigterm_mid_epoch_stops_workers_leaves_no_temporary_and_the_run_resumes(small_root, tmp_path):
    """``backmix train`` with 2 DataLoader workers per loader and a checkpoint every step, SIGTERM once a
    mid-epoch last.pt is on disk (another may be being written); then --resume finishes the run."""
    cfg = tiny(small_root, tmp_path / "run", epochs=2, batch_size=2, regen_every=0)
    words = [*cli_args(cfg), "--save-every", "1"]
    words[words.index("--workers") + 1] = "2"
    proc = subprocess.Popen([sys.executable, "-m", "backmix", *words], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children: set = set()
    last = Path(cfg.out) / "last.pt"
    wait_for(last.exists, proc, children)
    proc.send_signal(signal.SIGTERM)
    assert_interrupted(proc, children)
    assert len(children) >= 2                      # there were workers to stop
    assert temporaries(tmp_path) == []
    assert torch.load(last, weights_only=False)["epoch"] < 2
    done = subprocess.run([sys.executable, "-m", "backmix", "-q", *words, "--resume"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert torch.load(last, weights_only=False)["epoch"] == 2 and temporaries(tmp_path) == []


# Runs ``backmix`` with torch.save sending SIGTERM to its own process once the step-2 checkpoint of
# epoch 1 is written to its temporary file but not yet renamed onto last.pt.
TERM_IN_CHECKPOINT_WRITE = """
import os, signal, sys
import torch
real = torch.save

def save(obj, f, *args, **kwargs):
    real(obj, f, *args, **kwargs)
    part = obj.get("partial") if isinstance(obj, dict) else None
    if part and obj["epoch"] == 0 and part[0]["loader"]["step"] == 2:
        name = getattr(f, "name", f)   # the checkpoint writer hands torch.save an open file
        assert os.path.exists(name) and ".last.pt.tmp-" in str(name)
        os.kill(os.getpid(), signal.SIGTERM)

torch.save = save
from backmix.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_a_checkpoint_write_removes_its_temporary_and_resume_is_bit_exact(small_root, tmp_path):
    cfg = tiny(small_root, tmp_path / "cut", epochs=2, batch_size=4, regen_every=0)
    words = [*cli_args(cfg), "--save-every", "1"]
    cut = subprocess.Popen([sys.executable, "-c", TERM_IN_CHECKPOINT_WRITE, *words], cwd=REPO, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert_interrupted(cut, set())
    assert temporaries(tmp_path) == []
    ckpt = torch.load(Path(cfg.out) / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["partial"][0]["loader"]["step"] == 1   # the write before it
    done = subprocess.run([sys.executable, "-m", "backmix", "-q", *words, "--resume"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    straight = tiny(small_root, tmp_path / "straight", epochs=2, batch_size=4, regen_every=0)
    subprocess.run([sys.executable, "-m", "backmix", "-q", *cli_args(straight)], cwd=REPO, env=env(),
                   check=True, capture_output=True, timeout=300)
    a = torch.load(Path(cfg.out) / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(Path(straight.out) / "last.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_during_data_prepare_removes_its_temporary_folder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "backmix", "data", "prepare", "--out", str(tmp_path / "p"),
                             "--dataset", "digits-on-photos"], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    signal_while(lambda: list(tmp_path.glob(".p.tmp-*")), proc, signal.SIGTERM)   # writing into its temporary folder
    assert_interrupted(proc, set())
    assert list(tmp_path.iterdir()) == []


def test_a_stopping_command_leaves_the_resource_sharers_failed_handshake_unprinted():
    """Stopping workers mid-handshake fails a thread of multiprocessing's resource sharer; that thread's
    traceback is not printed once the command stops, any other thread's still is."""
    import os
    import threading
    from backmix.cli import quiet_stopped_sharer

    printed = []
    hook = quiet_stopped_sharer(printed.append)

    def failure_in(filename):
        code = compile("def serve():\n    raise EOFError('the worker went away')\n", filename, "exec")
        space = {}
        exec(code, space)
        try:
            space["serve"]()
        except EOFError as e:
            return threading.ExceptHookArgs((EOFError, e, e.__traceback__, None))

    hook(failure_in(os.path.join("lib", "multiprocessing", "resource_sharer.py")))
    assert printed == []
    other = failure_in(os.path.join("lib", "something_else.py"))
    hook(other)
    assert printed == [other]


def test_an_error_raised_while_an_interrupt_unwinds_the_command_is_still_interrupted(capsys):
    """torch.save's zip writer, stopped by SIGTERM half way, raises its own RuntimeError in place of the
    interrupt: the command still ends with its one line and 130; an error of its own is still raised."""
    import argparse
    from backmix.cli import run_command
    from backmix.osr_data.errors import Terminated

    def stopped_mid_write(args):
        try:
            raise Terminated
        except Terminated:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 455744 vs 455632")

    assert run_command(argparse.Namespace(quiet=True, func=stopped_mid_write)) == 130
    assert capsys.readouterr().err == "backmix: interrupted\n"

    def broken(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_command(argparse.Namespace(quiet=True, func=broken))
