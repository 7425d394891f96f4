"""The Ray Data pipeline: the stack list -> read -> fuse -> write/score -> the Parquet manifest.

Same work as the local loop (:func:`ray_mff.runner.run_local`), spread over a Ray cluster in stages
sized to their hardware, the way Ray's batch-inference examples keep a GPU busy::

    driver:  discover_stacks -> plan_run (skip what is done) -> [stack dicts]   (names; one header each)
    CPU tasks:   read_stage    read + decode the stack's images                  (io.py)
    actor pool:  FuseStage     fuse batches of stacks, the engine loaded once    (fusion/, models/, engines/)
    CPU tasks:   write_stage   encode + write the fused image, score it          (sinks.py)
    driver:  iter_batches (a stream) -> ManifestWriter (a part file every N rows / T seconds)

Stacks whose pixels exceed ``pixel_budget`` take the *whole-stack* path instead: one
:class:`FusionActor` call reads, fuses (in tiles), writes and scores the stack
(:func:`ray_mff.runner.process_stack`) with ``memory=`` declared from the image headers read at
listing time, so no huge stack ever sits in the object store.

Design choices, and why:

- A GPU fuses a 520 x 520 pair in a few ms; reading, PNG encoding and scoring take ~100 ms of CPU.
  Done serially in the GPU's actor (the design before) the GPU idles ~99% of the time. Here the
  GPU actor only fuses; read and write/score run as CPU tasks on every CPU of the cluster
  (``read_cpus``/``post_cpus`` per task), and Ray Data streams stacks between them, so the GPU
  is fed as long as there are CPUs (``cluster.yaml`` has a CPU worker type for that).
- The fusion pool autoscales: ``ActorPoolStrategy(min_size=min_actors, max_size=max_actors)``
  starts ``min_actors`` and grows while work is queued; asking for GPU actors the cluster does
  not have yet is what makes the autoscaler start GPU nodes.
- Between stages a stack travels as one raw byte column per array plus its shape and dtype
  (``_pack``/``_unpack``): plain Arrow binary, no tensor extension types, any dtype and channel
  count, and zero-copy views on the way out. Manifest rows travel as JSON until the last stage,
  which returns them as a ``pyarrow.Table`` with exactly :data:`ray_mff.manifest.SCHEMA`.
- Every stage turns a bad stack into an error row (as ``process_stack`` does) and passes it on,
  so one corrupt file cannot fail the job. A fusion actor that cannot build its engine fails the
  run with one line naming the reason (:class:`ray_mff.errors.EngineUnavailableError`); where the
  workers are this machine, the engine is checked on the driver before any actor starts.
- The driver consumes results as a stream (``iter_batches``) and flushes manifest parts as it
  goes, so a driver killed mid-run leaves rows for everything flushed; the rerun's
  :func:`~ray_mff.runner.plan_run` does only what is missing. Memory stays flat in the number
  of stacks: Ray Data holds a bounded window of stacks in flight.
- Workers get the S3 endpoint from the driver (explicit ``s3_endpoint`` >
  :func:`ray_mff.storage.set_s3_endpoint` > ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` on the
  driver). Credentials are never passed: each worker's s3fs/botocore finds them in its own
  environment, ``~/.aws`` or the instance role.

Example::

    >>> from ray_mff.stacks import discover_stacks                      # doctest: +SKIP
    >>> summary = run_pipeline(discover_stacks("s3://archive/in"), {"name": "guided"},
    ...                        "s3://archive/fused", RunOptions(), min_actors=1, max_actors=8)  # doctest: +SKIP
    >>> summary.fused, summary.skipped, summary.failed, summary.engine_busy  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from ray_mff import io, manifest, runner, sinks, storage
from ray_mff.errors import EmptyStackError, EngineUnavailableError, MFFError
from ray_mff.listing import Listing, jsonable, stack_from_json, stack_json
from ray_mff.runner import RunOptions, RunSummary, _base_row, _utc_now, process_stack
from ray_mff.stacks import Stack

log = logging.getLogger("ray_mff")


# ------------------------------------------------------------------------------- stack <-> item


def stack_to_item(stack: Stack) -> dict:
    """A Stack as a Ray Data row of plain strings: ``stack_id`` and the stack as JSON
    (:func:`ray_mff.listing.stack_json`).

    JSON rather than list columns keeps the input free of ragged object arrays (which Ray Data
    would turn into tensor extension types) and round-trips ``meta`` (sizes, warnings, errors).
    """
    return {"stack_id": stack.id, "stack": stack_json(stack)}


stack_from_item = stack_from_json


# --------------------------------------------------------------------------- arrays between stages


def _pack(arrays: np.ndarray | list[np.ndarray] | None) -> tuple[bytes, str]:
    """One array, or a list of same-shape arrays (a stack: packed as (N, ...) in one copy) ->
    (raw bytes, JSON layout); None -> (b"", "")."""
    if arrays is None:
        return b"", ""
    if isinstance(arrays, list):
        shape = [len(arrays), *arrays[0].shape]
        return b"".join(np.ascontiguousarray(a).tobytes() for a in arrays), json.dumps(
            {"shape": shape, "dtype": str(arrays[0].dtype)})
    arrays = np.ascontiguousarray(arrays)
    return arrays.tobytes(), json.dumps({"shape": list(arrays.shape), "dtype": str(arrays.dtype)})


def _unpack(data: pa.Scalar, layout: str) -> np.ndarray | None:
    """Inverse of :func:`_pack`: a read-only, zero-copy view of the Arrow buffer."""
    if not layout:
        return None
    meta = json.loads(layout)
    return np.frombuffer(data.as_buffer(), dtype=meta["dtype"]).reshape(meta["shape"])


def _stage_table(rows: list[dict], **arrays: list[np.ndarray | None]) -> pa.Table:
    """Rows (JSON) plus packed arrays -> the Arrow table passed to the next stage."""
    cols = {"row": pa.array([json.dumps(r, default=jsonable) for r in rows], pa.string())}
    for name, values in arrays.items():
        packed = [_pack(v) for v in values]
        cols[name] = pa.array([p[0] for p in packed], pa.large_binary())
        cols[f"{name}_layout"] = pa.array([p[1] for p in packed], pa.string())
    return pa.table(cols)


def _fail(row: dict, stack_id: str, err: Exception) -> None:
    """A stage's failure on one stack becomes the stack's error row with its ``error_kind``
    (:func:`ray_mff.runner.classify_error`), as in ``process_stack``."""
    kind = "lease" if isinstance(err, runner.LeaseLost) else runner.classify_error(err)
    if isinstance(err, MFFError):
        row.update(status=manifest.STATUS_ERROR, error=str(err), error_kind=kind)
    else:  # unexpected: keep the traceback in the worker's log, one line in the manifest
        if kind == "internal":
            log.error("stack %s failed", stack_id, exc_info=err)
        row.update(status=manifest.STATUS_ERROR, error=f"{stack_id}: {type(err).__name__}: {err}", error_kind=kind)


def _worker_setup(s3_endpoint: str | None, cpu_threads: int | None = None) -> None:
    if s3_endpoint:
        storage.set_s3_endpoint(s3_endpoint)
    if cpu_threads:
        # A worker granted k CPUs should use k threads: OpenCV defaults to every core, and
        # N workers x all cores oversubscribes the node (Ray sets OMP_NUM_THREADS, not this).
        import cv2

        cv2.setNumThreads(int(cpu_threads))


# ------------------------------------------------------------------------------------ the stages


def read_stage(batch: pa.Table, *, opts: RunOptions, s3_endpoint: str | None = None) -> pa.Table:
    """CPU task: read and decode each stack of the batch (``{"stack": JSON}`` rows).

    Returns ``row`` (the manifest row so far, JSON, with ``read_s``) and ``sources``: the stack's
    images as one (N, H, W[, C]) array (members share shape and dtype, or the stack is an error).
    """
    _worker_setup(s3_endpoint, cpu_threads=1)
    rows, sources = [], []
    for text in batch.column("stack").to_pylist():
        stack = stack_from_item(text)
        t0 = time.perf_counter()
        row, images = _base_row(stack, "", opts.recipe_id), None
        try:
            if stack.meta.get("error"):
                where = stack.uris[0] if stack.uris else stack.meta.get("folder_uri", stack.id)
                raise EmptyStackError(where, stack.meta["error"])
            if not stack.uris:
                raise EmptyStackError(stack.id, "stack has no images")
            members = runner.retrying(lambda: io.read_stack(stack.uris, max_pixels=opts.max_pixels), opts, stack.id)
            first = members[0]
            row.update(height=first.shape[0], width=first.shape[1],
                       channels=1 if first.ndim == 2 else first.shape[2], dtype=str(first.dtype))
            images = members
        except Exception as err:  # noqa: BLE001 - every failure becomes the stack's error row
            _fail(row, stack.id, err)
        row["read_s"] = round(time.perf_counter() - t0, 4)
        rows.append(row)
        sources.append(images)
    return _stage_table(rows, sources=sources)


_ENGINE_START = "fusion engine could not start: "


class FuseStage:
    """Ray Data class UDF for the fusion actor pool: builds the fuser once, fuses batches of stacks.

    Takes ``read_stage``'s table; returns it with ``fused`` (and ``decision``, the 8-bit decision
    map picture, when the run saves them) added and the row completed with method, engine and
    ``fuse_s``. Sources are passed on for scoring only when the run computes metrics. A fuser with
    a ``fuse_batch(list of stacks)`` method gets each group of same-shape stacks in one call.

    A fuser that cannot be built does not kill the actor (Ray would print every actor's traceback
    and retry): the first batch raises one line naming the reason, which ends the run.
    """

    def __init__(self, fuser_spec: dict, opts: RunOptions, fuser_factory: Callable | None = None,
                 cpu_threads: int | None = None):
        from ray_mff.methods import get_fuser

        logging.basicConfig(level=logging.INFO, format="ray-mff actor: %(message)s")
        _worker_setup(None, cpu_threads)
        self.opts, self.fuser, self.start_error = opts, None, None
        self.actor_id = uuid.uuid4().hex[:8]
        try:
            self.fuser = fuser_factory() if fuser_factory else get_fuser(**fuser_spec)
        except Exception as err:  # noqa: BLE001 - reported once, by __call__
            self.start_error = str(err) if isinstance(err, MFFError) else f"{type(err).__name__}: {err}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.start_error:
            raise RuntimeError(_ENGINE_START + self.start_error)
        name = getattr(self.fuser, "name", str(self.fuser))
        rows = [json.loads(r) for r in batch.column("row").to_pylist()]
        stacks = [_unpack(d, lay) for d, lay in zip(batch.column("sources"), batch.column("sources_layout").to_pylist())]
        fused: list = [None] * len(rows)
        decision: list = [None] * len(rows)
        start = time.time()
        begun = self._begin(rows)
        for group in self._same_shape_groups(rows, stacks):
            t0 = time.perf_counter()
            results = self._fuse_group([list(stacks[i]) for i in group], [rows[i]["stack_id"] for i in group])
            each = (time.perf_counter() - t0) / len(group)
            for i, result in zip(group, results):
                row = rows[i]
                if isinstance(result, Exception):
                    _fail(row, row["stack_id"], result)
                    continue
                row.update(engine=result.stats.get("engine"), precision=result.stats.get("precision"),
                           calibration=result.stats.get("calibration"), fuse_s=round(each, 4))
                fused[i] = result.fused
                if self.opts.save_decision_maps:
                    decision[i] = sinks.decision_map_image(result, len(stacks[i]))
        for i, row in enumerate(rows):
            row["method"] = name  # error rows from the read stage too, as process_stack does
            if row.get("status") is None and stacks[i] is not None and len(stacks[i]) == 1:
                # nothing to fuse: the image passes through, and the row says so
                fused[i] = stacks[i][0]
                row.update(engine="none", warning=row.get("warning") or "one-image stack passed through unfused")
            row.update(_actor=self.actor_id, _fuse_start=start, _fuse_end=time.time())
        for stack_id in begun:
            self.opts.attempt_ledger.end(stack_id)
        out = _stage_table(rows, fused=fused, decision=decision)
        if self.opts.compute_metrics:  # the sources go on to be scored: the same Arrow buffers, no copy
            out = out.append_column("sources", batch.column("sources"))
        else:
            out = out.append_column("sources", pa.array([b""] * len(rows), pa.large_binary()))
            batch = batch.set_column(batch.schema.get_field_index("sources_layout"), "sources_layout",
                                     pa.array([""] * len(rows), pa.string()))
        return out.append_column("sources_layout", batch.column("sources_layout"))

    def _begin(self, rows: list[dict]) -> list[str]:
        """Tell the run's :class:`AttemptLedger` which stacks this call fuses; a stack whose worker
        already died twice on it becomes an error row (``resource``) instead of a third death."""
        ledger = self.opts.attempt_ledger
        if ledger is None:
            return []
        begun = []
        for row in rows:
            if row.get("status") is None:
                begun.append(row["stack_id"])
                if ledger.begin(row["stack_id"]) >= 2:
                    row.update(status=manifest.STATUS_ERROR, error=runner.died_twice(row["stack_id"]),
                               error_kind="resource")
        return begun

    @staticmethod
    def _same_shape_groups(rows: list[dict], stacks: list) -> list[list[int]]:
        groups: dict = {}
        for i, (row, images) in enumerate(zip(rows, stacks)):
            if row.get("status") is None and images is not None and len(images) >= 2:
                groups.setdefault((images.shape, str(images.dtype)), []).append(i)
        return list(groups.values())

    def _fuse_group(self, group: list[list[np.ndarray]], ids: list[str]) -> list:
        fuse_batch = getattr(self.fuser, "fuse_batch", None)
        if fuse_batch is not None and len(group) > 1:
            try:
                return list(fuse_batch(group))
            except Exception:  # noqa: BLE001 - fall back to one call per stack, to find the bad one
                log.warning("batched fusion of %d stacks failed; fusing them one by one", len(group))
        out = []
        for images, sid in zip(group, ids):
            try:
                out.append(self.fuser.fuse(images))
            except Exception as err:  # noqa: BLE001 - the stack's error row
                out.append(err)
        return out


def write_stage(batch: pa.Table, *, output_root: str, opts: RunOptions, s3_endpoint: str | None = None) -> pa.Table:
    """CPU task: encode and write each fused image (and decision map), score it; the manifest rows.

    Returns a ``pyarrow.Table`` with :data:`ray_mff.manifest.SCHEMA` plus the engine-clock columns
    ``_actor``, ``_fuse_start``, ``_fuse_end`` (the manifest ignores them).
    """
    _worker_setup(s3_endpoint, cpu_threads=1)
    rows = []
    sources = batch.column("sources")
    fused_col, decision_col = batch.column("fused"), batch.column("decision")
    layouts = {k: batch.column(f"{k}_layout").to_pylist() for k in ("sources", "fused", "decision")}
    for i, text in enumerate(batch.column("row").to_pylist()):
        row = json.loads(text)
        fused = _unpack(fused_col[i], layouts["fused"][i])
        if row.get("status") is None and fused is not None:
            try:
                t0 = time.perf_counter()
                runner.check_lease(row["stack_id"], opts)
                decision = _unpack(decision_col[i], layouts["decision"][i])
                row.update(runner.retrying(lambda: sinks.write_outputs(output_root, row["stack_id"], fused, opts,
                                                                        decision), opts, row["stack_id"]))
                row["status"] = manifest.STATUS_OK
                t1 = time.perf_counter()
                row["write_s"] = round(t1 - t0, 4)
                images = _unpack(sources[i], layouts["sources"][i])
                if images is not None and len(images) >= 2:
                    row.update(sinks.score(list(images), fused, opts))
                    row["score_s"] = round(time.perf_counter() - t1, 4)
            except Exception as err:  # noqa: BLE001 - the stack's error row
                _fail(row, row["stack_id"], err)
        elif row.get("status") is None:
            _fail(row, row["stack_id"], RuntimeError("no fused image came out of the fusion stage"))
        # the stack's own work; time queued between stages is not counted
        row["seconds"] = round(sum(row.get(k) or 0.0 for k in ("read_s", "fuse_s", "write_s", "score_s")), 4)
        row["finished_at"] = _utc_now()
        rows.append(row)
    return _with_clock(manifest.rows_to_table(rows), rows)


def _with_clock(table: pa.Table, rows: list[dict]) -> pa.Table:
    table = table.append_column("_actor", pa.array([r.get("_actor") for r in rows], pa.string()))
    table = table.append_column("_fuse_start", pa.array([r.get("_fuse_start") for r in rows], pa.float64()))
    return table.append_column("_fuse_end", pa.array([r.get("_fuse_end") for r in rows], pa.float64()))


class FusionActor:
    """Ray Data class UDF for whole stacks: builds the fuser once, then reads, fuses, writes and
    scores one batch of stacks per call (:func:`ray_mff.runner.process_stack`).

    The staged pipeline sends it the stacks over its pixel budget (fused in tiles, declared
    ``memory=``); ``design="single"`` sends it everything (the design before the staged one, kept
    as the baseline of ``bench/pipeline.py``). It never raises for a bad stack; a fuser that
    cannot be built ends the run with one line, as in :class:`FuseStage`.
    """

    def __init__(self, fuser_spec: dict, output_root: str, opts: RunOptions, s3_endpoint: str | None = None,
                 cpu_threads: int | None = None, fuser_factory: Callable | None = None):
        from ray_mff.methods import get_fuser

        logging.basicConfig(level=logging.INFO, format="ray-mff actor: %(message)s")
        _worker_setup(s3_endpoint, cpu_threads)
        self.output_root, self.opts, self.fuser, self.start_error = output_root, opts, None, None
        self.actor_id = uuid.uuid4().hex[:8]
        try:
            self.fuser = fuser_factory() if fuser_factory else get_fuser(**fuser_spec)
        except Exception as err:  # noqa: BLE001 - reported once, by __call__
            self.start_error = str(err) if isinstance(err, MFFError) else f"{type(err).__name__}: {err}"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.start_error:
            raise RuntimeError(_ENGINE_START + self.start_error)
        rows = []
        for text in batch["stack"]:
            start = time.time()
            row = process_stack(stack_from_item(str(text)), self.fuser, self.output_root, self.opts)
            rows.append({**row, "_actor": self.actor_id, "_fuse_start": start, "_fuse_end": time.time()})
        return _with_clock(manifest.rows_to_table(rows), rows)


# ------------------------------------------------------------------------------ resources, sizes


@dataclass
class StageResources:
    """Ray resources per stage. The defaults fit ``cluster.yaml``: GPU workers with 4 CPUs and 1 GPU
    (a fusion actor takes the GPU, read and write tasks the CPUs) and CPU workers
    that only read and write.

    ``fuse_gpus`` None: 1 for learned models with an ``auto``/``tensorrt`` engine when the cluster
    has GPUs (or is asked for them), else 0. ``fuse_cpus`` None: 0 with a GPU (the GPU is what
    places the actor; its host-side work is small, and every CPU is left to the read and write
    tasks that feed it), else 1. ``fuse_memory``: bytes declared per fusion actor (None: not
    declared). ``pixel_budget``: stacks with more source pixels (N x H x W) than this take the
    whole-stack path, read, fused in tiles and written inside one actor.
    """

    read_cpus: float = 0.5
    fuse_cpus: float | None = None
    fuse_gpus: float | None = None
    fuse_memory: int | None = None
    post_cpus: float = 1.0
    pixel_budget: int = 64_000_000


def plan_resources(
    fuser_spec: dict,
    cluster: dict,
    *,
    num_actors: int | None = None,
    num_cpus_per_actor: float | None = 1.0,
    num_gpus_per_actor: float | None = None,
    min_actors: int | None = None,
    max_actors: int | None = None,
):
    """(ActorPoolStrategy, gpus per actor, max actors) for this cluster (``ray.cluster_resources()``).

    GPUs: ``num_gpus_per_actor`` if given, else 1 for learned models with an ``auto``/``tensorrt``
    engine when the cluster has GPUs, else 0 (classical methods are numpy code). Actors: a fixed
    pool of ``num_actors`` when given; else an autoscaling pool from ``min_actors`` (default 1) to
    ``max_actors`` (default: the GPUs or CPUs the cluster has now; on an autoscaling cluster give
    the most you want, e.g. the GPU workers' ``max_workers``, and the autoscaler adds nodes).
    """
    import ray.data

    gpus = num_gpus_per_actor
    if gpus is None:
        on_gpu = _is_learned(fuser_spec) and fuser_spec.get("engine", "auto") in ("auto", "tensorrt")
        gpus = 1.0 if on_gpu and cluster.get("GPU", 0) > 0 else 0.0
    if num_actors is not None:
        min_actors = max_actors = num_actors
    if max_actors is None:
        if gpus > 0:
            max_actors = max(1, int(cluster.get("GPU", 0) // gpus))
        else:
            max_actors = max(1, int(cluster.get("CPU", 1) // (num_cpus_per_actor or 1.0)))
    min_actors = max(1, min(int(min_actors or 1), int(max_actors)))
    # Two batches in flight per actor: the next batch is ready when one finishes, and the tail of a
    # run is not queued behind one busy actor while the others idle.
    strategy = ray.data.ActorPoolStrategy(min_size=min_actors, max_size=int(max_actors), initial_size=min_actors,
                                          max_tasks_in_flight_per_actor=2)
    return strategy, float(gpus), int(max_actors)


def _stack_headers(stacks: list[Stack], max_workers: int = 32) -> list:
    """:func:`ray_mff.runner.stack_header` of each stack, in parallel: a few KiB per stack, on the
    driver, at listing time."""
    with ThreadPoolExecutor(max_workers=min(max_workers, max(1, len(stacks)))) as pool:
        return list(pool.map(runner.stack_header, stacks))


STAGED_MEMBER_EXTENSIONS = (".png", ".jpg", ".jpeg")


def needs_whole_stack(stack: Stack, opts: RunOptions) -> bool:
    """True for a stack that only :func:`ray_mff.runner.process_stack` handles in full: one file
    holding a z-stack (OME-TIFF, OME-Zarr, multi-page TIFF), TIFF members whose physical metadata
    goes into the output, an OME output format, alignment or depth maps. The staged path moves
    plain decoded planes between stages; everything else keeps the whole-stack path, so both
    executors write the same files."""
    if len(stack.uris) < 2 or not all(u.lower().endswith(STAGED_MEMBER_EXTENSIONS) for u in stack.uris):
        return True
    fmt = (opts.output_format or "").lower()
    return bool(opts.align.active or opts.depth_map or fmt.startswith("ome"))


def split_stages(stacks: list[Stack], opts: RunOptions, pixel_budget: int,
                 memory_budget: int | None = None) -> tuple[list[Stack], list[Stack], int]:
    """(stacks for the staged path, stacks for the whole-stack path, memory to declare per
    whole-stack actor), from one header read per stack.

    The whole-stack path takes stacks over ``pixel_budget`` source pixels, those that
    :func:`needs_whole_stack`, and those whose :func:`ray_mff.runner.estimate_stack_memory` is over
    ``memory_budget`` (flagged ``over_budget``: fused in tiles, declaring the budget)."""
    staged, whole, memory = [], [], 0
    for stack, head in zip(stacks, _stack_headers(stacks)):
        need = runner.estimate_stack_memory(stack, head=head)
        if memory_budget is not None:
            stack = runner.over_budget(stack, need, memory_budget)
            need = min(need, memory_budget)
        pixels = len(stack.uris) * head.height * head.width if head else 0
        if pixels > pixel_budget or needs_whole_stack(stack, opts) or stack.meta.get("over_budget"):
            whole.append(stack)
            memory = max(memory, need)
        else:
            staged.append(stack)
    return staged, whole, memory


# ------------------------------------------------------------------------------------ the driver


def _redact(url: str | None) -> str | None:
    """An endpoint as it may be logged: any user:password@ part removed."""
    return re.sub(r"//[^/@]*@", "//", url) if url else url


def _ensure_ray(ray_address: str | None):
    """Reuse the Ray instance this process already has; else connect to ``ray_address`` (None:
    ``RAY_ADDRESS`` when set, as under ``ray job submit``, or a new local instance)."""
    import ray

    if not ray.is_initialized():
        local = ray_address is None and not os.environ.get("RAY_ADDRESS")
        # A local instance is for this run only: no dashboard, and no worker chatter on the console.
        ray.init(address=ray_address, **({"include_dashboard": False, "log_to_driver": False,
                                          "configure_logging": False} if local else {}))
    return ray


def _is_learned(fuser_spec: dict) -> bool:
    from ray_mff.methods import CLASSICAL_METHODS, default_method

    return (fuser_spec.get("name") or default_method()) not in CLASSICAL_METHODS


def _workers_are_here(ray_address: str | None) -> bool:
    """True when Ray's workers run on this machine (a local instance, new or already started)."""
    import ray

    if not ray.is_initialized():
        return ray_address is None and not os.environ.get("RAY_ADDRESS")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def check_engine_here(fuser_spec: dict) -> None:
    """Raise :class:`EngineUnavailableError` (one line) when a named engine cannot run on this machine.

    Called before any actor starts when the workers are this machine; on a cluster the engine is
    checked where it runs (the GPU workers), by the fusion actors.
    """
    engine = fuser_spec.get("engine", "auto")
    if not _is_learned(fuser_spec) or engine == "auto":
        return
    from ray_mff.engines import probe_environment, select_engine

    select_engine(engine, probe_environment())


def _one_line_engine_errors(batches: Iterator) -> Iterator:
    """Pass ``batches`` through; a fusion actor's engine failure becomes one EngineUnavailableError."""
    try:
        yield from batches
    except Exception as err:
        text = str(err)
        at = text.find(_ENGINE_START)
        if at < 0:
            raise
        reason = text[at + len(_ENGINE_START):].strip().splitlines()[0]
        raise EngineUnavailableError("fusion actor", reason) from None


class EngineClock:
    """Busy fraction of the fusion actors, from the rows: per actor, the seconds spent fusing over
    the time from its first batch to its last."""

    def __init__(self):
        self.spans: dict[str, list[float]] = {}
        self.busy = 0.0

    def add(self, row: dict) -> None:
        actor, start, end = row.get("_actor"), row.get("_fuse_start"), row.get("_fuse_end")
        if actor is None or start is None or end is None:
            return
        span = self.spans.setdefault(actor, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
        self.busy += row.get("fuse_s") or 0.0

    @property
    def fraction(self) -> float | None:
        wall = sum(end - start for start, end in self.spans.values())
        return min(1.0, self.busy / wall) if wall > 0 and self.busy > 0 else None

    def wrap(self, on_row: Callable[[dict], None] | None) -> Callable[[dict], None]:
        def record(row: dict) -> None:
            self.add(row)
            if on_row:
                on_row(row)

        return record


def build_dataset(
    todo: list[Stack],
    fuser_spec: dict,
    output_root: str,
    opts: RunOptions,
    cluster: dict,
    *,
    design: str = "staged",
    resources: StageResources | None = None,
    num_actors: int | None = None,
    min_actors: int | None = None,
    max_actors: int | None = None,
    batch_size: int = 1,
    s3_endpoint: str | None = None,
    stacks_per_block: int | None = None,
    fuser_factory: Callable | None = None,
    memory_budget: int | None = None,
):
    """The Ray Dataset of manifest rows for ``todo`` (lazy: nothing runs until it is iterated).

    ``design="staged"``: read tasks -> fusion actor pool -> write tasks, with stacks over the pixel
    budget on the whole-stack path; ``"single"``: every stack read, fused, written and scored in
    one fusion actor call (:class:`FusionActor`). ``fuser_factory``: a picklable callable that
    builds the fuser in each actor instead of ``get_fuser(**fuser_spec)`` (benchmarks, tests).
    """
    import ray.data

    if design not in ("staged", "single"):
        raise ValueError(f"design must be 'staged' or 'single', got {design!r}")
    res = resources or StageResources()
    gpus_asked = res.fuse_gpus
    strategy, gpus, actors = plan_resources(fuser_spec, cluster, num_actors=num_actors,
                                            num_cpus_per_actor=res.fuse_cpus or 1.0,
                                            num_gpus_per_actor=gpus_asked, min_actors=min_actors,
                                            max_actors=max_actors)
    fuse_cpus = res.fuse_cpus if res.fuse_cpus is not None else (0.0 if gpus > 0 else 1.0)
    gpu_args = {"num_gpus": gpus} if gpus > 0 else {}
    cpu_threads = max(1, int(fuse_cpus)) if gpus == 0 else None
    # design "single": every stack whole-stack (a pixel budget below any stack)
    staged, whole, whole_memory = split_stages(todo, opts, res.pixel_budget if design == "staged" else -1,
                                               memory_budget)
    whole_memory = res.fuse_memory or whole_memory
    log.info("ray: %s design; fusion actors %d..%d x (%g CPU, %g GPU), batch %d; %d stacks staged, "
             "%d whole-stack%s", design, strategy.min_size, strategy.max_size, fuse_cpus, gpus, batch_size,
             len(staged), len(whole), f" ({whole_memory / 2**30:.1f} GiB each)" if whole and whole_memory else "")

    def items(stacks: list[Stack]):
        # Small blocks: the driver sees (and flushes) rows a few stacks at a time, and queues stay
        # short, at a per-block overhead of a few ms against tens of ms per stack.
        per_block = stacks_per_block or min(16, math.ceil(len(stacks) / (4 * actors)))
        per_block = max(int(batch_size), int(per_block), 1)
        return ray.data.from_items([stack_to_item(s) for s in stacks],
                                   override_num_blocks=math.ceil(len(stacks) / per_block))

    parts = []
    if staged:
        ds = items(staged).map_batches(read_stage, fn_kwargs={"opts": opts, "s3_endpoint": s3_endpoint},
                                       batch_size=1, batch_format="pyarrow", num_cpus=res.read_cpus)
        ds = ds.map_batches(FuseStage, fn_constructor_kwargs={"fuser_spec": fuser_spec, "opts": opts,
                                                              "fuser_factory": fuser_factory,
                                                              "cpu_threads": cpu_threads},
                            compute=strategy, batch_size=batch_size, batch_format="pyarrow", num_cpus=fuse_cpus,
                            **({"memory": res.fuse_memory} if res.fuse_memory else {}), **gpu_args)
        ds = ds.map_batches(write_stage, fn_kwargs={"output_root": output_root, "opts": opts,
                                                    "s3_endpoint": s3_endpoint},
                            batch_size=1, batch_format="pyarrow", num_cpus=res.post_cpus)
        parts.append(ds)
    if whole:
        whole_strategy = strategy if design == "single" else plan_resources(
            fuser_spec, cluster, num_gpus_per_actor=gpus, min_actors=1, max_actors=actors)[0]
        ds = items(whole).map_batches(
            FusionActor,
            fn_constructor_kwargs={"fuser_spec": fuser_spec, "output_root": output_root, "opts": opts,
                                   "s3_endpoint": s3_endpoint, "cpu_threads": cpu_threads,
                                   "fuser_factory": fuser_factory},
            compute=whole_strategy, batch_size=batch_size if design == "single" else 1, batch_format="numpy",
            num_cpus=fuse_cpus, **({"memory": whole_memory} if whole_memory else {}), **gpu_args)
        parts.append(ds)
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


class AttemptLedger:
    """Counts, per stack, the attempts that never ended: a worker that dies (OOM killer, segfault)
    mid-stack leaves its stack begun and not ended. Ray Data restarts the actor and retries the
    task; the retry fuses the stack once more, and a stack whose worker died twice becomes an
    error row (``error_kind=resource``) instead of killing workers forever or failing the job.
    Runs as a small Ray actor owned by the driver (it dies with the driver)."""

    def __init__(self):
        self.open: set[str] = set()
        self.deaths: dict[str, int] = {}

    def begin(self, stack_id: str) -> int:
        if stack_id in self.open:
            self.deaths[stack_id] = self.deaths.get(stack_id, 0) + 1
        self.open.add(stack_id)
        return self.deaths.get(stack_id, 0)

    def end(self, stack_id: str) -> None:
        self.open.discard(stack_id)


class _LedgerClient:
    """What :func:`ray_mff.runner.process_stack` calls (``begin``/``end``), picklable into actors."""

    def __init__(self, handle):
        self.handle = handle

    def begin(self, stack_id: str) -> int:
        import ray

        return ray.get(self.handle.begin.remote(stack_id))

    def end(self, stack_id: str) -> None:
        self.handle.end.remote(stack_id)


def _node_memory_budget(ray) -> int:
    """80 % of the largest node's Ray memory resource (what an actor may declare)."""
    sizes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    return int(0.8 * max(sizes, default=0)) or runner.node_memory_budget()


def _estimates(stacks: list[Stack]) -> list[int]:
    """:func:`ray_mff.runner.estimate_stack_memory` of each stack, headers read 16 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(runner.estimate_stack_memory, stacks))


def run_pipeline(
    stacks: "list[Stack] | Listing",
    fuser_spec: dict,
    output_root: str,
    opts: RunOptions,
    *,
    run_id: str | None = None,
    num_actors: int | None = None,
    min_actors: int | None = None,
    max_actors: int | None = None,
    batch_size: int = 1,
    ray_address: str | None = None,
    s3_endpoint: str | None = None,
    num_gpus_per_actor: float | None = None,
    num_cpus_per_actor: float | None = None,
    resources: StageResources | None = None,
    design: str = "staged",
    fuser_factory: Callable | None = None,
    flush_every: int = 32,
    flush_seconds: float = 30.0,
    stacks_per_block: int | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Fuse ``stacks`` on Ray Data; write images and manifest parts under ``output_root``.

    Args:
        stacks: the job's stack list (``discover_stacks``) or :class:`ray_mff.listing.Listing` (``discover_listing``,
            what ``ray-mff fuse`` passes: Stack objects are made for the stacks to fuse only);
            stacks already done are skipped (:func:`ray_mff.runner.plan_run`, ``opts.force`` redoes them).
        fuser_spec: keyword arguments for :func:`ray_mff.methods.get_fuser`, e.g.
            ``{"name": "guided"}`` or ``{"name": "cascade", "engine": "tensorrt", "precision": "fp16"}``.
        num_actors: a fixed number of fusion actors (sets both ``min_actors`` and ``max_actors``).
        min_actors, max_actors: the autoscaling fusion pool (see :func:`plan_resources`).
        batch_size: stacks per fusion actor call.
        ray_address: cluster to connect to when this process has no Ray yet (None: ``RAY_ADDRESS`` or local).
        s3_endpoint: S3-compatible endpoint for driver and workers (else the process default / env).
        num_gpus_per_actor, num_cpus_per_actor: resources of a fusion actor (override ``resources``).
        resources: per-stage resources (:class:`StageResources`).
        design: ``"staged"`` (default) or ``"single"`` (see :func:`build_dataset`).
        fuser_factory: builds the fuser in each actor instead of ``get_fuser(**fuser_spec)``.
        flush_every, flush_seconds: write a manifest part after this many rows or seconds, whichever first.
        stacks_per_block: stacks per Ray Data block (default: small blocks, so rows stream back early).
        on_row: called on the driver with every finished row.

    Returns:
        RunSummary with counts (fused / skipped / failed), this run's rows and the fusion
        actors' busy fraction.
    """
    if s3_endpoint:
        storage.set_s3_endpoint(s3_endpoint)
    run_id = run_id or manifest.new_run_id()
    plan = runner.plan_stacks(stacks, output_root, opts)
    # Stack objects for every stack to fuse: the stages are split from one header read per stack
    # on the driver (split_stages); the local loop makes them as it goes instead
    todo = list(plan.todo)
    summary = runner.new_summary(plan, run_id, output_root)
    log.info("run %s: %d stacks to fuse, %d already done", run_id, len(todo), plan.n_skipped)
    if not todo:
        return summary  # nothing to do: do not start (or connect to) Ray at all
    if fuser_factory is None and _workers_are_here(ray_address):
        check_engine_here(fuser_spec)  # one line, before any actor starts

    ray = _ensure_ray(ray_address)
    endpoint = storage.effective_s3_endpoint(s3_endpoint)
    if endpoint:
        log.info("ray: S3 endpoint %s", _redact(endpoint))
    res = resources or StageResources()
    if num_gpus_per_actor is not None or num_cpus_per_actor is not None:
        res = StageResources(**{**res.__dict__,
                                **({"fuse_gpus": num_gpus_per_actor} if num_gpus_per_actor is not None else {}),
                                **({"fuse_cpus": num_cpus_per_actor} if num_cpus_per_actor is not None else {})})
    # Deaths per stack on the whole-stack path: retried once, then an error row (see AttemptLedger).
    ledger = ray.remote(AttemptLedger).options(num_cpus=0).remote()
    opts = dataclasses.replace(opts, attempt_ledger=_LedgerClient(ledger))
    # Memory: stacks are declared what they need (from their headers), so Ray does not pack more
    # actors on a node than fit; stacks over a node's budget take the tiled path.
    ds = build_dataset(todo, fuser_spec, output_root, opts, ray.cluster_resources(), design=design, resources=res,
                       num_actors=num_actors, min_actors=min_actors, max_actors=max_actors, batch_size=batch_size,
                       s3_endpoint=endpoint, stacks_per_block=stacks_per_block, fuser_factory=fuser_factory,
                       memory_budget=_node_memory_budget(ray))
    clock = EngineClock()
    on_row = clock.wrap(on_row)

    writer = manifest.ManifestWriter(output_root, run_id, flush_every=flush_every, flush_seconds=flush_seconds,
                                     first_seq=plan.first_seq)
    stream = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    try:
        # A stream: blocks of rows arrive as actors finish them; nothing is collected in Ray.
        for table in _one_line_engine_errors(stream):
            stop = None
            for row in table.to_pylist():
                row = writer.add(row)  # stamped with this run's id and seq; flushed by count and time
                summary.record(row)
                if on_row:
                    on_row(row)
                if row.get("error_kind") == "storage" and stop is None:
                    stop = runner.storage_lost(_row_stack(row), output_root)
            if stop:
                summary.stopped, summary.stop_reason = "storage", stop
                log.error("storage unreachable: %s; stopping (the rerun finishes the work)", stop)
                break
            if runner.STOP:
                summary.stopped = runner.STOP.signal
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        runner.finish_run(summary, writer)
    summary.engine_busy = clock.fraction
    return summary


def _row_stack(row: dict) -> Stack:
    return Stack(row["stack_id"], tuple(row.get("source_uris") or ()), {})
