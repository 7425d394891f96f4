"""Planning a rerun against a big manifest: time and peak memory at 10k, 100k and 1M rows.

For each size N, OUTPUT is built once (in its own process) the way a long-lived archive's looks:
N fused images (empty files: only their names matter to planning), a manifest of one compacted
generation file with N-k rows plus k part files of 32 rows (the last runs' flushes; k = 32).
1 % of the stacks have a changed input (their row's fingerprint differs) and 0.1 % lost their
output, so the plan has real work and the planners' answers are compared.

Each planner then runs in a fresh process of its own; "peak MiB" is that process's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the interpreter, pyarrow and everything it built,
not only the planner):

- **arrow**: the stacks come as a :class:`ray_mff.listing.Listing` (``listing.listing_of`` fed by a
  generator of Stack objects, compressed 16k at a time: "listing s", not in "plan s" but in the peak), then
  ``runner.plan_stacks`` (timed: read the manifest's plan columns through pyarrow.dataset, newest
  row per stack, one names-only listing of OUTPUT into an Arrow array, the decisions as Arrow and
  numpy columns, Stack objects made for the stacks to fuse only);
- **list**: the same vectorised ``plan_stacks`` given a list of N Stack objects, as
  ``discover_stacks`` hands it over today (the list is built first, outside "plan s", inside the peak);
- **old** (baseline in the same run): the previous planner on that list: every row of the
  manifest into Python lists, a set of every output name, a loop over the stacks.

"plan s" is the best of 3 runs in that process (the machine may be shared; peak RSS covers all 3).

**End to end** (``--parts e2e``): what ``ray-mff fuse`` does before fusing, on real files. INPUT is a
real folder tree of N stack folders (``s0000042/s0000042_A.png``, ``_B.png``: 2N empty files, names
and sizes are all discovery reads), OUTPUT as above with the manifest's fingerprints taken from that
tree (1 % changed, 0.1 % outputs missing). Each path runs once in a fresh process:

- **listing** (``ray-mff fuse`` now): ``listing.discover_listing(INPUT, leave_out=cli._in_output(...))``
  ("discover s": the folder-by-folder listing, the discovery rules, the compressed listing, ids
  made unique, natural order; a root of 32768+ sub-folders is shared out over one process per core),
  then ``runner.plan_stacks(listing, OUTPUT, ...)`` ("plan s"), as
  ``cli.run_fuse`` -> ``runner.run_local``/``pipeline.run_pipeline`` call them (the storage probes,
  the lease and fusing itself are not in it);
- **listing, 1 process**: the same with ``workers=1`` (what a root of fewer sub-folders gets; the
  parallel discovery's baseline in the same run);
- **list** (the baseline, the path before this change): ``stacks.discover_stacks`` (a list of N
  Stack objects) then ``plan_stacks`` on the list;
- **find**: ``storage.walk`` alone (fsspec ``find(detail=True)``: every entry's info dict at once),
  what discovery listed through before it went folder by folder (up to ``--find-max``).

**A first run** (``--parts first``): N new stacks as a listing (built from a generator), planned
against an empty OUTPUT, then every stack to fuse reached as ``runner.run_local`` reaches them,
without fusing: ``plan.todo`` as the loop takes it (Stack objects made a chunk at a time, "lazy"),
against the same made into a list first ("list", what the loop held before).

"peak MiB" is the process's peak RSS (interpreter and imports, about 140 MiB, included); "worker MiB"
the largest peak RSS among the processes a parallel discovery started (each holds its share's rows
while it works; nan: discovery ran in one process); "at once MiB" a bound on the memory of all of
them together: the driver's peak until discovery ended plus every worker at its own peak, or the
driver's peak (reached while planning, when the workers are gone) if larger; "list/listing" the list path's total time over
the listing path's, both measured in this run. Prints one
table per part; ``--sizes``, ``--parts``, ``--baseline-max`` (the largest size the old planner runs at).

    .venv/bin/python bench/manifest.py [--sizes 10000 100000 1000000] [--parts planners e2e first] [--tmp /dev/shm]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PART_ROWS, RECENT_PARTS = 32, 32
REPEAT = 3


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _children_peak_mib() -> float:
    """The largest peak RSS of this process's finished children (parallel discovery's workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def build(root: Path, n: int, fingerprints: list[str] | None = None) -> None:
    """OUTPUT with n empty images (0.1 % missing) and a compacted manifest plus RECENT_PARTS recent
    parts (1 % of rows with another input fingerprint). ``fingerprints``: the stacks' own (a real
    INPUT tree's), else those of :func:`stack`."""
    import datetime as dt

    import pyarrow.parquet as pq

    from ray_mff import manifest

    out = root / "out"
    out.mkdir(parents=True)
    for i in range(n):
        if i % 1000 != 1:
            (out / f"s{i:07d}.png").touch()
    recent = min(n // 2, RECENT_PARTS * PART_ROWS)
    now = dt.datetime.now(dt.timezone.utc)

    def rows(lo, hi):
        return [{"run_id": "r0", "stack_id": f"s{i:07d}", "source_uris": [f"/in/s{i:07d}/a.png", f"/in/s{i:07d}/b.png"],
                 "source_fingerprint": "changed" if i % 100 == 0 else fingerprints[i] if fingerprints
                 else fingerprint(i),
                 "output_uri": str(out / f"s{i:07d}.png"), "status": "ok", "method": "guided", "seconds": 0.1,
                 "finished_at": now, "recipe_id": "recipe", "seq": i, "n_images": 2} for i in range(lo, hi)]

    mdir = out / manifest.MANIFEST_NAME
    mdir.mkdir()
    step = 200_000
    writer = None
    for lo in range(0, n - recent, step):
        table = manifest.rows_to_table(rows(lo, min(n - recent, lo + step)))
        writer = writer or pq.ParquetWriter(mdir / "gen-000001.parquet", table.schema)
        writer.write_table(table)
    if writer:
        writer.close()
    for k, lo in enumerate(range(n - recent, n, PART_ROWS)):
        manifest.write_part(str(out), rows(lo, min(n, lo + PART_ROWS)), "r1", k)


E2E_MTIME_NS = 1_700_000_000 * 10**9  # whole seconds: the listing's float mtime gives this back exactly


def build_e2e(root: Path, n: int) -> None:
    """INPUT: a real tree of n stack folders with two empty images each (mtime set to
    E2E_MTIME_NS); OUTPUT as :func:`build`, its manifest carrying the fingerprints discovery gives
    that tree (so 1 % changed input, 0.1 % missing output: a wrong fingerprint would show as a
    plan with every stack to do)."""
    from ray_mff.runner import source_fingerprint
    from ray_mff.stacks import Stack

    fingerprints = []
    for i in range(n):
        sid = f"s{i:07d}"
        folder = root / "in" / sid
        folder.mkdir(parents=True)
        uris = []
        for member in "AB":
            fd = os.open(folder / f"{sid}_{member}.png", os.O_CREAT | os.O_WRONLY, 0o644)
            os.utime(fd, ns=(E2E_MTIME_NS, E2E_MTIME_NS))
            os.close(fd)
            uris.append(str(folder / f"{sid}_{member}.png"))
        fingerprints.append(source_fingerprint(Stack(sid, tuple(uris), {"sizes": (0, 0),
                                                                         "versions": (str(E2E_MTIME_NS),) * 2})))
    build(root, n, fingerprints)


def measure_e2e(root: Path, n: int, path: str) -> dict:
    """One path of ``ray-mff fuse`` before fusing: discovery of INPUT, then planning against OUTPUT."""
    from ray_mff import cli, listing, runner, storage, stacks

    src, out = str(root / "in"), str(root / "out")
    opts = runner.RunOptions(recipe_id="recipe")
    t0 = time.perf_counter()
    if path == "find":
        files, _ = storage.walk(src)
        return {"discover_s": time.perf_counter() - t0, "peak_mib": _peak_mib(), "files": len(files)}
    if path in ("listing", "listing1"):
        found = listing.discover_listing(src, leave_out=cli._in_output(src, out), workers=1 if path == "listing1" else None)
    else:
        found = stacks.discover_stacks(src)
    t1 = time.perf_counter()
    discover_peak = _peak_mib()
    plan = runner.plan_stacks(found, out, opts)
    t2 = time.perf_counter()
    return {"discover_s": t1 - t0, "plan_s": t2 - t1, "peak_mib": _peak_mib(), "worker_peak_mib": _children_peak_mib(),
            "discover_peak_mib": discover_peak,
            "todo": [s.id for s in plan.todo],
            "reasons": plan.reasons, "skipped": plan.n_skipped}


def measure_first(n: int, mode: str) -> dict:
    """A first run's plan: n new stacks (a listing built from a generator, planned against an empty
    OUTPUT), then every stack to fuse reached as ``runner.run_local``'s loop reaches them, without
    fusing: ``plan.todo`` as it is (made a chunk at a time: "lazy"), or made into a list first ("list",
    as the loop did before)."""
    from ray_mff import listing, runner

    built = listing.listing_of(stack(i) for i in range(n))
    with tempfile.TemporaryDirectory(prefix="mff-bench-first-") as out:
        t0 = time.perf_counter()
        plan = runner.plan_stacks(built, out, runner.RunOptions(recipe_id="recipe"))
        todo = list(plan.todo) if mode == "list" else plan.todo
        members = sum(len(s.uris) for s in todo)
        return {"seconds": time.perf_counter() - t0, "peak_mib": _peak_mib(), "members": members}


def first_run(sizes: list[int]) -> None:
    print("a first run: every stack new; plan + every stack to fuse reached as the local loop does (no fusing); "
          "each in a fresh process; peak = its peak RSS")
    print(f"{'stacks':>9}  {'lazy: s':>7}  {'peak MiB':>8}  {'list: s':>7}  {'peak MiB':>8}  {'list/lazy MiB':>13}")
    for n in sizes:
        lazy, whole = (_child("-", n, f"first-{mode}") for mode in ("lazy", "list"))
        print(f"{n:>9}  {lazy['seconds']:>7.2f}  {lazy['peak_mib']:>8.0f}  {whole['seconds']:>7.2f}  "
              f"{whole['peak_mib']:>8.0f}  {whole['peak_mib'] / lazy['peak_mib']:>12.2f}x", flush=True)


def fingerprint(i: int) -> str:
    from ray_mff.runner import source_fingerprint

    return source_fingerprint(stack(i))


def stack(i: int):
    from ray_mff.stacks import Stack

    return Stack(f"s{i:07d}", (f"/in/s{i:07d}/a.png", f"/in/s{i:07d}/b.png"),
                 {"layout": "folder", "folder": f"s{i:07d}", "indices": ("a", "b"), "sizes": (1000, 1000),
                  "versions": ("1", "2")})


def measure(root: Path, n: int, planner: str) -> dict:
    from ray_mff import listing, manifest, runner

    opts = runner.RunOptions(recipe_id="recipe")
    out = str(root / "out")
    t0 = time.perf_counter()
    if planner == "arrow":
        stacks = listing.listing_of(stack(i) for i in range(n))
    else:
        stacks = [stack(i) for i in range(n)]  # what discovery hands the planner today
    listing_s = time.perf_counter() - t0
    seconds = float("inf")
    for _ in range(REPEAT):  # the best of REPEAT: the machine is shared, the minimum is the planner's own time
        t0 = time.perf_counter()
        if planner == "old":
            todo, reasons, n_skipped, _ = old_plan(stacks, out, opts)
        else:
            plan = runner.plan_stacks(stacks, out, opts)
            todo, reasons, n_skipped = plan.todo, plan.reasons, plan.n_skipped
        seconds = min(seconds, time.perf_counter() - t0)
    return {"n": n, "planner": planner, "listing_s": listing_s, "seconds": seconds, "peak_mib": _peak_mib(),
            "files": len(manifest._files(out)[1]), "todo": [s.id for s in todo], "reasons": reasons,
            "skipped": n_skipped}


def old_plan(stacks, output_root: str, opts):
    """The previous planner (before the vectorised one), the baseline, and what
    tests/test_reliability.py checks the new one against: the newest rows into Python lists, a set
    of every output name, one loop over the stacks. Returns (todo, reasons, n_skipped, waiting)."""
    from ray_mff import manifest, storage
    from ray_mff.runner import RETRY_ON_RERUN, _kind_of, legacy_fingerprint, source_fingerprint

    if opts.force:
        return list(stacks), {s.id: "forced" for s in stacks}, 0, 0
    latest = manifest.latest_table(output_root, [*manifest.PLAN_COLUMNS, "seq"]) \
        if manifest._files(output_root)[1] else None
    rows = {}
    if latest is not None and latest.num_rows:
        cols = [latest[c].to_pylist() for c in [*manifest.PLAN_COLUMNS, "seq"]]
        rows = {c[0]: c[1:] for c in zip(*cols)}
    names = set()
    if rows:
        fs, path = storage.resolve(output_root)
        prefix = path.rstrip("/") + "/"
        if storage.is_remote(output_root):
            names = {p[len(prefix):] for p in fs.find(path) if p.startswith(prefix)}
        else:
            for d, _, files in os.walk(path):
                sub = d[len(prefix):] + "/" if len(d) > len(path) else ""
                names.update(sub + f for f in files)
    spelled = storage.join_uri(output_root, "x")[:-1]

    def exists(uri):
        return uri[len(spelled):] in names if uri.startswith(spelled) else storage.exists(uri)

    todo, reasons, n_skipped, waiting = [], {}, 0, 0
    for s in stacks:
        prev = rows.get(s.id)
        reason = None
        if prev is None:
            reason = "new"
        else:
            fp, recipe, status, kind, error, out_uri, seq = prev
            legacy = seq is None
            if fp != (legacy_fingerprint(s) if legacy else source_fingerprint(s)):
                reason = "input changed"
            elif not legacy and opts.recipe_id is not None and recipe != opts.recipe_id:
                reason = "recipe changed"
            elif status == manifest.STATUS_OK:
                if not (out_uri and exists(out_uri)):
                    reason = "output missing"
            else:
                kind = _kind_of(kind, error)
                if kind in RETRY_ON_RERUN or opts.retry_errors:
                    reason = f"retry {kind} error"
                else:
                    waiting += 1
        if reason is None:
            n_skipped += 1
        else:
            todo.append(s)
            reasons[s.id] = reason
    return todo, reasons, n_skipped, waiting


def _child(tmp: str, n: int, what: str) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--child", tmp, str(n), what], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def planners(sizes: list[int], baseline_max: int) -> None:
    print(f"planning a rerun: plan s = best of {REPEAT}; peak = peak RSS of the planner's own process "
          "(getrusage ru_maxrss); listing s = building the planner's input (not in plan s, in the peak)")
    print(f"{'rows':>9}  {'files':>5}  {'arrow: listing s':>16}  {'plan s':>6}  {'peak MiB':>8}  "
          f"{'list: plan s':>12}  {'peak MiB':>8}  {'old: plan s':>11}  {'peak MiB':>8}  {'old/list':>8}  "
          f"{'to do':>6}  same")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="mff-bench-manifest-") as tmp:
            results = {}
            for planner in ["build", "arrow", "list", *(["old"] if n <= baseline_max else [])]:
                result = _child(tmp, n, planner)
                if planner != "build":
                    results[planner] = result
        a, b, old = results["arrow"], results["list"], results.get("old")
        same = all(r["todo"] == a["todo"] and r["reasons"] == a["reasons"] and r["skipped"] == a["skipped"]
                   for r in results.values())
        old_s, old_peak, ratio = ("-", "-", "-") if old is None else (
            f"{old['seconds']:.2f}", f"{old['peak_mib']:.0f}", f"{old['seconds'] / b['seconds']:.1f}x")
        print(f"{n:>9}  {a['files']:>5}  {a['listing_s']:>16.2f}  {a['seconds']:>6.2f}  {a['peak_mib']:>8.0f}  "
              f"{b['seconds']:>12.2f}  {b['peak_mib']:>8.0f}  {old_s:>11}  {old_peak:>8}  {ratio:>8}  "
              f"{len(a['todo']):>6}  {'yes' if same else 'NO'}", flush=True)
        if not same:
            print("  plans differ:", {k: Counter(r['reasons'].values()) for k, r in results.items()})


def end_to_end(sizes: list[int], tmp_root: str | None, find_max: int) -> None:
    from ray_mff import listing

    print("end to end, ray-mff fuse before fusing: discovery of a real INPUT tree (N folders, 2N files) + the plan "
          "against OUTPUT's N-row manifest; each path once in a fresh process; peak = its peak RSS")
    print(f"{'stacks':>9}  {'listing: discover s':>19}  {'plan s':>6}  {'total s':>7}  {'peak MiB':>8}  "
          f"{'worker MiB':>10}  {'at once MiB':>11}  {'1 process: discover s':>21}  {'peak MiB':>8}  "
          f"{'list: discover s':>16}  {'plan s':>6}  {'total s':>7}  {'peak MiB':>8}  "
          f"{'find: s':>7}  {'peak MiB':>8}  {'to do':>6}  {'list/listing':>12}  same")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="mff-bench-e2e-", dir=tmp_root) as tmp:
            _child(tmp, n, "build-e2e")
            t, one, b = (_child(tmp, n, f"e2e-{path}") for path in ("listing", "listing1", "list"))
            workers = 0 if not t["worker_peak_mib"] else listing._cores()
            f = _child(tmp, n, "e2e-find") if n <= find_max else {"discover_s": float("nan"), "peak_mib": float("nan")}
        same = all(r["todo"] == b["todo"] and r["reasons"] == b["reasons"] and r["skipped"] == b["skipped"]
                   for r in (t, one))
        print(f"{n:>9}  {t['discover_s']:>19.2f}  {t['plan_s']:>6.2f}  {t['discover_s'] + t['plan_s']:>7.2f}  "
              f"{t['peak_mib']:>8.0f}  {t['worker_peak_mib'] or float('nan'):>10.0f}  "
              f"{max(t['peak_mib'], t['discover_peak_mib'] + workers * (t['worker_peak_mib'] or 0)):>11.0f}  "
              f"{one['discover_s']:>21.2f}  {one['peak_mib']:>8.0f}  {b['discover_s']:>16.2f}  {b['plan_s']:>6.2f}  "
              f"{b['discover_s'] + b['plan_s']:>7.2f}  {b['peak_mib']:>8.0f}  {f['discover_s']:>7.2f}  "
              f"{f['peak_mib']:>8.0f}  {len(t['todo']):>6}  "
              f"{(b['discover_s'] + b['plan_s']) / (t['discover_s'] + t['plan_s']):>11.2f}x  {'yes' if same else 'NO'}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--parts", nargs="+", choices=["planners", "e2e", "first"], default=["planners", "e2e", "first"])
    ap.add_argument("--baseline-max", type=int, default=1_000_000, help="largest size the old planner runs at")
    ap.add_argument("--find-max", type=int, default=1_000_000, help="largest size fsspec's find runs at (e2e)")
    ap.add_argument("--tmp", help="where the e2e trees go (default: the system's temp folder; a tmpfs such as "
                                  "/dev/shm creates millions of files far faster)")
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "N", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        root, n, what = Path(args.child[0]), int(args.child[1]), args.child[2]
        if what == "build":
            build(root, n)
        elif what == "build-e2e":
            build_e2e(root, n)
        elif what.startswith("first-"):
            print(json.dumps(measure_first(n, what[6:])))
        elif what.startswith("e2e-"):
            print(json.dumps(measure_e2e(root, n, what[4:])))
        else:
            print(json.dumps(measure(root, n, what)))
        return
    if "planners" in args.parts:
        planners(args.sizes, args.baseline_max)
    if "e2e" in args.parts:
        end_to_end(args.sizes, args.tmp, args.find_max)
    if "first" in args.parts:
        first_run(args.sizes)


if __name__ == "__main__":
    main()
