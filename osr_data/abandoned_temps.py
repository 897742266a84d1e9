"""Temporary files and folders of writers that died: removed by the next writer of the same name.

Every atomic writer (``atomic_file``, ``atomic_folder``) names its temporary ``.<name>.tmp-<pid>...``
beside the target, so a temporary whose process no longer runs (killed with -9, out of memory)
can only be litter: the next writer of ``<name>`` removes it. A live writer's is never touched.
"""
from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def remove_abandoned_temps(out: Path) -> None:
    """Remove ``.<out.name>.tmp-<pid>*`` files and folders beside ``out`` whose process is gone."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = tmp.name[len(out.name) + 6:].split("-", 1)[0]
        if pid.isascii() and pid.isdigit() and not process_exists(int(pid)):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # it exists, under another user
        return True
    return True
