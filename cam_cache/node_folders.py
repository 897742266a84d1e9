"""Cache folders local to each node under torch.distributed: rank 0's generations, copied.

On a cluster without a file system every node shares, ``--cache`` names a folder on each
node's own disk. Rank 0 still builds and publishes every generation in its folder
(``publish_generation``); before that, the shards of the ranks that do not see its folder
reach it over torch.distributed (``gather_shards``), and after it the published file reaches
the LOCAL_RANK 0 of every other node, which publishes the same bytes in its own folder
(``share_current``): the same generation number, written under a temporary name, its
CRC-32 checked against rank 0's, renamed, then CURRENT moved, as rank 0's publish does. Every
rank reads the folder of its own node. A shared folder needs none of this.

Layouts (``settle_layout``): "shared" checks that every rank sees rank 0's folder (rank 0
writes a file of a random name there and the others look for it) and refuses the run in one
line otherwise; "auto" makes that same check and copies to the ranks that do not see the file;
"node-local" skips the check and copies to every node but rank 0's (a node is torchrun's
GROUP_RANK, else the host name). A rank that misses the file in a folder it does share (a network file
system's stale listing) costs a copy, never a wrong generation: a copy whose bytes are already there
is not sent, and a shard sent to rank 0 replaces itself.

Memory: files travel as bytes, CHUNK_BYTES at a time, point to point on the default process
group (gloo: CPU tensors; NCCL: on this rank's GPU), so no message and no buffer holds a whole
table. For ImageNet (1.28 M rows of 8 x 8 float16 maps: a 164 MB generation) rank 0 holds the
merged generation while it publishes (164 MB, as with a shared folder) plus one 8 MiB chunk;
every other rank its shard's maps while it stages (164 MB / world size, and 9 bytes a row of
bookkeeping) plus one 8 MiB chunk (and its copy on the GPU under NCCL) while it sends or receives;
the rest streams from and to disk.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from backmix._fs import atomic_file, fsync_dir
from backmix.osr_data.errors import BackMixError

from .ranks import exchange, launched_as, on_every_rank, rank_and_world
from .store import (ForegroundCache, generation_path, make_cache_folder, pending_dir, prune, publish_lock, read_pointer,
                    start_cache, write_pointer)

LAYOUTS = ("auto", "shared", "node-local")
CHUNK_BYTES = 8 << 20

_settled: dict[str, "NodeFolders"] = {}    # per cache folder, once per process


@dataclass(frozen=True)
class NodeFolders:
    """Which ranks read a folder other than rank 0's, and which of them write it (one a node)."""
    remote: tuple[int, ...] = ()
    leaders: tuple[int, ...] = ()


def node_folders(cache_dir: str | os.PathLike, layout: Optional[str] = None) -> NodeFolders:
    """The layout of ``cache_dir`` on every rank: settled with ``layout`` (call on every rank), or the one
    settled before for this folder, or "auto" when none was."""
    if rank_and_world()[1] == 1:
        return NodeFolders()
    key = str(Path(cache_dir).absolute())
    if layout is None and key in _settled:
        return _settled[key]
    _settled[key] = settle_layout(cache_dir, layout or "auto")
    return _settled[key]


def settle_layout(cache_dir: str | os.PathLike, layout: str) -> NodeFolders:
    """Find which ranks see rank 0's ``cache_dir`` (see the module doc); on every rank, rank 0's folder
    made. Raises the same one-line error on every rank when the folders do not fit ``layout``."""
    if layout not in LAYOUTS:
        raise BackMixError(f"unknown cache layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    rank, world = rank_and_world()
    if world == 1:
        return NodeFolders()
    cache_dir = Path(cache_dir)
    token = f".rank0-sees-{secrets.token_hex(8)}"
    with on_every_rank(cache_dir):
        if rank == 0 and layout != "node-local":
            cache_dir.mkdir(parents=True, exist_ok=True)
            (cache_dir / token).touch()
            fsync_dir(cache_dir)
    token, folder0 = exchange((token, str(cache_dir)), world)[0]
    try:   # a fresh listing, not a lookup a network file system may answer from its cache
        sees = rank == 0 or layout == "node-local" or token in os.listdir(cache_dir)
    except OSError:
        sees = False
    node = os.environ.get("GROUP_RANK") or socket.gethostname()
    facts = exchange((sees, node, launched_as()[2]), world)
    if rank == 0:
        (cache_dir / token).unlink(missing_ok=True)
    if layout == "node-local":
        remote = [r for r, (_, n, _) in enumerate(facts) if n != facts[0][1]]
    else:
        remote = [r for r, (s, _, _) in enumerate(facts) if not s]
    if layout == "shared" and remote:
        raise BackMixError(f"--cache-layout shared, but rank {remote[0]} does not see rank 0's cache folder "
                           f"{folder0}: give each node a folder of its own with --cache-layout node-local "
                           "(or auto)")
    leaders = [r for r in remote if facts[r][2] == 0]
    for r in remote:
        if facts[r][1] not in {facts[w][1] for w in leaders}:
            raise BackMixError(f"rank {r} reads a cache folder of its own node, but no rank of that node has "
                               "LOCAL_RANK 0 to write it")
    return NodeFolders(tuple(remote), tuple(leaders))


def gather_shards(cache_dir: str | os.PathLike, generation: int, folders: NodeFolders) -> None:
    """The staged shards of generation ``generation`` of the ranks in ``folders.remote``, copied into
    rank 0's pending folder (call on every rank, after every shard is staged)."""
    if not folders.remote:
        return
    rank, world = rank_and_world()
    name = f"shard-{rank}-of-{world}.arrow"
    mine = pending_dir(cache_dir, generation) / name
    size = None
    with on_every_rank(cache_dir):
        if rank in folders.remote:
            size = mine.stat().st_size
    sizes = exchange(size, world)
    with on_every_rank(cache_dir):
        for r in folders.remote:
            if rank == r:
                send_file(mine, sizes[r], 0)
            elif rank == 0:
                incoming = Incoming(sizes[r], r)
                try:
                    with atomic_file(pending_dir(cache_dir, generation) / f"shard-{r}-of-{world}.arrow") as tmp:
                        incoming.into(tmp)
                finally:
                    incoming.drain()


def share_current(cache_dir: str | os.PathLike, folders: NodeFolders) -> None:
    """Rank 0's current generation published in the folder of every ``folders.leaders`` rank that does
    not hold it yet (call on every rank; returns once every folder holds it)."""
    if not folders.leaders:
        return
    rank, world = rank_and_world()
    cache_dir = Path(cache_dir)
    header = None
    with on_every_rank(cache_dir):
        if rank == 0:
            header = _current(cache_dir)
    header = exchange(header, world)[0]
    need = False
    with on_every_rank(cache_dir):
        if rank in folders.leaders:
            need = not _holds(cache_dir, header)
    needs = exchange(need, world)
    with on_every_rank(cache_dir):
        for r in folders.leaders:
            if not needs[r]:
                continue
            if rank == 0 and "uniform" not in header:
                send_file(generation_path(cache_dir, header["generation"]), header["bytes"], r)
            elif rank == r:
                incoming = None if "uniform" in header else Incoming(header["bytes"], 0)
                try:
                    _install(cache_dir, header, incoming)
                finally:
                    if incoming is not None:
                        incoming.drain()


def _current(cache_dir: Path) -> dict:
    """What a copy of rank 0's current generation must hold: its number and keep, and the file's size
    and CRC-32 (generation 0 without a file: its pointer's description)."""
    ptr = read_pointer(cache_dir)
    generation, keep = int(ptr["generation"]), int(ptr.get("keep", 3))
    if generation == 0 and ptr.get("uniform"):
        return {"generation": 0, "keep": keep, "uniform": ptr["uniform"]}
    path = generation_path(cache_dir, generation)
    return {"generation": generation, "keep": keep, "bytes": path.stat().st_size, "crc32": file_crc(path)}


def _holds(cache_dir: Path, header: dict) -> bool:
    try:
        ptr = read_pointer(cache_dir)
    except BackMixError:
        return False
    if int(ptr["generation"]) != header["generation"]:
        return False
    if "uniform" in header:
        return ptr.get("uniform") == header["uniform"]
    path = generation_path(cache_dir, header["generation"])
    return path.is_file() and path.stat().st_size == header["bytes"] and file_crc(path) == header["crc32"]


def _install(cache_dir: Path, header: dict, incoming: Optional[Incoming]) -> None:
    """Publish rank 0's current generation (``header``) in this node's folder: the file (``incoming``,
    CRC-checked, renamed into place), then CURRENT, then the pruning rank 0's publish does."""
    generation, keep = header["generation"], header["keep"]
    make_cache_folder(cache_dir)
    with publish_lock(cache_dir):
        if "uniform" in header:
            write_pointer(cache_dir, 0, keep, uniform=header["uniform"])
        else:
            path = generation_path(cache_dir, generation)
            with atomic_file(path) as tmp:
                crc = incoming.into(tmp)
                if crc != header["crc32"]:
                    raise BackMixError(f"the copy of generation {generation} from rank 0 does not match its "
                                       f"CRC-32 ({crc}, rank 0's {header['crc32']}); not published")
            fsync_dir(cache_dir)
            write_pointer(cache_dir, generation, keep)
        prune(cache_dir, generation, keep)
    ForegroundCache(cache_dir)     # opens, with its CRC check, as this node's readers will


def open_on_every_rank(cache_dir: str | os.PathLike, index, *, grid: int, canvas_mode: str,
                       layout: str = "auto") -> ForegroundCache:
    """A run's foreground cache under torch.distributed (or alone; call on every rank): rank 0 starts it in
    its folder (``start_cache``: the existing one, else generation 0), the folders of the other nodes get
    its current generation (``share_current``), and every rank opens the folder of its own node."""
    rank, world = rank_and_world()
    with on_every_rank(cache_dir) if world > 1 else contextlib.nullcontext():
        if rank == 0:
            start_cache(cache_dir, index, grid=grid, canvas_mode=canvas_mode)
    share_current(cache_dir, node_folders(cache_dir, layout))
    return ForegroundCache(cache_dir, index=index, grid=grid, canvas_mode=canvas_mode)


def file_crc(path: Path) -> str:
    """CRC-32 of a file's bytes, read CHUNK_BYTES at a time."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _buffer(size: int) -> torch.Tensor:
    """One chunk's buffer where the process group moves bytes: the GPU under NCCL, else the CPU."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.empty(min(size, CHUNK_BYTES), dtype=torch.uint8, device=device)


def send_file(path: Path, size: int, dst: int) -> None:
    """Send ``size`` bytes of ``path`` to rank ``dst`` (which reads them as ``Incoming``), a chunk at a time.
    A read error still sends every chunk (zeros), so the receiver is not left waiting; it is raised after."""
    error = None
    buf = _buffer(size)
    host = buf if buf.device.type == "cpu" else torch.empty(len(buf), dtype=torch.uint8)
    try:
        f = open(path, "rb")
    except OSError as e:
        f, error = None, e
    try:
        for offset in range(0, size, CHUNK_BYTES):
            n = min(CHUNK_BYTES, size - offset)
            if error is None:
                try:
                    if f.readinto(memoryview(host.numpy())[:n]) != n:
                        raise OSError(f"{path} is shorter than {size} bytes")
                except OSError as e:
                    error = e
            if host is not buf:
                buf[:n].copy_(host[:n])
            dist.send(buf[:n], dst)
    finally:
        if f is not None:
            f.close()
    if error is not None:
        raise error


class Incoming:
    """The ``size`` bytes rank ``src`` sends (``send_file``), a chunk at a time: read once, into a file
    (``into``), or dropped (``drain``, in a ``finally``) when the receiver failed before reading them, so the
    sender is never left waiting on it."""

    def __init__(self, size: int, src: int) -> None:
        self.size, self.src, self.read = size, src, False

    def into(self, path: Optional[Path]) -> str:
        """Write them to ``path`` (None: nowhere); returns their CRC-32. An error opening or writing the
        file still receives every chunk, then is raised."""
        self.read, error, crc = True, None, 0
        buf = _buffer(self.size)
        try:
            f = open(path, "wb") if path is not None else None
        except OSError as e:
            f, error = None, e
        try:
            for offset in range(0, self.size, CHUNK_BYTES):
                n = min(CHUNK_BYTES, self.size - offset)
                dist.recv(buf[:n], self.src)
                chunk = buf[:n].cpu().numpy()
                crc = zlib.crc32(chunk, crc)
                if f is not None and error is None:
                    try:
                        f.write(chunk)
                    except OSError as e:
                        error = e
        finally:
            if f is not None:
                f.close()
        if error is not None:
            raise error
        return f"{crc:08x}"

    def drain(self) -> None:
        if not self.read:
            self.into(None)
