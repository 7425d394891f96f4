"""Planning a rerun against a big manifest: time and peak memory at 10k, 100k and 1M rows.

For each size N, in a fresh subprocess (so peak RSS is that size's own):

- OUTPUT holds N fused images (empty files: only their names matter to planning) and a manifest
  shaped as a long-lived archive's is: one compacted generation file with N-k rows plus k part
  files of 32 rows (the last runs' flushes; k = 32);
- INPUT is N stacks (Stack objects with sizes and versions, as discovery gives them), all done;
- timed: ``runner.plan_stacks`` (read the manifest's plan columns through pyarrow.dataset, newest
  row per stack, one names-only listing of OUTPUT, the per-stack decision), and peak RSS of the
  measuring process (built in another one), next to the RSS of the N Stack objects alone
  ("stacks MiB": what discovery hands any planner).

Baseline in the same run: the previous planner's way of reading (every part opened one at a time,
rows into Python dicts, newest-row loop) on the same manifest, at the sizes it finishes in
reasonable time. Prints one table; ``--sizes`` to choose sizes.

    .venv/bin/python bench/manifest.py [--sizes 10000 100000 1000000]
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PART_ROWS, RECENT_PARTS = 32, 32


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(root: Path, n: int) -> None:
    """OUTPUT with n empty images and a compacted manifest plus RECENT_PARTS recent parts."""
    import datetime as dt

    import pyarrow.parquet as pq

    from ray_mff import manifest

    out = root / "out"
    out.mkdir(parents=True)
    for i in range(n):
        (out / f"s{i:07d}.png").touch()
    recent = min(n // 2, RECENT_PARTS * PART_ROWS)
    now = dt.datetime.now(dt.timezone.utc)

    def rows(lo, hi):
        return [{"run_id": "r0", "stack_id": f"s{i:07d}", "source_uris": [f"/in/s{i:07d}/a.png", f"/in/s{i:07d}/b.png"],
                 "source_fingerprint": fingerprint(i), "output_uri": str(out / f"s{i:07d}.png"),
                 "status": "ok", "method": "guided", "seconds": 0.1, "finished_at": now, "recipe_id": "recipe",
                 "seq": i, "n_images": 2} for i in range(lo, hi)]

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


def fingerprint(i: int) -> str:
    from ray_mff.runner import source_fingerprint

    return source_fingerprint(stack(i))


def stack(i: int):
    from ray_mff.stacks import Stack

    return Stack(f"s{i:07d}", (f"/in/s{i:07d}/a.png", f"/in/s{i:07d}/b.png"),
                 {"sizes": (1000, 1000), "versions": ("1", "2")})


def measure(root: Path, n: int, baseline: bool) -> dict:
    from ray_mff import manifest
    from ray_mff.runner import RunOptions, plan_stacks

    stacks = [stack(i) for i in range(n)]  # what discovery hands the planner
    before = _rss_mib()
    t0 = time.perf_counter()
    plan = plan_stacks(stacks, str(root / "out"), RunOptions(recipe_id="recipe"))
    seconds = time.perf_counter() - t0
    assert not plan.todo and len(plan.skipped) == n, (len(plan.todo), plan.counts())
    result = {"n": n, "seconds": seconds, "peak_mib": _rss_mib(), "added_mib": _rss_mib() - before,
              "files": len(manifest._files(str(root / "out"))[1])}
    if baseline:
        t0 = time.perf_counter()
        old_latest(str(root / "out"))
        result["old_seconds"] = time.perf_counter() - t0
    return result


def old_latest(output_root: str) -> dict:
    """The previous reader: each part file opened in turn, every row into a Python dict."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_mff import manifest, storage

    fs, path = storage.resolve(manifest.manifest_uri(output_root))
    tables = []
    for p in sorted(p for p in fs.find(path) if p.endswith(".parquet")):
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f).cast(manifest.SCHEMA))
    latest: dict = {}
    for row in pa.concat_tables(tables).to_pylist():
        key = (row["finished_at"] or 0, row["run_id"] or "")
        prev = latest.get(row["stack_id"])
        if prev is None or key >= (prev["finished_at"] or 0, prev["run_id"] or ""):
            latest[row["stack_id"]] = row
    return latest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--baseline-max", type=int, default=100_000, help="largest size the old reader is timed at")
    ap.add_argument("--child", nargs=2, metavar=("ROOT", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        root, n = Path(args.child[0]), int(args.child[1])
        if not (root / "out").exists():
            build(root, n)
            return
        print(json.dumps(measure(root, n, n <= args.baseline_max)))
        return
    print(f"{'rows':>9}  {'files':>5}  {'plan s':>7}  {'stacks MiB':>10}  {'peak RSS MiB':>12}  {'old reader s':>12}  "
          f"{'speed-up':>8}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="mff-bench-manifest-") as tmp:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            cmd = [sys.executable, __file__, "--child", tmp, str(n), "--baseline-max", str(args.baseline_max)]
            subprocess.run(cmd, env=env, check=True)  # build, in its own process
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # measure
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(proc.returncode)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        old = r.get("old_seconds")
        old_s = f"{old:.2f}" if old else "-"
        ratio = f"{old / r['seconds']:.1f}x" if old else "-"
        print(f"{r['n']:>9}  {r['files']:>5}  {r['seconds']:>7.2f}  {r['peak_mib'] - r['added_mib']:>10.0f}  "
              f"{r['peak_mib']:>12.0f}  {old_s:>12}  {ratio:>8}")


if __name__ == "__main__":
    main()
