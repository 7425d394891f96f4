"""The Ray Data pipeline: the stack list -> fusion actors -> fused images + the Parquet manifest.

Same work as the local loop (:func:`ray_mff.runner.run_local`), spread over a Ray cluster::

    driver:  discover_stacks -> plan_run (skip what is done) -> [stack dicts]      (names only)
    Ray:     from_items([...]) -> map_batches(FusionActor, ActorPoolStrategy)    (one row per stack)
    actor:   process_stack = read (explicit fs) -> fuse -> write image (atomic) -> score
    driver:  iter_batches (a stream) -> ManifestWriter (a part file every N rows / T seconds)

Design choices, and why:

- The stack list is made up front on the driver from one listing; it *is* the job's manifest. No
  pixels go through the object store: each actor reads its stack's images straight from storage
  and writes the fused image straight back, so the only data flowing through Ray are small rows
  (uris in, manifest rows out). That is what makes memory flat in the number of stacks.
- :class:`FusionActor` builds the fuser once (``get_fuser(**fuser_spec)``: a learned model's
  engine — ONNX Runtime session, TensorRT engine — is loaded once per actor, not per stack) and
  calls :func:`ray_mff.runner.process_stack`, the unit of work shared with the local loop, so a
  stack is read, fused, written and scored identically under both executors.
- Actors return the rows as a ``pyarrow.Table`` with exactly the manifest schema
  (:data:`ray_mff.manifest.SCHEMA`): plain string/int/float/list<string>/timestamp columns, no Ray
  tensor extension types, no pickled objects; the driver hands them to the manifest unchanged.
- The driver consumes results as a stream (``iter_batches``) and flushes manifest parts as it
  goes, so a driver killed mid-run leaves rows for everything flushed; the rerun's
  :func:`~ray_mff.runner.plan_run` does only what is missing. A stack finished but not yet
  flushed when the driver died is simply fused again (its output is overwritten atomically), so
  every stack ends with exactly one output and one row.
- Workers get the S3 endpoint from the driver through the actor constructor (explicit
  ``s3_endpoint`` > :func:`ray_mff.storage.set_s3_endpoint` > ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL`` on the driver). Credentials are never passed: each worker's s3fs/botocore
  finds them in its own environment, ``~/.aws`` or the instance role.

Example::

    >>> from ray_mff.stacks import discover_stacks                      # doctest: +SKIP
    >>> summary = run_pipeline(discover_stacks("s3://archive/in"), {"name": "guided"},
    ...                        "s3://archive/fused", RunOptions())      # doctest: +SKIP
    >>> summary.fused, summary.skipped, summary.failed                  # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Callable

import numpy as np
import pyarrow as pa

from ray_mff import manifest, storage
from ray_mff import runner
from ray_mff.runner import RunOptions, RunSummary, plan_run, process_stack
from ray_mff.stacks import Stack

log = logging.getLogger("ray_mff")


# ------------------------------------------------------------------------------- stack <-> item


def stack_to_item(stack: Stack) -> dict:
    """A Stack as a Ray Data row of plain strings: ``stack_id`` and the stack as JSON.

    JSON rather than list columns keeps the input free of ragged object arrays (which Ray Data
    would turn into tensor extension types) and round-trips ``meta`` (sizes, warnings, errors).
    """
    payload = {"id": stack.id, "uris": list(stack.uris), "meta": stack.meta}
    return {"stack_id": stack.id, "stack": json.dumps(payload, default=_jsonable)}


def stack_from_item(text: str) -> Stack:
    d = json.loads(text)
    meta = {k: tuple(v) if isinstance(v, list) else v for k, v in d["meta"].items()}
    return Stack(d["id"], tuple(d["uris"]), meta)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# ------------------------------------------------------------------------------------ the actor


class FusionActor:
    """Ray Data class UDF: builds the fuser once, then fuses one batch of stacks per call.

    ``__call__`` takes ``{"stack_id": (B,) str, "stack": (B,) JSON str}`` and returns the B
    manifest rows as a ``pyarrow.Table`` with :data:`ray_mff.manifest.SCHEMA`. It never raises
    for a bad stack (``process_stack`` turns it into an error row), so one corrupt file cannot
    fail the Ray job.
    """

    def __init__(self, fuser_spec: dict, output_root: str, opts: RunOptions, s3_endpoint: str | None = None,
                 cpu_threads: int | None = None):
        from ray_mff.methods import get_fuser

        logging.basicConfig(level=logging.INFO, format="ray-mff actor: %(message)s")
        if s3_endpoint:
            storage.set_s3_endpoint(s3_endpoint)
        if cpu_threads:
            # An actor granted k CPUs should use k threads: OpenCV defaults to every core, and
            # N actors x all cores oversubscribes the node (Ray sets OMP_NUM_THREADS, not this).
            import cv2

            cv2.setNumThreads(int(cpu_threads))
        self.fuser = get_fuser(**fuser_spec)
        self.output_root = output_root
        self.opts = opts

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [process_stack(stack_from_item(str(text)), self.fuser, self.output_root, self.opts)
                for text in batch["stack"]]
        return manifest.rows_to_table(rows)


# ------------------------------------------------------------------------------------ the driver


def _redact(url: str | None) -> str | None:
    """An endpoint as it may be logged: any user:password@ part removed."""
    return re.sub(r"//[^/@]*@", "//", url) if url else url


def _ensure_ray(ray_address: str | None):
    """Reuse the Ray instance this process already has; else connect to ``ray_address`` (None:
    ``RAY_ADDRESS`` when set, as under ``ray job submit``, or a new local instance)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address)
    return ray


def _is_learned(fuser_spec: dict) -> bool:
    from ray_mff.methods import CLASSICAL_METHODS, default_method

    return (fuser_spec.get("name") or default_method()) not in CLASSICAL_METHODS


def plan_resources(
    fuser_spec: dict,
    cluster: dict,
    *,
    num_actors: int | None,
    num_cpus_per_actor: float,
    num_gpus_per_actor: float | None,
):
    """(ActorPoolStrategy, gpus per actor) for this cluster's resources (``ray.cluster_resources()``).

    GPUs: ``num_gpus_per_actor`` if given, else 1 for learned models with an ``auto``/``tensorrt``
    engine when the cluster has GPUs, else 0 (classical methods are numpy code). Actors: a fixed
    pool of ``num_actors``; by default one per GPU (GPU runs) or one per ``num_cpus_per_actor``
    CPUs (CPU runs).
    """
    import ray.data

    gpus = num_gpus_per_actor
    if gpus is None:
        on_gpu = _is_learned(fuser_spec) and fuser_spec.get("engine", "auto") in ("auto", "tensorrt")
        gpus = 1.0 if on_gpu and cluster.get("GPU", 0) > 0 else 0.0
    if num_actors is None:
        if gpus > 0:
            num_actors = max(1, int(cluster.get("GPU", 0) // gpus))
        else:
            num_actors = max(1, int(cluster.get("CPU", 1) // num_cpus_per_actor))
    # Two batches in flight per actor: the next batch is ready when one finishes, and the tail of a
    # run is not queued behind one busy actor while the others idle.
    strategy = ray.data.ActorPoolStrategy(size=num_actors, max_tasks_in_flight_per_actor=2)
    return strategy, float(gpus), num_actors


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
    stacks: list[Stack],
    fuser_spec: dict,
    output_root: str,
    opts: RunOptions,
    *,
    run_id: str | None = None,
    num_actors: int | None = None,
    batch_size: int = 1,
    ray_address: str | None = None,
    s3_endpoint: str | None = None,
    num_gpus_per_actor: float | None = None,
    num_cpus_per_actor: float = 1.0,
    flush_every: int = 32,
    flush_seconds: float = 30.0,
    stacks_per_block: int | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Fuse ``stacks`` on Ray Data; write images and manifest parts under ``output_root``.

    Args:
        stacks: the job's stack list (``discover_stacks``); stacks already done are skipped
            (:func:`ray_mff.runner.plan_run`, ``opts.force`` redoes them).
        fuser_spec: keyword arguments for :func:`ray_mff.methods.get_fuser`, e.g.
            ``{"name": "guided"}`` or ``{"name": "cascade", "engine": "tensorrt", "precision": "fp16"}``.
        num_actors: fusion actors (default: one per GPU on GPU runs, else CPUs / ``num_cpus_per_actor``).
        batch_size: stacks per actor call.
        ray_address: cluster to connect to when this process has no Ray yet (None: ``RAY_ADDRESS`` or local).
        s3_endpoint: S3-compatible endpoint for driver and workers (else the process default / env).
        num_gpus_per_actor: see :func:`plan_resources`.
        flush_every, flush_seconds: write a manifest part after this many rows or seconds, whichever first.
        stacks_per_block: stacks per Ray Data block (default: small blocks, so rows stream back early).
        on_row: called on the driver with every finished row.

    Returns:
        RunSummary with counts (fused / skipped / failed) and this run's rows.
    """
    if s3_endpoint:
        storage.set_s3_endpoint(s3_endpoint)
    run_id = run_id or manifest.new_run_id()
    plan = runner.plan_stacks(stacks, output_root, opts)
    todo = plan.todo
    summary = runner.new_summary(plan, run_id, output_root)
    log.info("run %s: %d stacks to fuse, %d already done", run_id, len(todo), len(plan.skipped))
    if not todo:
        return summary  # nothing to do: do not start (or connect to) Ray at all

    ray = _ensure_ray(ray_address)
    strategy, gpus, actors = plan_resources(fuser_spec, ray.cluster_resources(), num_actors=num_actors,
                                            num_cpus_per_actor=num_cpus_per_actor,
                                            num_gpus_per_actor=num_gpus_per_actor)
    endpoint = storage.effective_s3_endpoint(s3_endpoint)
    log.info("ray: %d fusion actors x (%g CPU, %g GPU), batch %d%s", actors, num_cpus_per_actor, gpus,
             batch_size, f"; S3 endpoint {_redact(endpoint)}" if endpoint else "")

    # Memory: declare what the largest stack needs (from its header) so Ray does not pack more
    # actors on a node than fit; stacks over a node's budget take the tiled path instead.
    budget = _node_memory_budget(ray)
    need = _estimates(todo)
    todo = [Stack(st.id, st.uris, {**st.meta, "over_budget": True}) if n > budget else st
            for st, n in zip(todo, need)]
    actor_memory = min(max(need, default=0), budget)
    # Deaths per stack: retried once, then an error row (see AttemptLedger).
    import dataclasses

    ledger = ray.remote(AttemptLedger).options(num_cpus=0).remote()
    opts = dataclasses.replace(opts, attempt_ledger=_LedgerClient(ledger))

    # Small blocks: the driver sees (and flushes) rows a few stacks at a time, and the actors'
    # queues stay short, at a per-block overhead of a few ms against tens of ms per stack.
    if stacks_per_block is None:
        stacks_per_block = min(16, math.ceil(len(todo) / (4 * actors)))
    stacks_per_block = max(int(batch_size), int(stacks_per_block), 1)
    blocks = math.ceil(len(todo) / stacks_per_block)

    import ray.data

    ds = ray.data.from_items([stack_to_item(s) for s in todo], override_num_blocks=blocks)
    remote_args = {"num_gpus": gpus} if gpus > 0 else {}
    if actor_memory > 0:
        remote_args["memory"] = int(actor_memory)
    ds = ds.map_batches(
        FusionActor,
        fn_constructor_kwargs={"fuser_spec": fuser_spec, "output_root": output_root, "opts": opts,
                               "s3_endpoint": endpoint,
                               "cpu_threads": max(1, int(num_cpus_per_actor)) if gpus == 0 else None},
        compute=strategy,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus_per_actor,
        **remote_args,
    )

    writer = manifest.ManifestWriter(output_root, run_id, flush_every=flush_every, flush_seconds=flush_seconds,
                                     first_seq=plan.first_seq)
    stream = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    try:
        # A stream: blocks of rows arrive as actors finish them; nothing is collected in Ray.
        for table in stream:
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
    return summary


def _row_stack(row: dict) -> Stack:
    return Stack(row["stack_id"], tuple(row.get("source_uris") or ()), {})
