"""Discovery's stacks as a compact listing: what ``ray-mff fuse`` plans from, at any archive size.

A :class:`Listing` holds, in natural order (:func:`ray_mff.stacks.natural_sort_text`),

- ``ids`` and ``fingerprints`` (:func:`ray_mff.stacks.source_fingerprint`) as Arrow string arrays:
  all the planner compares with the manifest;
- each stack itself (uris and meta, :func:`stack_json`) in blocks of JSON rows kept as
  zstd-compressed Arrow IPC buffers, decoded only for the stacks asked for (:meth:`Listing.stacks`:
  the stacks a run will fuse).

A stack's JSON is a few hundred bytes and most of it repeats from one stack to the next (the root,
the folder, the meta keys), so a block compresses about tenfold: a million stacks' listing is tens
of MiB, not the ~300 MiB of JSON text or the ~1 GiB of Python Stack objects it replaces, and it is
built while the folder listing streams in (:class:`ray_mff.stacks.Discovery`, one folder at a time),
so no list of the archive's stacks or files is ever held (``bench/manifest.py``).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_mff import storage
from ray_mff.errors import MFFError
from ray_mff.stacks import Discovery, Stack, natural_sort_text, source_fingerprint, unique_ids

log = logging.getLogger("ray_mff")

BLOCK_ROWS = 16384
"""Stacks per compressed block: what is held as Python objects at once while a listing is built."""

_JSON = pa.schema([("stack", pa.string())])
_IPC = pa.ipc.IpcWriteOptions(compression="zstd")


def stack_json(stack: Stack) -> str:
    """A Stack as one JSON string (uris and meta round-trip): a listing row, a Ray Data item."""
    payload = {"id": stack.id, "uris": list(stack.uris), "meta": stack.meta}
    return json.dumps(payload, default=jsonable)


def stack_from_json(text: str) -> Stack:
    d = json.loads(text)
    meta = {k: tuple(v) if isinstance(v, list) else v for k, v in d["meta"].items()}
    return Stack(d["id"], tuple(d["uris"]), meta)


def jsonable(value):
    """``json.dumps``' ``default``: numpy scalars as Python numbers, anything else as its str."""
    return value.item() if isinstance(value, np.generic) else str(value)


def _pack(texts: list[str]) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, _JSON, options=_IPC) as writer:
        writer.write_batch(pa.record_batch([pa.array(texts, pa.string())], schema=_JSON))
    return sink.getvalue()


def _unpack(block: pa.Buffer) -> pa.Array:
    return pa.ipc.open_stream(block).read_all().column(0).combine_chunks()


class Listing:
    """Stacks in natural order: ``ids``, ``fingerprints`` (Arrow arrays) and the stacks themselves,
    compressed, decoded on demand (:meth:`stacks`). Build one with :func:`discover_listing` (from
    storage) or :func:`listing_of` (from Stack objects)."""

    def __init__(self, ids: pa.Array, fingerprints: pa.Array, rows: np.ndarray, blocks: list[pa.Buffer],
                 starts: np.ndarray):
        self.ids, self.fingerprints = ids, fingerprints
        self._rows = rows  # per listed stack: its row in the blocks
        self._blocks, self._starts = blocks, starts  # starts[b]: the first row of block b

    def __len__(self) -> int:
        return len(self.ids)

    def stacks(self, index: Iterable[int] | np.ndarray | None = None) -> list[Stack]:
        """The Stack objects at these positions (default: all), in the order given. Each block
        holding one of them is decompressed once."""
        at = np.arange(len(self)) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)
        return _decode(self._blocks, self._starts, self._rows[at])

    def lazy(self, index: np.ndarray) -> "Stacks":
        """The stacks at these positions as a sequence made :data:`ITER_CHUNK` at a time as it is
        iterated: a run over a million new stacks never holds a million Stack objects."""
        return Stacks(self, np.asarray(index, dtype=np.int64).reshape(-1))


ITER_CHUNK = 32768
"""Stack objects made at once while a :class:`Stacks` is iterated (about 50 MiB)."""


class Stacks(Sequence):
    """Some stacks of a :class:`Listing` (what a run will fuse), a read-only sequence whose Stack
    objects are made as they are reached: iterating decodes :data:`ITER_CHUNK` at a time, indexing
    one (a slice is another :class:`Stacks`). Equal to a list of the same stacks."""

    def __init__(self, listing: Listing, index: np.ndarray):
        self._listing, self._index = listing, index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Stacks(self._listing, self._index[i])
        return self._listing.stacks([self._index[i]])[0]

    def __iter__(self) -> Iterator[Stack]:
        for lo in range(0, len(self._index), ITER_CHUNK):
            yield from self._listing.stacks(self._index[lo:lo + ITER_CHUNK])

    def __eq__(self, other) -> bool:
        if isinstance(other, (Stacks, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"<{len(self)} stacks of a listing>"


def _decode(blocks: list[pa.Buffer], starts: np.ndarray, rows: np.ndarray) -> list[Stack]:
    """The stacks at these rows of the blocks, in that order; each block needed is decompressed once."""
    block_of = np.searchsorted(starts, rows, side="right") - 1
    texts: list[str | None] = [None] * len(rows)
    for b in np.unique(block_of).tolist():
        where = np.flatnonzero(block_of == b)
        offsets = pa.array(rows[where] - starts[b], pa.int64())
        for i, text in zip(where.tolist(), _unpack(blocks[b]).take(offsets).to_pylist()):
            texts[i] = text
    return [stack_from_json(t) for t in texts]


class _Builder:
    """Rows being added: the current block as Python lists, earlier blocks compressed, and the
    per-row columns discovery needs to finish (folder: earlier outputs are left out by folder;
    natural sort text; the ``leave_out`` flag) as Arrow arrays."""

    def __init__(self, leave_out: Callable[[Stack], bool] | None, block_rows: int):
        self.leave_out, self.block_rows = leave_out, block_rows
        self.blocks: list[pa.Buffer] = []
        self.starts: list[int] = []
        self.columns: dict[str, list[pa.Array]] = {k: [] for k in ("id", "fp", "folder", "sort", "leave")}
        self._rows: dict[str, list] = {k: [] for k in ("id", "fp", "folder", "sort", "leave", "json")}
        self.n = 0

    def add(self, stack: Stack) -> None:
        r = self._rows
        r["id"].append(stack.id)
        r["fp"].append(source_fingerprint(stack))
        r["folder"].append(stack.meta.get("folder", ""))
        r["sort"].append(natural_sort_text(stack.id))
        r["leave"].append(bool(self.leave_out is not None and self.leave_out(stack)))
        r["json"].append(stack_json(stack))
        if len(r["json"]) >= self.block_rows:
            self.cut()

    def cut(self) -> None:
        r = self._rows
        if not r["json"]:
            return
        self.starts.append(self.n)
        self.blocks.append(_pack(r["json"]))
        self.n += len(r["json"])
        for key, kind in (("id", pa.string()), ("fp", pa.string()), ("folder", pa.string()),
                          ("sort", pa.string()), ("leave", pa.bool_())):
            self.columns[key].append(pa.array(r[key], kind))
        self._rows = {k: [] for k in r}

    def merge(self, share: "_Share") -> None:
        """Append another builder's rows (a worker's share of a parallel discovery)."""
        self.cut()
        self.blocks += share.blocks
        self.starts += [self.n + start for start in share.starts]
        for key, arrays in share.columns.items():
            self.columns[key] += arrays
        self.n += share.n

    def column(self, key: str) -> pa.Array:
        kind = pa.bool_() if key == "leave" else pa.string()
        return pa.concat_arrays(self.columns[key]) if self.columns[key] else pa.array([], kind)

    def finish(self, outputs: Iterable[str] = (), empty_root: Callable[[], Stack] | None = None) -> Listing:
        """The listing: stacks under an earlier OUTPUT (``outputs``: ``"<folder>/"``) left out, the
        empty root's row when nothing is left, ids made unique (:func:`ray_mff.stacks.unique_ids`, on
        the clashing rows only), ``leave_out`` rows dropped, natural order."""
        self.cut()
        keep = np.ones(self.n, dtype=bool)
        outputs = sorted(outputs)
        if outputs and self.n:
            folder = self.column("folder")
            for out in outputs:
                inside = pc.or_(pc.equal(folder, out[:-1]), pc.starts_with(folder, out))
                keep &= ~np.asarray(inside.to_numpy(zero_copy_only=False), dtype=bool)
        if not keep.any() and empty_root is not None:
            self.add(empty_root())
            self.cut()
            keep = np.concatenate([keep, np.ones(self.n - len(keep), dtype=bool)])
        ids = self.column("id")
        counts = pc.value_counts(ids.filter(pa.array(keep)))
        clashing = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        if len(clashing):
            clash = keep & np.asarray(pc.is_in(ids, value_set=clashing).to_numpy(zero_copy_only=False), dtype=bool)
            taken = set(ids.filter(pa.array(keep)).to_pylist())
            renamed = unique_ids(_decode(self.blocks, np.asarray(self.starts), np.flatnonzero(clash)), taken=taken)
            keep &= ~clash
            for stack in renamed:
                self.add(stack)
            self.cut()
            keep = np.concatenate([keep, np.ones(self.n - len(keep), dtype=bool)])
            ids = self.column("id")
        keep &= ~np.asarray(self.column("leave").to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.flatnonzero(keep)
        at = pa.array(rows, pa.int64())
        ids = ids.take(at)
        order = pc.sort_indices(pa.table({"sort": self.column("sort").take(at), "id": ids}),
                                [("sort", "ascending"), ("id", "ascending")])
        return Listing(ids.take(order), self.column("fp").take(at).take(order),
                       rows[order.to_numpy()], self.blocks, np.asarray(self.starts, dtype=np.int64))


def listing_of(stacks: Iterable[Stack], block_rows: int = BLOCK_ROWS) -> Listing:
    """A listing of these stacks (ids assumed unique), in natural order."""
    builder = _Builder(None, block_rows)
    for stack in stacks:
        builder.add(stack)
    return builder.finish()


PARALLEL_MIN_FOLDERS = 32768
"""A local root with at least this many sub-folders is discovered by several processes. Starting
the workers costs about a second (an interpreter, numpy and pyarrow each): on 2 quiet cores the
shared work pays for it from about 16k stack folders (``bench/manifest.py --parts e2e``: 10k
stacks took 2.1 s in 2 workers against 1.75 s in one process, 100k 9.6 s against 16.6 s), and
not at all while another job holds a core (17k: 3.6 s against 2.4 s); twice that is the bar."""


def discover_listing(root: str, pattern: str | re.Pattern | None = None, *, s3_endpoint: str | None = None,
                     stack_per_file: bool = False, leave_out: Callable[[Stack], bool] | None = None,
                     block_rows: int = BLOCK_ROWS, workers: int | None = None,
                     parallel_min: int = PARALLEL_MIN_FOLDERS) -> Listing:
    """:func:`ray_mff.stacks.discover_stacks` as a :class:`Listing`: the same stacks in the same
    order, built while the folder listing streams in (:func:`ray_mff.storage.iter_folders`).

    ``leave_out``: stacks for which it is true are dropped once ids are unique (``ray-mff fuse``:
    stacks inside an OUTPUT that lies under INPUT; :class:`InsideOutput`, picklable).

    A local root with ``parallel_min`` or more sub-folders (an archive of one folder per stack, or
    of many dated or per-plate folders) is discovered by ``workers`` processes (default: one per
    core): the root is listed once here, its sub-folders are shared out in batches, each process
    lists its sub-folders and applies the rules (:class:`ray_mff.stacks.Discovery`: every rule
    looks only inside a sub-folder) and sends back its compressed rows; ids are made unique and
    the order natural over all of them here, so the listing is the same as one process's."""
    folders, parallel = None, False
    top = _local_top(root, s3_endpoint)
    if top is not None:  # the root is listed once: its sub-folders go here or to the workers, its files stay here
        names, root_files = top
        parallel = (workers or _cores()) > 1 and len(names) >= max(parallel_min, 2)
        folders = [("", root_files)] if parallel else \
            itertools.chain(storage.iter_folders(root, top=names), [("", root_files)])
    found = Discovery(root, pattern, s3_endpoint=s3_endpoint, stack_per_file=stack_per_file, folders=folders)
    builder = _Builder(leave_out, block_rows)
    if parallel:
        _discover_in_parallel(builder, found.outputs, names, workers or _cores(),
                              (os.fspath(root), pattern, stack_per_file, leave_out, block_rows))
    for stack in found:
        builder.add(stack)
    listing = builder.finish(found.outputs, found.empty_root)
    pa.default_memory_pool().release_unused()  # what the builder's columns freed goes back before planning
    return listing


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _local_top(root: str, s3_endpoint: str | None):
    """(sub-folder names, the root's files) of a local folder root, else None (an object store, an
    OME-Zarr root, no such folder)."""
    if storage.is_remote(os.fspath(root)) or os.fspath(root).lower().rstrip("/").endswith(".zarr"):
        return None  # an OME-Zarr root is one store: its rules look at all of it
    fs, path = storage.resolve(os.fspath(root), s3_endpoint=s3_endpoint)
    if not os.path.isdir(path):
        return None  # Discovery says what is wrong
    return storage.local_top(os.fspath(root))


def _discover_in_parallel(builder: "_Builder", outputs: set, names: list[str], workers: int, args: tuple) -> None:
    """The root's sub-folders ``names`` discovered by ``workers`` processes, about 8 batches per
    worker for balance; their rows are merged into ``builder`` in batch order and the earlier
    OUTPUTs they found into ``outputs``.

    The workers are fresh interpreters (``python -c``, :func:`_worker_main`) fed pickled batches on
    stdin: not ``multiprocessing``, whose spawn re-imports the caller's ``__main__`` (a user's
    script without a main guard would run again) and whose fork would copy this process's threads
    (Arrow's, Ray's)."""
    import concurrent.futures
    import pickle
    import queue
    import subprocess
    import sys

    size = -(-len(names) // (workers * 8))
    batches = [names[i:i + size] for i in range(0, len(names), size)]
    workers = min(workers, len(batches))
    log.info("discovery: %d sub-folders of %s in %d batches over %d processes", len(names), args[0],
             len(batches), workers)
    idle: queue.Queue = queue.Queue()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this ray_mff, however it was found
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    procs = [subprocess.Popen([sys.executable, "-c", "from ray_mff.listing import _worker_main; _worker_main()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) for _ in range(workers)]
    for proc in procs:
        idle.put(proc)

    def run(batch: list[str]) -> _Share:
        proc = idle.get()
        try:
            pickle.dump((args, batch), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            ok, result = pickle.load(proc.stdout)
        except (EOFError, BrokenPipeError) as err:
            try:
                status = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                status = "none yet"
            raise MFFError(args[0], f"a discovery worker process ended early (exit {status}); "
                                    "what it said is above") from err
        finally:
            idle.put(proc)
        if not ok:
            raise result  # what discovery in this process would have raised
        return result

    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for share in pool.map(run, batches):
                builder.merge(share)
                outputs |= share.outputs
    finally:
        for proc in procs:
            try:
                proc.stdin.close()  # end of requests: the worker exits
            except OSError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _worker_main() -> None:
    """A discovery worker: ``(args, batch)`` pickled on stdin -> ``(True, its _Share)`` or
    ``(False, the exception)`` pickled on stdout, until stdin closes. Anything else written to
    stdout goes to stderr."""
    import pickle
    import signal
    import sys

    # the driver is in charge: Ctrl-C or a scheduler's SIGTERM reach it, and a worker ends when its
    # stdin closes (the driver finished, or died: then after its batch, on the broken pipe)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    while True:
        try:
            args, batch = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            reply = (True, _discover_share(*args, batch))
        except Exception as err:  # noqa: BLE001 - sent back and raised there
            reply = (False, err)
        try:
            pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
        except BrokenPipeError:  # the driver is gone (killed): nothing to report to
            return


@dataclass
class _Share:
    """What one process of a parallel discovery found: compressed rows and earlier OUTPUTs."""

    blocks: list
    starts: list
    columns: dict
    n: int
    outputs: set


def _discover_share(root: str, pattern, stack_per_file: bool, leave_out, block_rows: int,
                    names: list[str]) -> _Share:
    """A worker's share: these sub-folders of the root, listed and turned into rows."""
    found = Discovery(root, pattern, s3_endpoint=None, stack_per_file=stack_per_file,
                      folders=storage.iter_folders(root, top=names))
    builder = _Builder(leave_out, block_rows)
    for stack in found:
        builder.add(stack)
    builder.cut()
    return _Share(builder.blocks, builder.starts, builder.columns, builder.n, found.outputs)


@dataclass(frozen=True)
class InsideOutput:
    """``leave_out`` for OUTPUT under INPUT: a stack lies inside OUTPUT when it has uris and all
    start with ``prefix`` (OUTPUT in INPUT's spelling, with its separator); ``prefix`` None: every
    stack with uris does (INPUT inside OUTPUT). A class, not a closure, so worker processes get it."""

    prefix: str | None

    def __call__(self, stack: Stack) -> bool:
        return bool(stack.uris) and (self.prefix is None or all(u.startswith(self.prefix) for u in stack.uris))
