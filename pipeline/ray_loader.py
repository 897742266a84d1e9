"""The Ray backend: the files of each batch decoded by a Ray task, on any node of a cluster.

One task per batch turns the batch's dataset rows into uint8 canvases with the
reference loader's worker code (``CanvasDataset`` + ``collate_canvases``). A batch
is a pure function of its rows, so a task that Ray retries after its worker or
node died makes the same canvases: a fault costs a retry, never a batch. The
canvases come back in step order with at most ``prefetch`` tasks in flight, and
the reference loader's trainer-side half (``BatchTransform``: mix, crop, flip,
normalise; ``on_error``) runs where the trainer is, on its GPU when there is one.
Nothing about the foreground maps travels to the CPU nodes.

Every node reads the files by the paths of the index: they must be at the same
place on every node (a shared file system), and backmix must be installed there.
"""
from __future__ import annotations

import logging
import re
import socket
from collections import OrderedDict, deque
from itertools import islice
from typing import Iterator, Optional

import numpy as np
import torch

from backmix.osr_data.errors import BackMixError

from .core import Source, SourceBatch
from backmix.osr_data.canvas_reads import CanvasDataset, Photos, collate_canvases, collate_photos

log = logging.getLogger("backmix")

INSTALL_HINT = "Ray is not installed: pip install 'backmix[ray]'"
DEFAULT_PREFETCH = 4
TASK_RETRIES = 3          # how often Ray reruns a batch whose worker process or node died
_ADDRESS = re.compile(r"^(auto|[A-Za-z0-9_.\-]+:\d{1,5})$")


def require_ray():
    try:
        import ray
    except ImportError:
        raise BackMixError(INSTALL_HINT) from None
    return ray


def check_options(address: Optional[str], prefetch: int) -> None:
    if address is not None and not _ADDRESS.match(address):
        raise BackMixError(f"--ray-address must be 'auto' or HOST:PORT, got {address!r}")
    if prefetch < 1:
        raise BackMixError(f"--prefetch must be at least 1, got {prefetch}")


def join_ray(address: Optional[str], num_cpus: int):
    """The ``ray`` module, connected: to the cluster at ``address`` ("auto": the one `ray start`
    made on this machine), or with no address to a Ray started here with ``num_cpus`` CPUs and no
    dashboard (its node address loopback; Ray's servers still listen on every interface). A Ray this process already joined is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address is not None and address != "auto":
        check_reachable(address)
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     logging_level=logging.WARNING)
            from .ray_watchdog import guard_local_ray
            guard_local_ray(ray)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise BackMixError(f"cannot join {where}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") \
            from None
    return ray


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse a HOST:PORT nobody listens on at once: ``ray.init`` would retry it for minutes."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise BackMixError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): "
                           "start it with `ray start --head`, or check --ray-address") from None


# Per Ray worker process: each loader's dataset, deserialised once rather than once per task.
_DATASETS: "OrderedDict[bytes, CanvasDataset]" = OrderedDict()
_DATASETS_KEPT = 4


def canvas_batch(dataset: list, rows: np.ndarray):
    """The Ray task: ``collate_canvases`` of the rows, with numpy arrays for Ray's zero-copy transport.

    ``dataset`` is ``[ObjectRef of a CanvasDataset]``: inside a list, Ray hands the task the
    reference, which this worker resolves once, instead of the whole index with every task."""
    import ray
    ref = dataset[0]
    key = ref.binary()
    if key not in _DATASETS:
        _DATASETS[key] = ray.get(ref)
        while len(_DATASETS) > _DATASETS_KEPT:
            _DATASETS.popitem(last=False)
    data = _DATASETS[key]
    items = [data[i] for i in rows.tolist()]
    canvas, rows, failed = collate_canvases(items)
    photos = collate_photos(items)   # the whole images too, when crops are cut from them
    return ((None if canvas is None else canvas.numpy()), rows.numpy(), failed,
            None if photos is None else (photos.pixels.numpy(), photos.sizes.numpy()))


class RaySource(Source):
    """Ray tasks decode each batch (``canvas_batch``), at most ``prefetch`` in flight, in step order.

    address: the cluster to join ("auto" or HOST:PORT); None starts Ray on this machine with
    ``config.num_workers`` CPUs (at least one). prefetch: batches in flight at most.
    """

    name = "ray"
    whole_images_refused = None   # crops cut from the image: its tasks read the whole image too

    def __init__(self, index, config, device, *, address: Optional[str] = None, prefetch: Optional[int] = None) -> None:
        super().__init__(index, config, device)
        self.address = address
        self.prefetch = DEFAULT_PREFETCH if prefetch is None else prefetch
        check_options(self.address, self.prefetch)

    def open(self, rows, view) -> None:
        super().open(rows, view)
        cfg = self.config
        self._ray = ray = join_ray(self.address, max(1, cfg.num_workers))
        self._dataset = [ray.put(CanvasDataset(self.index, cfg.canvas, cfg.canvas_mode, whole=cfg.crops_images))]
        # SPREAD: the batches go round the nodes instead of filling the driver's node first.
        self._task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")(canvas_batch)

    def _own_copy(self, canvas: np.ndarray) -> torch.Tensor:
        """Ray's arrays are read-only views of its object store: the batch gets its own copy, in
        pinned memory when it goes on to a GPU (as the reference's ``pin_memory``)."""
        out = torch.empty(canvas.shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        out.numpy()[...] = canvas
        return out

    def batches(self, plan) -> Iterator[SourceBatch]:
        ray = self._ray
        steps = iter(plan)
        in_flight = deque((step, self._task.remote(self._dataset, rows)) for step, rows in islice(steps, self.prefetch))
        try:
            while in_flight:
                step, ref = in_flight.popleft()
                canvas, rows, failed, photos = ray.get(ref)
                in_flight.extend((s, self._task.remote(self._dataset, r)) for s, r in islice(steps, 1))
                if photos is not None:
                    photos = Photos(self._own_copy(photos[0]), torch.from_numpy(np.array(photos[1])))
                yield SourceBatch(step, np.array(rows), None if canvas is None else self._own_copy(canvas), failed,
                                  photos=photos)
        finally:
            # An epoch left part-way: its remaining batches (--prefetch at most) are not wanted. They are let
            # finish and dropped, not cancelled: Ray's cancel of a task that is just finishing can abort the
            # driver process ("Tried to complete task that was not pending", a race fixed upstream later).
            in_flight.clear()
