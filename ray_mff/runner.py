"""One stack in, one fused image and one manifest row out; and the local (no Ray) loop over a run.

:func:`process_stack` is the unit of work everywhere: the local loop below, the Ray Data
pipeline's fusion actors (:mod:`ray_mff.pipeline`) and the nightly job all call it, so a stack is
read, fused, written and scored the same way whoever runs it. It never raises for bad input: a
bad stack becomes an error row naming the file and the reason, and the run carries on.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable


from ray_mff import io, manifest, sinks, storage, zstack
from ray_mff.align import AlignedPlanes, AlignOptions, align_stack
from ray_mff.errors import EmptyStackError, MFFError
from ray_mff.stacks import Stack

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
            log.warning("%s", row["error"])
        if len(self.rows) < self.keep_rows:
            self.rows.append(row)

    def mean(self, key: str) -> float:
        total, count = self._sums.get(key, (0.0, 0))
        return total / count if count else float("nan")

    @property
    def exit_code(self) -> int:
        """0 when every stack was fused or skipped, 1 when any failed."""
        return 1 if self.failed else 0


def source_fingerprint(stack: Stack) -> str:
    """Identity of a stack's inputs: uris plus, where discovery listed them, sizes and mtimes.

    A stack whose latest row failed is retried only when this changes (the user fixed a file),
    so reruns neither repeat known failures nor add duplicate rows for them.
    """
    h = hashlib.sha1()
    for i, uri in enumerate(stack.uris):
        h.update(uri.encode())
        for key in ("sizes", "mtimes"):
            values = stack.meta.get(key)
            if values is not None and i < len(values):
                h.update(f"|{values[i]}".encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _base_row(stack: Stack, fuser_name: str) -> dict:
    row = manifest.empty_row()
    row.update(
        stack_id=stack.id,
        source_uris=list(stack.uris),
        source_fingerprint=source_fingerprint(stack),
        n_images=len(stack.uris),
        method=fuser_name,
        warning=stack.meta.get("warning"),
    )
    return row


def process_stack(stack: Stack, fuser, output_root: str, opts: RunOptions) -> dict:
    """Read, fuse, write and score one stack; return its manifest row (status ok or error).

    The row carries the seconds of each stage (``read_s``, ``fuse_s``, ``write_s``, ``score_s``).
    """
    t0 = time.perf_counter()
    row = _base_row(stack, getattr(fuser, "name", str(fuser)))
    try:
        if stack.meta.get("error"):
            where = stack.uris[0] if stack.uris else stack.meta.get("folder_uri", stack.id)
            raise EmptyStackError(where, stack.meta["error"])
        if not stack.uris:
            raise EmptyStackError(stack.id, "stack has no images")
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
                io.write_fused(out_uri, src.assemble([planes[0] for _, planes in src.groups]), src.axes,
                               metadata=src.meta, family=src.family)
                row.update(status=manifest.STATUS_OK, output_uri=out_uri, engine="none",
                           warning=row["warning"] or "one-image stack passed through unfused",
                           write_s=round(time.perf_counter() - t1, 4))
            else:
                # one fused plane per (T, C) group; planes stream from storage (ray_mff.planes)
                result, fused, index_maps, images, alignment = None, [], [], None, None
                for _, planes in src.groups:  # keep each group's fused plane and index map, not its weights
                    # the align stage (a no-op by default): estimated once per stack, on the first
                    # (T, C) group, and applied plane by plane to every group
                    if alignment is None:
                        planes, alignment = align_stack(planes, opts.align)
                        alignment.update_row(row)
                        images = planes
                    elif opts.align.active:
                        planes = AlignedPlanes(planes, alignment)
                    r = fuser.fuse(planes)
                    result = result or r
                    fused.append(r.fused)
                    index_maps.append(r.index_map if opts.depth_map else None)
                t2 = time.perf_counter()
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
    except MFFError as err:
        row.update(status=manifest.STATUS_ERROR, error=str(err))
    except Exception as err:  # an unexpected failure on one stack must not stop the archive run
        log.exception("stack %s failed", stack.id)
        row.update(status=manifest.STATUS_ERROR, error=f"{stack.id}: {type(err).__name__}: {err}")
    row["seconds"] = round(time.perf_counter() - t0, 4)
    row["finished_at"] = _utc_now()
    return row


def _utc_now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


def plan_run(stacks: list[Stack], output_root: str, opts: RunOptions) -> tuple[list[Stack], list[Stack]]:
    """Split stacks into (to do, skipped). A stack is skipped, unless ``force``, when its newest
    manifest row was made from the very same inputs (:func:`source_fingerprint`) and either is ok
    with its output still there, or failed.

    So a rerun (the nightly job) does exactly what is new: stacks never seen, stacks whose members
    changed since (a late-uploaded focal plane, a replaced file), outputs deleted by hand, and
    stacks a killed run finished without recording.
    """
    if opts.force:
        return list(stacks), []
    latest = manifest.latest_rows(output_root)
    present = _existing_outputs(output_root) if latest else set()
    todo, skipped = [], []
    for stack in stacks:
        row = latest.get(stack.id)
        done = False
        if row is not None and row["source_fingerprint"] == source_fingerprint(stack):
            if row["status"] == manifest.STATUS_OK:
                uri = row["output_uri"]
                done = bool(uri) and (uri in present or storage.exists(uri))
            elif row["status"] == manifest.STATUS_ERROR:
                done = True
        (skipped if done else todo).append(stack)
    return todo, skipped


def _existing_outputs(output_root: str) -> set[str]:
    """Every file under the output root, from one listing: on an object store one LIST call per
    1000 keys instead of one HEAD per stack (uris the listing spells differently fall back to a HEAD)."""
    try:
        return {entry.uri for entry in storage.list_files(output_root)}
    except OSError:
        return set()


def _progress(items: list, enabled: bool) -> Iterable:
    """A tqdm bar on a terminal, plain log lines otherwise."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, unit="stack", desc="fusing")
    return items


def run_local(
    stacks: list[Stack],
    fuser,
    output_root: str,
    opts: RunOptions,
    *,
    run_id: str | None = None,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Fuse ``stacks`` one after another in this process (no Ray), flushing the manifest as it goes."""
    run_id = run_id or manifest.new_run_id()
    todo, skipped = plan_run(stacks, output_root, opts)
    summary = RunSummary(run_id=run_id, output=output_root, skipped=len(skipped))
    started, busy = time.perf_counter(), 0.0
    with manifest.ManifestWriter(output_root, run_id) as writer:
        for stack in _progress(todo, progress):
            row = writer.add(process_stack(stack, fuser, output_root, opts))
            busy += row.get("fuse_s") or 0.0
            summary.engine_busy = busy / max(time.perf_counter() - started, 1e-9) if busy else None
            summary.record(row)
            if not (progress and sys.stderr.isatty()):
                log.info("%s %s %.2fs", row["stack_id"], row["status"], row["seconds"])
            if on_row:
                on_row(row)
    return summary
