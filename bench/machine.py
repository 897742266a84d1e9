"""What a benchmark ran on, as every report records it: one dict, and the line of it that tables and
plots print."""
from __future__ import annotations

import os
import platform


def machine() -> dict:
    """cpu (its model name), cores, usable_cores (this process's affinity: a container's or a
    ``taskset``'s share), system, python and gpu (None without CUDA)."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "system": platform.platform(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def machine_line(m: dict) -> str:
    """``machine()`` in one line."""
    return f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['gpu'] or 'no GPU'}, python {m['python']}"
