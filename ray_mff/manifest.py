"""The run manifest: one Parquet row per stack, plain columns any Parquet reader understands.

``OUTPUT/manifest.parquet`` is a Parquet *dataset directory*: every run (and, for long runs,
every flush of a run) adds one part file ``part-<run_id>-<seq>.parquet``, written atomically.
``pandas.read_parquet("OUTPUT/manifest.parquet")`` reads all parts as one table, and so do
polars, DuckDB and Spark. Nothing in it needs Ray (no tensor extension types).

The manifest is an append-only log: a stack fused again with ``--force`` gets a new row in the
new run's part. :func:`latest_rows` gives the current state (newest row per stack), which is
what rerun/skip decisions use.
"""
from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
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
        ("exposure_gain_min", pa.float64()),
        ("exposure_gain_max", pa.float64()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        # physical metadata of the stack (ray_mff.metadata) and its depth map (ray_mff.depth_map)
        ("pixel_size_x", pa.float64()),
        ("pixel_size_y", pa.float64()),
        ("pixel_size_z", pa.float64()),
        ("pixel_unit", pa.string()),
        ("depth_map_uri", pa.string()),
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


def read_manifest(output_root: str) -> pa.Table:
    """Every row of every run (an empty table with the schema when there is no manifest yet)."""
    fs, path = storage.resolve(manifest_uri(output_root))
    try:
        parts = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    except FileNotFoundError:
        parts = []
    if not parts:
        return SCHEMA.empty_table()
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
        for name in SCHEMA.names:  # parts written before a column was added: nulls
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), SCHEMA.field(name).type))
        tables.append(table.select(SCHEMA.names).cast(SCHEMA))
    return pa.concat_tables(tables)


def latest_rows(output_root: str) -> dict[str, dict]:
    """Newest row per stack_id (by finished_at, then run_id), as plain dicts."""
    table = read_manifest(output_root)
    latest: dict[str, dict] = {}
    for row in table.to_pylist():
        key = (row["finished_at"] or 0, row["run_id"] or "")
        prev = latest.get(row["stack_id"])
        if prev is None or key >= (prev["finished_at"] or 0, prev["run_id"] or ""):
            latest[row["stack_id"]] = row
    return latest


@dataclass
class ManifestWriter:
    """Collects a run's rows and flushes them as part files every ``flush_every`` rows.

    Flushing as it goes means a run killed half-way leaves rows for every stack it finished,
    so the rerun does only what is missing and adds no duplicate rows.
    """

    output_root: str
    run_id: str
    flush_every: int = 32
    parts: list[str] = field(default_factory=list)
    _pending: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> dict:
        """Queue ``row`` (stamped with this run's id, which is returned) for the next part file."""
        row = {**row, "run_id": self.run_id}
        self._pending.append(row)
        if len(self._pending) >= self.flush_every:
            self.flush()
        return row

    def flush(self) -> None:
        if self._pending:
            uri = write_part(self.output_root, self._pending, self.run_id, len(self.parts))
            self.parts.append(uri)
            self._pending = []

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
