"""One stack in, one fused image and one manifest row out; and the local (no Ray) loop over a run.

:func:`process_stack` is the unit of work everywhere: the local loop below, the Ray Data
pipeline's fusion actors (:mod:`ray_mff.pipeline`) and the nightly job all call it, so a stack is
read, fused, written and scored the same way whoever runs it. It never raises for bad input: a
bad stack becomes an error row naming the file and the reason, and the run carries on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_mff import io, lease, manifest, sinks, storage, zstack
from ray_mff.align import AlignedPlanes, AlignOptions, align_stack
from ray_mff.errors import EmptyStackError, EngineUnavailableError, MFFError
from ray_mff.listing import Listing
from ray_mff.stacks import Stack, legacy_fingerprint, source_fingerprint

log = logging.getLogger("ray_mff")



@dataclass
class RunOptions:
    """How a run writes its outputs. Shared by the local loop and the Ray pipeline."""

    output_format: str | None = None  # "png" | "tif" | "jpg"; None = PNG for 8-bit, TIFF otherwise
    save_decision_maps: bool = False
    compute_metrics: bool = True
    metrics_max_pixels: int = 16_000_000  # larger results get no metrics (they cost O(N*H*W))
    q_y_max_sources: int = 8  # Q_Y compares every pair of sources: O(N^2*H*W); skipped above this
    max_pixels: int = io.DEFAULT_MAX_PIXELS
    force: bool = False
    z_axis: str = "auto"  # single-file stacks: focus axis letter, "auto" or "none" (ray_mff.zstack)
    depth_map: bool = False  # write <stack>_depth.tif / _height.tif / _depth.png (ray_mff.depth_map)
    align: AlignOptions = field(default_factory=AlignOptions)  # registration/photometry before fusion
    retry_errors: bool = False  # also redo stacks whose errors wait for a changed input (input, resource)
    recipe_id: str | None = None  # what makes the output bytes (recipe_id()); set by the CLI
    attempts: int = 3  # tries per read/write when the *storage* fails (backoff 0.5 s, 1 s, ...)
    retry_backoff: float = 0.5
    flush_every: int = 32  # manifest part every N rows ...
    flush_seconds: float = 30.0  # ... or when the oldest unwritten row is this old
    lease_uri: str | None = None  # workers write nothing once this lease names another run
    lease_token: str | None = None
    attempt_ledger: object = None  # Ray: counts deaths per stack (pipeline.AttemptLedger client)


@dataclass
class RunSummary:
    """Counts of a run, the means of its scores, and a bounded sample of its rows for display.

    Memory stays flat in the number of stacks: an archive run of millions of stacks keeps
    counters and the first ``keep_rows`` rows; the manifest has all of them.
    """

    run_id: str
    output: str
    fused: int = 0
    skipped: int = 0
    failed: int = 0
    rows: list[dict] = field(default_factory=list)
    keep_rows: int = 1000
    # Fraction of the fusion engines' time spent fusing (sum of fuse_s over the engines' wall
    # time); None when nothing was fused. Low on a GPU run: the CPU stages do not keep it fed.
    engine_busy: float | None = None
    reasons: dict = field(default_factory=dict)  # why stacks were fused: new, input changed, recipe changed...
    waiting: int = 0  # skipped errors that wait for their input to change
    stopped: str | None = None  # "SIGTERM" / "SIGINT" / "storage" / "lease" when the run stopped early
    stop_reason: str | None = None
    unrecorded: int = 0  # finished stacks whose rows could not be written (storage gone): redone next run
    error_kinds: Counter = field(default_factory=Counter)
    _sums: dict = field(default_factory=dict, repr=False)

    def record(self, row: dict) -> None:
        if row["status"] == manifest.STATUS_OK:
            self.fused += 1
            for key in ("q_g", "q_y", "q_mi"):
                value = row.get(key)
                if value is not None and value == value:  # not NaN
                    total, count = self._sums.get(key, (0.0, 0))
                    self._sums[key] = (total + value, count + 1)
        else:
            self.failed += 1
            self.error_kinds[row.get("error_kind") or "input"] += 1
            log.warning("%s [%s]", row["error"], row.get("error_kind"))
        if len(self.rows) < self.keep_rows:
            self.rows.append(row)

    def mean(self, key: str) -> float:
        total, count = self._sums.get(key, (0.0, 0))
        return total / count if count else float("nan")

    @property
    def exit_code(self) -> int:
        """See :data:`EXIT_CODES`."""
        if self.stopped in ("SIGTERM", "SIGINT"):
            return EXIT_SIGTERM if self.stopped == "SIGTERM" else EXIT_SIGINT
        if self.stopped in ("storage", "lease") or self.unrecorded:
            return EXIT_STOPPED
        return 1 if self.failed else 0


# Exit codes of `ray-mff fuse` and jobs/nightly_fuse.py (docs/reliability.md).
EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_LEASE, EXIT_STOPPED = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
EXIT_CODES = {
    EXIT_OK: "every stack is done (fused now or before)",
    EXIT_FAILED: "some stacks failed: error rows say which and why; the rest are done",
    EXIT_SETUP: "setup error, nothing fused: no stacks, unreachable or unwritable storage, bad option",
    EXIT_LEASE: "another run holds OUTPUT's lease (use --wait to queue behind it)",
    EXIT_STOPPED: "stopped early: storage lost mid-run (or the lease was lost); rerun to finish",
    EXIT_SIGINT: "interrupted (SIGINT): the stack in hand finished, rows flushed; rerun to finish",
    EXIT_SIGTERM: "terminated (SIGTERM): the stack in hand finished, rows flushed; rerun to finish",
}


# ------------------------------------------------------------------------------- stop requests


class StopRequest:
    """Set by SIGTERM/SIGINT (see :func:`install_signal_handlers`): loops finish the stack in hand,
    flush the manifest and stop. A second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.event = threading.Event()
        self.signal: str | None = None

    def set(self, name: str) -> None:
        self.signal = self.signal or name
        self.event.set()

    def clear(self) -> None:
        self.signal = None
        self.event.clear()

    def __bool__(self) -> bool:
        return self.event.is_set()


STOP = StopRequest()


def install_signal_handlers() -> None:
    """SIGTERM (what ``timeout``, schedulers and ``ray job stop`` send) and SIGINT request a stop."""
    import signal

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if STOP and name == "SIGINT":
            raise KeyboardInterrupt
        log.warning("%s: finishing the stack in hand, then flushing the manifest and stopping", name)
        STOP.set(name)

    STOP.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


# ------------------------------------------------------------------------------- error kinds

ERROR_KINDS = {
    "input": "the stack's files are bad (corrupt, not an image, mismatched): waits for them to change",
    "storage": "the storage failed (unreachable, timed out, disk full, read-only): retried now and every run",
    "resource": "the worker ran out of memory or died twice on this stack: waits for a change (or --retry-errors)",
    "internal": "an unexpected error (a bug, a missing engine): retried every run",
    "lease": "another run took OUTPUT's lease: nothing was written; retried every run",
}
RETRY_ON_RERUN = frozenset({"storage", "internal", "lease"})

_LEGACY_STORAGE = re.compile(r"No space left|Errno 28|EndpointConnection|Could not connect|Connect|Timeout|"
                             r"Read-only file system|Errno 30", re.I)


def classify_error(err: BaseException) -> str:
    """The ``error_kind`` of a failure (see :data:`ERROR_KINDS`)."""
    if storage.is_storage_failure(err):
        return "storage"
    if isinstance(err, MemoryError):
        return "resource"
    if isinstance(err, EngineUnavailableError):
        return "internal"
    if isinstance(err, MFFError):
        return "input"
    return "internal"


def _kind_of(row_kind: str | None, error: str | None) -> str:
    """Rows written before ``error_kind`` existed: storage when the message says so, else input."""
    if row_kind:
        return row_kind
    return "storage" if error and _LEGACY_STORAGE.search(error) else "input"


class LeaseLost(MFFError):
    """Another run holds OUTPUT's lease now (this run's driver died or was replaced)."""


# ------------------------------------------------------------------------------- the recipe


def recipe_id(fuser_spec: dict, opts: "RunOptions") -> str:
    """Identity of everything that decides an output's bytes besides its inputs: method, its
    weights (hash of the file), engine and precision asked for, calibration, tiling, output format,
    decision maps, depth maps, the focus axis, the align stage and the pixel limit. A rerun with another recipe fuses again."""
    from ray_mff.methods import CLASSICAL_METHODS, default_method

    name = fuser_spec.get("name") or default_method()
    recipe = {"method": name, "calibration": bool(fuser_spec.get("calibration", True)),
              "tile_size": fuser_spec.get("tile_size"), "format": opts.output_format,
              "decision_maps": bool(opts.save_decision_maps), "max_pixels": opts.max_pixels,
              "z_axis": opts.z_axis, "depth_map": bool(opts.depth_map),
              "align": dataclasses.asdict(opts.align) if opts.align.active else None,
              "options": {k: v for k, v in sorted(fuser_spec.items())
                          if k not in ("name", "engine", "precision", "calibration", "tile_size", "weights")}}
    if name not in CLASSICAL_METHODS:
        recipe.update(engine=fuser_spec.get("engine", "auto"), precision=fuser_spec.get("precision", "fp32"),
                      weights=weights_hash(name, fuser_spec.get("weights", "default")))
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


_WEIGHTS_HASHES: dict = {}


def weights_hash(name: str, weights="default") -> str | None:
    """sha1 (16 hex) of a learned model's weights file; cached by path, size and mtime."""
    try:
        from ray_mff.methods import local_weights
        from ray_mff.models import default_weights_path

        path = default_weights_path(name) if str(weights) == "default" else local_weights(weights)
        st = os.stat(path)
    except Exception:  # noqa: BLE001 - no file: the name alone identifies it
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _WEIGHTS_HASHES:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _WEIGHTS_HASHES[key] = h.hexdigest()[:16]
    return _WEIGHTS_HASHES[key]


# ------------------------------------------------------------------------------- memory


def stack_header(stack: Stack, *, fs=None):
    """The first member's :class:`ray_mff.io.ImageHeader` (a few KiB read), or None when the stack
    has none or it cannot be read (the read stage then fails properly and names the file)."""
    if not stack.uris or stack.meta.get("error"):
        return None
    try:
        return io.image_shape(stack.uris[0], fs=fs)
    except Exception:  # noqa: BLE001 - the worker's read reports it
        return None


_NO_HEADER = object()


def estimate_stack_memory(stack: Stack, *, fs=None, head=_NO_HEADER) -> int:
    """Bytes one worker needs to read and fuse ``stack`` whole, from the first member's header
    (``head``, else read here; the members of a stack share a shape or the stack is rejected).

    Counts the N decoded planes (2 bytes per sample for TIFF/PNG, 1 for JPEG), about three
    float32 maps per plane (focus measure, decision weights, their filtered copy), the float32
    fused image and its output copy, plus 256 MiB for the method itself. 0 when the header cannot
    be read.
    """
    head = stack_header(stack, fs=fs) if head is _NO_HEADER else head
    if head is None:
        return 0
    n, c = len(stack.uris), max(1, head.channels)
    sample = 1 if head.format == "jpeg" else 2
    per_pixel = n * c * sample + n * 4 * 3 + c * 4 * 2
    return int(head.height) * int(head.width) * per_pixel + (256 << 20)


def over_budget(stack: Stack, need: int, budget: int) -> Stack:
    """``stack`` flagged for the tiled path when ``need`` bytes exceed ``budget``, else itself."""
    if need <= budget:
        return stack
    log.warning("%s: needs about %.1f GiB, over the %.1f GiB budget: fused in tiles", stack.id,
                need / 2**30, budget / 2**30)
    return Stack(stack.id, stack.uris, {**stack.meta, "over_budget": True, "memory_estimate": need})


def node_memory_budget() -> int:
    """80 % of this machine's available memory: stacks estimated above it take the tiled path."""
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.8)
    except Exception:  # noqa: BLE001
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)


def _base_row(stack: Stack, fuser_name: str, recipe: str | None = None) -> dict:
    row = manifest.empty_row()
    row.update(
        stack_id=stack.id,
        source_uris=list(stack.uris),
        source_fingerprint=source_fingerprint(stack),
        n_images=len(stack.uris),
        method=fuser_name,
        warning=stack.meta.get("warning"),
        recipe_id=recipe,
    )
    return row


def retrying(fn, opts: RunOptions, what: str):
    """Call ``fn``; when the *storage* fails (see :func:`storage.is_storage_failure`) try again with
    exponential backoff, ``opts.attempts`` tries in all. Other failures raise at once."""
    for attempt in range(max(1, opts.attempts)):
        try:
            return fn()
        except Exception as err:
            if attempt + 1 >= opts.attempts or not storage.is_storage_failure(err):
                raise
            delay = opts.retry_backoff * (2 ** attempt)
            log.info("%s: storage failed (%s); retry %d in %.1f s", what, err, attempt + 1, delay)
            time.sleep(delay)


def check_lease(uri: str, opts: RunOptions) -> None:
    """Write nothing once OUTPUT's lease names another run (this run's driver died or was replaced)."""
    if not lease.still_held(opts.lease_uri, opts.lease_token):
        raise LeaseLost(uri, "not written: another run holds the output's lease now")


def died_twice(stack_id: str) -> str:
    """The error of a stack whose worker died twice while fusing it (``pipeline.AttemptLedger``)."""
    return f"{stack_id}: its worker died twice while fusing it (out of memory?)"


def process_stack(stack: Stack, fuser, output_root: str, opts: RunOptions) -> dict:
    """Read, align, fuse, write and score one stack; return its manifest row (status ok or error,
    with ``error_kind``). The row carries the seconds of each stage (``read_s``, ``fuse_s``,
    ``write_s``, ``score_s``). A storage failure anywhere (planes are read lazily, during fusion)
    redoes the stack with backoff before it becomes an error row.
    """
    t0 = time.perf_counter()
    row = _base_row(stack, getattr(fuser, "name", str(fuser)), opts.recipe_id)
    ledger = opts.attempt_ledger
    try:
        if ledger is not None and ledger.begin(stack.id) >= 2:
            raise MemoryError(died_twice(stack.id))
        if stack.meta.get("error"):
            where = stack.uris[0] if stack.uris else stack.meta.get("folder_uri", stack.id)
            raise EmptyStackError(where, stack.meta["error"])
        if not stack.uris:
            raise EmptyStackError(stack.id, "stack has no images")
        if stack.meta.get("over_budget"):
            from ray_mff.tiling import DEFAULT_TILE_SIZE, TiledFuser, maybe_tiled

            if not isinstance(fuser, TiledFuser):  # over the node's memory: fuse in tiles
                fuser = maybe_tiled(fuser, DEFAULT_TILE_SIZE)
        retrying(lambda: _fuse_and_write(stack, fuser, output_root, opts, row, t0), opts, stack.id)
    except LeaseLost as err:
        row.update(status=manifest.STATUS_ERROR, error=str(err), error_kind="lease")
    except MFFError as err:
        row.update(status=manifest.STATUS_ERROR, error=str(err), error_kind=classify_error(err))
    except MemoryError as err:
        row.update(status=manifest.STATUS_ERROR, error=f"{stack.id}: out of memory: {err}", error_kind="resource")
    except Exception as err:  # an unexpected failure on one stack must not stop the archive run
        kind = classify_error(err)
        if kind == "internal":
            log.exception("stack %s failed", stack.id)
        row.update(status=manifest.STATUS_ERROR, error=f"{stack.id}: {type(err).__name__}: {err}", error_kind=kind)
    if ledger is not None:
        ledger.end(stack.id)
    row["seconds"] = round(time.perf_counter() - t0, 4)
    row["finished_at"] = _utc_now()
    return row


def _fuse_and_write(stack: Stack, fuser, output_root: str, opts: RunOptions, row: dict, t0: float) -> None:
    """The stages of :func:`process_stack` for one try: open (lazily), align, fuse per (T, C)
    group, write the fused stack with its metadata (and decision / depth maps), score; fills ``row``."""
    with zstack.open_source(stack.uris, z_axis=opts.z_axis, max_pixels=opts.max_pixels) as src:
        row.update(src.row_facts())
        if src.n_planes > 1 and len(stack.uris) == 1:
            row["warning"] = None  # discovery saw one file; it holds a whole stack
        row["warning"] = "; ".join(w for w in (row["warning"], src.note) if w) or None
        out_uri = storage.join_uri(output_root, stack.id + src.output_extension(opts.output_format))
        # planes are read lazily (ray_mff.planes): read_s is opening the stack, fuse_s includes
        # reading its pixels
        t1 = time.perf_counter()
        row["read_s"] = round(t1 - t0, 4)
        if src.n_planes == 1:
            # Nothing to fuse: pass the image through so the archive stays complete, and say so.
            check_lease(out_uri, opts)
            io.write_fused(out_uri, src.assemble([planes[0] for _, planes in src.groups]), src.axes,
                           metadata=src.meta, family=src.family)
            row.update(status=manifest.STATUS_OK, output_uri=out_uri, engine="none",
                       warning=row["warning"] or "one-image stack passed through unfused",
                       write_s=round(time.perf_counter() - t1, 4))
            return
        # one fused plane per (T, C) group; planes stream from storage (ray_mff.planes)
        result, fused, index_maps, images, alignment = None, [], [], None, None
        for _, planes in src.groups:  # keep each group's fused plane and index map, not its weights
            # the align stage (a no-op by default): estimated once per stack, on the first
            # (T, C) group, and applied plane by plane to every group
            if alignment is None:
                # guided reads an aligned view by region and luminance: it warps far less than
                # every plane whole (ray_mff.align.AlignedPlanes), so a stack in memory goes lazy too
                planes, alignment = align_stack(planes, opts.align, lazy=getattr(fuser, "name", None) == "guided")
                alignment.update_row(row)
                images = planes
            elif opts.align.active:
                planes = AlignedPlanes(planes, alignment)
            r = fuser.fuse(planes)
            result = result or r
            fused.append(r.fused)
            index_maps.append(r.index_map if opts.depth_map else None)
        t2 = time.perf_counter()
        check_lease(out_uri, opts)
        io.write_fused(out_uri, src.assemble(fused), src.axes, metadata=src.meta, family=src.family)
        row.update(status=manifest.STATUS_OK, output_uri=out_uri,
                   engine=result.stats.get("engine"), precision=result.stats.get("precision"),
                   calibration=result.stats.get("calibration"), fuse_s=round(t2 - t1, 4))
        if opts.save_decision_maps:
            row["decision_map_uri"] = sinks.write_decision_map(
                output_root, stack.id, sinks.decision_map_image(result, len(images)))
        if opts.depth_map and all(m is not None for m in index_maps):
            from ray_mff.depth_map import write_depth_maps

            row["depth_map_uri"] = write_depth_maps(output_root, stack.id, src, index_maps)["depth"]
        t3 = time.perf_counter()
        row["write_s"] = round(t3 - t2, 4)
        if src.nbytes <= zstack.EAGER_STACK_BYTES:  # scores hold every source: not for deep stacks
            row.update(sinks.score(list(images), result.fused, opts))
            row["score_s"] = round(time.perf_counter() - t3, 4)


def _utc_now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


# ------------------------------------------------------------------------------- planning


# decisions of the planner, per stack
_SKIP, _WAIT, _NEW, _INPUT, _RECIPE, _MISSING, _RETRY, _FORCED = range(8)
_REASON = {_NEW: "new", _INPUT: "input changed", _RECIPE: "recipe changed", _MISSING: "output missing",
           _FORCED: "forced"}


@dataclass
class Plan:
    """What a run will do: ``todo`` (Stack objects, made only for these, and from a listing only as
    they are iterated: :class:`ray_mff.listing.Stacks`; ``reasons[stack_id]``: new,
    input changed, recipe changed, output missing, retry <kind> error, forced), how many are
    skipped (done, or an error waiting for its input) and where this run's ``seq`` starts."""

    todo: list
    n_skipped: int
    reasons: dict = field(default_factory=dict)
    waiting: int = 0  # skipped stacks whose latest row is an error that waits for a changed input
    first_seq: int = 0
    skipped_stacks: Callable[[], list] | None = field(default=None, repr=False)

    @property
    def skipped(self) -> list:
        """The skipped stacks as Stack objects (made on demand: small runs, tests)."""
        return self.skipped_stacks() if self.skipped_stacks else []

    def counts(self) -> Counter:
        return Counter(self.reasons.values())


def plan_stacks(stacks: "list[Stack] | Listing", output_root: str, opts: RunOptions) -> Plan:
    """Decide per stack, from its newest manifest row. A stack is *done* (skipped) only when that
    row is ``ok``, its output is still there, its input fingerprint (:func:`source_fingerprint`)
    matches and its ``recipe_id`` matches ``opts.recipe_id``. A stack whose newest row is an error
    is fused again when the input or recipe changed, or when the error's kind is transient
    (:data:`RETRY_ON_RERUN`: storage, internal, lease); input and resource errors wait for a change
    (``opts.retry_errors`` redoes them). ``opts.force`` redoes everything.

    ``stacks``: discovery's list, or its :class:`ray_mff.listing.Listing`. Vectorised: the listing's
    ids and fingerprints and the manifest's newest rows (:func:`manifest.latest_table`) meet as Arrow
    columns (``index_in``), the outputs present are one names-only listing of OUTPUT checked with
    ``is_in``, and Stack objects are made only for the stacks to fuse: a million stacks plan in
    seconds (``bench/manifest.py``).
    """
    if isinstance(stacks, Listing):
        ids = stacks.ids

        def fingerprints() -> pa.Array:
            return stacks.fingerprints

        make = stacks.stacks
    else:
        ids = pa.array([s.id for s in stacks], pa.string())

        def fingerprints() -> pa.Array:  # only when there is a manifest to compare with
            return pa.array([source_fingerprint(s) for s in stacks], pa.string())

        def make(index: np.ndarray) -> list[Stack]:
            return [stacks[i] for i in index.tolist()]
    n = len(ids)
    latest = manifest.latest_table(output_root, [*manifest.PLAN_COLUMNS, "seq"]) \
        if manifest._files(output_root)[1] else None
    # the newest row of each stack carries that stack's largest seq: their max is the manifest's
    top = pc.max(latest["seq"]).as_py() if latest is not None and latest.num_rows else None
    first_seq = 0 if top is None else int(top) + 1
    if opts.force:
        code, kind = np.full(n, _FORCED, dtype=np.int8), None
    elif latest is None or latest.num_rows == 0:
        code, kind = np.full(n, _NEW, dtype=np.int8), None
    else:
        code, kind = _decide(ids, fingerprints(), latest, output_root, opts, make)
    todo_at = np.flatnonzero(code >= _NEW)
    todo_ids = ids.take(pa.array(todo_at, pa.int64())).to_pylist()
    todo_codes = code[todo_at].tolist()
    kinds = kind.take(pa.array(todo_at, pa.int64())).to_pylist() if kind is not None else None
    reasons = {sid: (f"retry {kinds[i]} error" if c == _RETRY else _REASON[c])
               for i, (sid, c) in enumerate(zip(todo_ids, todo_codes))}
    todo = stacks.lazy(todo_at) if isinstance(stacks, Listing) else make(todo_at)
    return Plan(todo, n - len(todo_at), reasons, int(np.count_nonzero(code == _WAIT)), first_seq,
                lambda: make(np.flatnonzero(code < _NEW)))


def _decide(ids: pa.Array, fingerprints: pa.Array, latest: pa.Table, output_root: str, opts: RunOptions,
            make: Callable[[np.ndarray], list[Stack]]) -> tuple[np.ndarray, pa.Array]:
    """Per stack: its decision code and the ``error_kind`` of its newest row (for "retry <kind> error").
    The newest row's columns are taken per stack one at a time, so only one copy is alive at once."""
    pos = pc.index_in(ids, value_set=latest["stack_id"].combine_chunks())  # null: no row, a new stack

    def prev(column: str) -> pa.Array:
        return latest[column].take(pos)

    has = pos.is_valid()
    legacy = pc.and_(has, prev("seq").is_null())  # a row from before versions and recipes
    expected = fingerprints
    legacy_at = np.flatnonzero(legacy.to_numpy(zero_copy_only=False))
    if len(legacy_at):  # such rows carry names + sizes: compare with that fingerprint
        mask = np.zeros(len(ids), dtype=bool)
        mask[legacy_at] = True
        expected = pc.replace_with_mask(fingerprints, pa.array(mask),
                                        pa.array([legacy_fingerprint(s) for s in make(legacy_at)], pa.string()))
    same_input = pc.equal(prev("source_fingerprint"), expected).fill_null(False)
    recipe_changed = pa.array(np.zeros(len(ids), dtype=bool))
    if opts.recipe_id is not None:
        recipe_changed = pc.and_not(pc.invert(pc.equal(prev("recipe_id"), opts.recipe_id).fill_null(False)), legacy)
    ok = pc.equal(prev("status"), manifest.STATUS_OK).fill_null(False)
    present = _outputs_present(output_root, prev("output_uri"), ok)
    # rows written before error_kind existed: storage when the message says so, else input (_kind_of)
    legacy_kind = pc.if_else(pc.match_substring_regex(prev("error"), _LEGACY_STORAGE.pattern, ignore_case=True)
                             .fill_null(False), "storage", "input")
    kind = prev("error_kind")
    kind = pc.if_else(pc.not_equal(kind, "").fill_null(False), kind, legacy_kind)
    retry = pc.is_in(kind, value_set=pa.array(sorted(RETRY_ON_RERUN)))
    if opts.retry_errors:
        retry = pa.array(np.ones(len(ids), dtype=bool))

    def np_(a):
        return np.asarray(a.to_numpy(zero_copy_only=False), dtype=bool)

    code = np.select([~np_(has), ~np_(same_input), np_(recipe_changed), np_(ok) & ~present, np_(ok), np_(retry)],
                     [_NEW, _INPUT, _RECIPE, _MISSING, _SKIP, _RETRY], default=_WAIT).astype(np.int8)
    return code, kind


def plan_run(stacks: list[Stack], output_root: str, opts: RunOptions) -> tuple[list[Stack], list[Stack]]:
    """(to do, skipped) of :func:`plan_stacks`."""
    plan = plan_stacks(stacks, output_root, opts)
    return plan.todo, plan.skipped


def _outputs_present(output_root: str, uris: pa.Array, wanted: pa.Array) -> np.ndarray:
    """Per uri (where ``wanted``): is that output still there? From one names-only listing of the
    output root, as an Arrow array checked with ``is_in``: on an object store one LIST call per 1000
    keys instead of one HEAD per stack, and no Python object per file kept. Uris outside the
    root's spelling fall back to a HEAD each."""
    present = np.zeros(len(uris), dtype=bool)
    if not pc.any(wanted).as_py():
        return present
    names = _output_names(output_root)
    spelled = storage.join_uri(output_root, "x")[:-1]  # the root as output uris spell it, with its separator
    inside = pc.starts_with(uris, spelled).fill_null(False)
    found = pc.is_in(pc.utf8_slice_codeunits(uris, len(spelled)), value_set=names).fill_null(False)
    present[:] = np.asarray(pc.and_(inside, found).to_numpy(zero_copy_only=False), dtype=bool)
    outside = pc.and_(pc.and_(wanted, pc.invert(inside)), pc.not_equal(uris, "").fill_null(False))
    for i in np.flatnonzero(np.asarray(outside.to_numpy(zero_copy_only=False), dtype=bool)).tolist():
        present[i] = storage.exists(uris[i].as_py())
    return present


def _output_names(output_root: str, chunk: int = 65536) -> pa.Array:
    """Every file's name relative to ``output_root`` as one Arrow string array (empty if unreadable)."""
    fs, path = storage.resolve(output_root)
    prefix = path.rstrip("/") + "/"
    arrays, names = [], []
    try:
        if storage.is_remote(output_root):
            storage._forget_listings(fs, path)
            arrays.append(pa.array([p[len(prefix):] for p in fs.find(path) if p.startswith(prefix)], pa.string()))
        else:  # names only, no stat per file (fsspec's find stats each one), chunk by chunk into Arrow
            folders = [(path, "")]
            while folders:
                folder, sub = folders.pop()
                try:
                    entries = os.scandir(folder)
                except OSError:  # an unreadable folder: its outputs count as missing (fused again)
                    continue
                with entries:
                    for e in entries:
                        if e.is_dir(follow_symlinks=False):
                            folders.append((e.path, sub + e.name + "/"))
                        else:
                            names.append(sub + e.name)
                            if len(names) >= chunk:
                                arrays.append(pa.array(names, pa.string()))
                                names = []
    except OSError:
        return pa.array([], pa.string())
    arrays.append(pa.array(names, pa.string()))
    return pa.concat_arrays(arrays)


def _progress(items: list, enabled: bool) -> Iterable:
    """A tqdm bar on a terminal, plain log lines otherwise."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, unit="stack", desc="fusing")
    return items


def storage_lost(stack: Stack, output_root: str) -> str | None:
    """After a storage error: is the input or output storage gone? One line saying which, or None."""
    where = [(output_root, True)]
    if stack.uris:
        where.append((stack.uris[0].rsplit("/", 1)[0], False))
    for uri, write in where:
        try:
            storage.probe(uri, write=write)
        except storage.StorageUnavailable as err:
            return str(err)
    return None


def finish_run(summary: RunSummary, writer: manifest.ManifestWriter) -> None:
    """Flush what is left (a few tries; one when the run stopped because the storage is gone) and
    compact the manifest when it has many parts."""
    for delay in ((0.0,) if summary.stopped == "storage" else (0.0, 0.5, 1.0)):
        time.sleep(delay)
        if writer.flush(raise_errors=False):
            break
    summary.unrecorded = writer.unrecorded
    if summary.unrecorded:
        log.error("%d finished stacks could not be recorded (%s); the next run redoes them",
                  summary.unrecorded, writer.last_error)
        return
    try:
        if manifest.count_parts(summary.output) > manifest.COMPACT_AFTER_PARTS:
            manifest.compact(summary.output)
    except Exception as err:  # noqa: BLE001 - compaction is an optimisation; rows are safe in parts
        log.warning("manifest compaction skipped: %s", err)


def new_summary(plan: Plan, run_id: str, output_root: str) -> RunSummary:
    return RunSummary(run_id=run_id, output=output_root, skipped=plan.n_skipped,
                      reasons=dict(plan.counts()), waiting=plan.waiting)


def run_local(
    stacks: "list[Stack] | Listing",
    fuser,
    output_root: str,
    opts: RunOptions,
    *,
    run_id: str | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Fuse ``stacks`` (a list, or a :class:`ray_mff.listing.Listing`; see
    :func:`plan_stacks`) one after another in this process (no Ray), flushing the manifest as it goes
    (every ``opts.flush_every`` rows or ``opts.flush_seconds``). ``fuser`` is a fuser or a
    zero-argument factory of one (called only when something is to do). Stops early, flushing first, on
    SIGTERM/SIGINT (:data:`STOP`) or when a storage error turns out to be the storage gone."""
    run_id = run_id or manifest.new_run_id()
    plan = plan_stacks(stacks, output_root, opts)
    summary = new_summary(plan, run_id, output_root)
    todo = plan.todo  # from a listing: Stack objects made as the loop reaches them
    budget = node_memory_budget() if todo else 0
    if todo and not hasattr(fuser, "fuse"):
        # a factory: the method (an ONNX Runtime session, torch, their native thread pools) is
        # built only when there is something to fuse; nothing-to-do reruns never load it
        fuser = fuser()
    writer = manifest.ManifestWriter(output_root, run_id, flush_every=opts.flush_every,
                                     flush_seconds=opts.flush_seconds, first_seq=plan.first_seq)
    started, busy = time.perf_counter(), 0.0
    try:
        for stack in _progress(todo, progress):
            if STOP:
                summary.stopped = STOP.signal
                break
            # over the memory budget (from its header, read as the stack comes up): the tiled path
            stack = over_budget(stack, estimate_stack_memory(stack), budget)
            row = writer.add(process_stack(stack, fuser, output_root, opts))
            busy += row.get("fuse_s") or 0.0
            summary.engine_busy = busy / max(time.perf_counter() - started, 1e-9) if busy else None
            summary.record(row)
            if not (progress and sys.stderr.isatty()):
                log.info("%s %s %.2fs", row["stack_id"], row["status"], row["seconds"])
            if on_row:
                on_row(row)
            if row.get("error_kind") == "storage":
                lost = storage_lost(stack, output_root)
                if lost:
                    summary.stopped, summary.stop_reason = "storage", lost
                    log.error("storage unreachable: %s; stopping (the rerun finishes the work)", lost)
                    break
    finally:
        finish_run(summary, writer)
    if STOP and not summary.stopped:
        summary.stopped = STOP.signal
    return summary
