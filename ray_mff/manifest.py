"""The run manifest: one Parquet row per stack, plain columns any Parquet reader understands.

``OUTPUT/manifest.parquet`` is a Parquet *dataset directory* holding

- ``part-<run_id>-<seq>.parquet``: what a run flushed (every N rows and every T seconds), and
- ``gen-<NNNNNN>.parquet``: a *compaction*: every earlier row in one file sorted by
  ``(stack_id, seq)`` (:func:`compact`; automatic past :data:`COMPACT_AFTER_PARTS` parts).

Every file is written atomically. ``pandas.read_parquet("OUTPUT/manifest.parquet")`` reads all of
them as one table, and so do polars, DuckDB and Spark. Nothing in it needs Ray.

The manifest is an append-only log: a stack fused again gets a new row. ``seq`` orders rows: the
driver that holds the output's lease (:mod:`ray_mff.lease`, so one writer at a time) numbers its
rows from one past the largest ``seq`` already recorded, so "newest" never depends on worker
clocks. :func:`latest_table` is the current state (the row with the largest ``seq`` per stack;
rows of old manifests without ``seq`` count as older, ordered by ``finished_at``), which is what
rerun/skip decisions use. Reads go through ``pyarrow.dataset`` with the schema below, so parts
written before a column existed still read (the column is null there).
"""
from __future__ import annotations

import io
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ray_mff import storage

MANIFEST_NAME = "manifest.parquet"

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Column order is the documented schema (README "Manifest").
SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("stack_id", pa.string()),
        ("source_uris", pa.list_(pa.string())),
        ("source_fingerprint", pa.string()),
        ("output_uri", pa.string()),
        ("decision_map_uri", pa.string()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("channels", pa.int64()),
        ("dtype", pa.string()),
        ("n_images", pa.int64()),
        ("method", pa.string()),
        ("engine", pa.string()),
        ("precision", pa.string()),
        ("calibration", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("warning", pa.string()),
        ("seconds", pa.float64()),
        # seconds per stage (read+decode, fuse, encode+write, score); None where a stage did not run
        ("read_s", pa.float64()),
        ("fuse_s", pa.float64()),
        ("write_s", pa.float64()),
        ("score_s", pa.float64()),
        ("q_g", pa.float64()),
        ("q_y", pa.float64()),
        ("q_mi", pa.float64()),
        # align stage (ray_mff.align): what ran and a per-stack summary of the transforms
        ("align", pa.string()),
        ("align_max_shift_px", pa.float64()),
        ("align_scale_min", pa.float64()),
        ("align_scale_max", pa.float64()),
        ("align_residual", pa.float64()),
        ("align_failed", pa.int64()),
        ("align_held", pa.int64()),
        ("exposure_gain_min", pa.float64()),
        ("exposure_gain_max", pa.float64()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        # physical metadata of the stack (ray_mff.metadata) and its depth map (ray_mff.depth_map)
        ("pixel_size_x", pa.float64()),
        ("pixel_size_y", pa.float64()),
        ("pixel_size_z", pa.float64()),
        ("pixel_unit", pa.string()),
        ("depth_map_uri", pa.string()),
        ("recipe_id", pa.string()),
        ("seq", pa.int64()),
    ]
)
COLUMNS = SCHEMA.names


def new_run_id() -> str:
    """Sortable, unique run id: UTC time plus a short random suffix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def manifest_uri(output_root: str) -> str:
    return storage.join_uri(output_root, MANIFEST_NAME)


def empty_row() -> dict:
    return {name: None for name in COLUMNS}


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with any subset of COLUMNS) -> a table with exactly the manifest schema."""
    cols = {name: [row.get(name) for row in rows] for name in COLUMNS}
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def write_part(output_root: str, rows: list[dict], run_id: str, seq: int) -> str:
    """Write one part file atomically; returns its uri. No-op (returns "") for no rows."""
    if not rows:
        return ""
    buf = io.BytesIO()
    pq.write_table(rows_to_table(rows), buf)
    uri = storage.join_uri(manifest_uri(output_root), f"part-{run_id}-{seq:05d}.parquet")
    storage.write_bytes_atomic(uri, buf.getvalue())
    return uri


def _files(output_root: str):
    """(fs, [part or generation file paths]) of the manifest; hidden temp files are not included."""
    fs, path = storage.resolve(manifest_uri(output_root))
    if storage.is_remote(output_root):
        storage._forget_listings(fs, path)
    try:
        found = fs.find(path)
    except FileNotFoundError:
        found = []
    files = sorted(p for p in found if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_")))
    return fs, files


def _dataset(fs, files: list[str]) -> pads.Dataset:
    """The manifest files as one dataset. The explicit schema is the schema evolution: a column an
    old part lacks reads as nulls.

    Local manifests are read with pyarrow's own filesystem; others through fsspec with
    ``pre_buffer=False``. Why: with Python file objects, Arrow's read-ahead cache keeps Python
    buffers alive in futures that its I/O threads release later; one released during interpreter
    shutdown calls PyGILState_Ensure, the thread is unwound by pthread_exit through a noexcept
    destructor and the process aborts (``terminate called without an active exception``, exit 134:
    caught under gdb on nothing-to-do reruns, stack in docs/reliability.md)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        import pyarrow.fs as pafs

        return pads.dataset(files, schema=SCHEMA, format="parquet", filesystem=pafs.LocalFileSystem())
    fmt = pads.ParquetFileFormat(default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=False))
    return pads.dataset(files, schema=SCHEMA, format=fmt, filesystem=fs)


def read_manifest(output_root: str, columns: list[str] | None = None) -> pa.Table:
    """Every row of every run (an empty table with the schema when there is no manifest yet)."""
    fs, files = _files(output_root)
    if not files:
        table = SCHEMA.empty_table()
        return table.select(columns) if columns else table
    return _dataset(fs, files).to_table(columns=columns)


def _order_keys(table: pa.Table) -> list[tuple[str, str]]:
    # nulls first: rows of manifests older than ``seq`` sort before every sequenced row
    return [("stack_id", "ascending", "at_start"), ("seq", "ascending", "at_start"),
            ("finished_at", "ascending", "at_start"), ("run_id", "ascending", "at_start")]


def _last_per_stack(table: pa.Table) -> pa.Table:
    """Rows sorted by stack then age -> the last (newest) row of each stack. Old rows without
    ``seq`` sort first (nulls first), so they are older than any sequenced row. Only the sort keys
    are sorted; the rows kept are taken from ``table`` once (no sorted copy of every row), column by
    column, each original column released as its copy is made."""
    if table.num_rows == 0:
        return table
    keys = _order_keys(table)
    order = pc.sort_indices(table.select([k for k, _, _ in keys]), sort_keys=keys)
    sid = table["stack_id"].take(order)
    n = table.num_rows
    last = np.ones(n, dtype=bool)
    if n > 1:
        last[:-1] = pc.not_equal(sid.slice(0, n - 1), sid.slice(1)).to_numpy(zero_copy_only=False)
    del sid
    keep = order.filter(pa.array(last))
    del order
    columns = {}
    for name in table.column_names:  # column by column: one column's copy alive at a time, not the table's
        columns[name] = table[name].take(keep)
        table = table.drop_columns([name])
    pa.default_memory_pool().release_unused()  # hand back what the read and the originals freed
    return pa.table(columns)


PLAN_COLUMNS = ["stack_id", "source_fingerprint", "recipe_id", "status", "error_kind", "error", "output_uri"]


def latest_table(output_root: str, columns: list[str] | None = None) -> pa.Table:
    """The newest row per stack (largest ``seq``; see module docstring) as an Arrow table,
    with ``columns`` (default: all). Vectorised: a million rows take seconds, not minutes."""
    need = None if columns is None else list(dict.fromkeys(["stack_id", "seq", "finished_at", "run_id", *columns]))
    table = _last_per_stack(read_manifest(output_root, need))
    return table if columns is None else table.select(list(dict.fromkeys(["stack_id", *columns])))


def latest_rows(output_root: str) -> dict[str, dict]:
    """Newest row per stack_id as plain dicts (small manifests, tests, reports)."""
    return {row["stack_id"]: row for row in latest_table(output_root).to_pylist()}


def next_seq(output_root: str) -> int:
    """One past the largest ``seq`` recorded (0 for a new manifest): where this run's rows start."""
    table = read_manifest(output_root, ["seq"])
    top = pc.max(table["seq"]).as_py() if table.num_rows else None
    return 0 if top is None else int(top) + 1


# ------------------------------------------------------------------------------------- compaction

COMPACT_AFTER_PARTS = 64
"""A run that leaves more part files than this compacts the manifest before it ends."""

_GEN = re.compile(r"gen-(\d+)\.parquet$")

log = logging.getLogger("ray_mff")


def count_parts(output_root: str) -> int:
    return sum(1 for p in _files(output_root)[1] if not _GEN.search(p))


def compact(output_root: str) -> tuple[int, str]:
    """Merge every part and generation file into one new generation ``gen-<N+1>.parquet``, sorted by
    ``(stack_id, seq)``; then delete the files it merged. Returns (files merged, new file uri).

    The new file is complete before anything is deleted (atomic write), so a crash leaves either the
    old files or the new one beside some old ones: rows then appear twice with the same ``seq``,
    which the latest view does not mind and the next compaction removes. Call it only while holding
    the output's lease (``ray-mff manifest compact`` takes it).
    """
    fs, files = _files(output_root)
    if not files:
        return 0, ""
    table = _dataset(fs, files).to_table()
    # exact repeats (a compaction interrupted after writing) collapse to one row
    key = pc.binary_join_element_wise(
        table["run_id"].fill_null(""), table["stack_id"].fill_null(""),
        pc.cast(table["seq"], pa.string()).fill_null(""),
        pc.cast(pc.cast(table["finished_at"], pa.int64()), pa.string()).fill_null(""), "\x1f")
    _, first = np.unique(key.to_numpy(zero_copy_only=False).astype(object), return_index=True)
    if len(first) < table.num_rows:
        table = table.take(pa.array(np.sort(first)))
    table = table.take(pc.sort_indices(table, sort_keys=_order_keys(table)))
    gens = [int(m.group(1)) for m in (_GEN.search(p) for p in files) if m]
    uri = storage.join_uri(manifest_uri(output_root), f"gen-{max(gens, default=0) + 1:06d}.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=128 * 1024)
    storage.write_bytes_atomic(uri, buf.getvalue())
    new_path = storage.resolve(uri)[1]
    for p in files:
        if p != new_path:
            fs.rm_file(p)
    log.info("manifest: %d files compacted into %s (%d rows)", len(files), uri, table.num_rows)
    return len(files), uri


@dataclass
class ManifestWriter:
    """Collects a run's rows and flushes them as part files every ``flush_every`` rows or when the
    oldest pending row is ``flush_seconds`` old, whichever comes first.

    Flushing as it goes means a run killed half-way leaves rows for every stack it finished,
    so the rerun does only what is missing and adds no duplicate rows. Rows are numbered from
    ``first_seq`` (:func:`next_seq`). A flush that fails (storage gone, disk full) keeps its rows
    pending and is tried again at the next flush; :attr:`unrecorded` counts what never made it.
    """

    output_root: str
    run_id: str
    flush_every: int = 32
    flush_seconds: float = 30.0
    first_seq: int = 0
    parts: list[str] = field(default_factory=list)
    _pending: list[dict] = field(default_factory=list)
    _oldest: float = 0.0
    _seq: int = -1
    last_error: BaseException | None = None

    def add(self, row: dict) -> dict:
        """Queue ``row`` (stamped with this run's id and the next ``seq``, and returned) for the next part file."""
        if self._seq < 0:
            self._seq = self.first_seq
        row = {**row, "run_id": self.run_id, "seq": self._seq}
        self._seq += 1
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append(row)
        self.maybe_flush()
        return row

    def maybe_flush(self) -> None:
        """Flush when enough rows are pending or the oldest is old enough."""
        if self._pending and (len(self._pending) >= self.flush_every
                              or time.monotonic() - self._oldest >= self.flush_seconds):
            self.flush(raise_errors=False)

    @property
    def unrecorded(self) -> int:
        return len(self._pending)

    def flush(self, raise_errors: bool = True) -> bool:
        """Write pending rows as one part file; True on success (or nothing to write)."""
        if not self._pending:
            return True
        try:
            uri = write_part(self.output_root, self._pending, self.run_id, len(self.parts))
        except Exception as err:  # noqa: BLE001 - kept pending; the caller decides whether to stop
            self.last_error = err
            log.warning("manifest: cannot write %d rows yet: %s", len(self._pending), err)
            if raise_errors:
                raise
            return False
        self.parts.append(uri)
        self._pending = []
        return True

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush(raise_errors=False)
