"""Ray Data pipeline vs a plain loop over the same method, and the pipeline's memory as stacks grow.

    .venv/bin/python bench/pipeline.py                               # guided: 200 stacks, then 2000 for memory
    .venv/bin/python bench/pipeline.py --method cascade --stacks 60 --scale 1   # the default model (ONNX Runtime)

``guided`` is the default here so that the 2000-stack memory run takes minutes on two cores;
the learned default model (``cascade``) is ~10x slower per stack on CPU, so measure it with
``--scale 1`` (throughput only).

Synthetic 8-bit RGB pairs (``ray_mff.synthetic.render_focus_stack``, 256 x 256 by default) in
local folders, one folder per stack. A few distinct stacks are rendered and the rest are hard links
to them: the work per stack is the same, and making 2000 stacks takes seconds.

Rows of the table:

- ``loop``: :func:`ray_mff.runner.run_local` in this process: one fuser, stacks one after another.
- ``pipeline``: :func:`ray_mff.pipeline.run_pipeline` on a local Ray instance using every CPU
  (one fusion actor per CPU). Timed from the call to the last manifest row, so it includes actor
  start-up and engine loading; Ray's own start-up (``ray.init``) is not included, as a cluster is
  already up when a job is submitted.
- ``pipeline xK``: the same with K times more stacks, for peak memory only.

Both executors do the same work per stack (:func:`ray_mff.runner.process_stack`: read, fuse, write,
score). ``MP/s`` counts source megapixels (every image of every stack). Peak RSS is the sum over
this process and all its descendants (Ray's GCS, raylet, workers), sampled every 50 ms from /proc (Linux); the
acceptance checks are pipeline/loop >= 0.7 in stacks/s and peak-RSS growth <= 1.3 for K = 10.

``--simulate-gpu-ms MS`` measures instead whether the pipeline keeps a GPU busy, on a machine with
none: ``ray.init(num_gpus=1)`` declares one, and a stand-in engine claims it and only sleeps MS per
stack (no CPU). The Lytro pairs (``../shared/data/lytro``, at least 64 stacks: hard links
to the 20 pairs) are fused by the *staged* pipeline (CPU read tasks -> the GPU actor -> CPU
write/score tasks) and by the *single-actor* design (one GPU actor reads, fuses, writes and scores
each stack), metrics on. Engine busy = seconds spent in the stand-in / the actor's wall time from
its first batch to its last. The last line is ``engine_busy=<fraction>`` for the staged design::

    .venv/bin/python bench/pipeline.py --simulate-gpu-ms 100          # target: engine_busy >= 0.8
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_mff import io  # noqa: E402
from ray_mff.methods import default_method, get_fuser  # noqa: E402
from ray_mff.runner import RunOptions, run_local  # noqa: E402
from ray_mff.stacks import discover_stacks  # noqa: E402
from ray_mff.synthetic import render_focus_stack  # noqa: E402

DISTINCT = 16  # rendered stacks; the others are hard links to these


def make_archive(root: Path, n_stacks: int, size: int) -> None:
    """``n_stacks`` folders ``s00000/ {a,b}.png`` under ``root`` (hard links after the first 16)."""
    import cv2

    originals = []
    for i in range(min(DISTINCT, n_stacks)):
        rng = np.random.default_rng(i)
        picture = cv2.resize(rng.random((size // 8, size // 8, 3)), (size, size), interpolation=cv2.INTER_CUBIC)
        picture = np.clip(picture + 0.1 * rng.random((size, size, 3)), 0, 1)
        stack, _, _ = render_focus_stack(picture, 2, seed=i, dtype=np.uint8)
        folder = root / f"s{i:05d}"
        for name, img in zip("ab", stack):
            io.write_image(str(folder / f"{name}.png"), img)
        originals.append(folder)
    for i in range(len(originals), n_stacks):
        folder = root / f"s{i:05d}"
        folder.mkdir(parents=True)
        for name in "ab":
            os.link(originals[i % len(originals)] / f"{name}.png", folder / f"{name}.png")


def _process_tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants, from /proc (Linux)."""
    parent_of, rss = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent_of[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, ppid in parent_of.items() if ppid == parent and pid not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(rss.get(pid, 0) for pid in tree)


class PeakRSS:
    """Peak of the summed RSS of this process and every descendant, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _process_tree_rss(os.getpid()))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn):
    t0 = time.perf_counter()
    summary = fn()
    return summary, time.perf_counter() - t0


# --------------------------------------------------------------------------- --simulate-gpu-ms


class SleepingEngineFuser:
    """Stand-in for a GPU engine: claims the GPU (the actor's num_gpus=1), sleeps ``ms`` per stack,
    returns the first source as the fused image. No CPU work, so the GPU's busy fraction is only a
    question of how fast the other stages feed it."""

    name = "gpu-standin"

    def __init__(self, ms: float):
        self.seconds = ms / 1000.0

    def fuse(self, images):
        from ray_mff.fusion.result import FusionResult

        time.sleep(self.seconds)
        return FusionResult(images[0], None, self.name, {"engine": "sleep", "precision": "-"})


def _standin_factory(ms: float):
    return lambda: SleepingEngineFuser(ms)


def lytro_archive(root: Path, lytro: Path, n_stacks: int) -> None:
    """``n_stacks`` folders of hard links to the Lytro pairs (cycling through the 20)."""
    pairs = sorted(lytro.glob("lytro_*_A.png"))
    if not pairs:
        raise SystemExit(f"no Lytro pairs under {lytro}")
    for i in range(n_stacks):
        a = pairs[i % len(pairs)]
        folder = root / f"s{i:05d}"
        folder.mkdir(parents=True)
        os.link(a, folder / "a.png")
        os.link(a.with_name(a.name.replace("_A.png", "_B.png")), folder / "b.png")


def simulate_gpu(args) -> int:
    import ray

    from ray_mff.pipeline import run_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="ray-mff-bench-gpu-"))
    results = []
    try:
        lytro_archive(tmp / "in", Path(args.lytro), args.stacks)
        stacks = discover_stacks(str(tmp / "in"))
        ray.init(num_cpus=args.cpus, num_gpus=1, include_dashboard=False, log_to_driver=False)
        for design in ("single", "staged"):
            t0 = time.perf_counter()
            summary = run_pipeline(stacks, {"name": "guided"}, str(tmp / f"out-{design}"), RunOptions(),
                                   design=design, fuser_factory=_standin_factory(args.simulate_gpu_ms),
                                   num_gpus_per_actor=1, max_actors=1)
            wall = time.perf_counter() - t0
            assert summary.fused == len(stacks) and not summary.failed, summary.rows[:1]
            stages = {k: np.mean([r[k] or 0.0 for r in summary.rows]) * 1000
                      for k in ("read_s", "fuse_s", "write_s", "score_s")}
            results.append((design, len(stacks), wall, summary.engine_busy, stages))
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nstand-in GPU engine sleeping {args.simulate_gpu_ms:g} ms per stack; {args.stacks} Lytro pairs "
          f"(520x520 RGB), metrics on; Ray: {args.cpus} CPUs + 1 GPU; {os.cpu_count()} cores on this machine "
          f"(load average now {os.getloadavg()[0]:.1f})")
    header = (f"{'design':<8}{'stacks':>7}{'seconds':>9}{'stacks/s':>10}{'read ms':>9}{'fuse ms':>9}"
              f"{'write ms':>10}{'score ms':>10}{'engine busy':>13}")
    print(header)
    print("-" * len(header))
    for design, n, wall, busy, st in results:
        print(f"{design:<8}{n:>7}{wall:>9.1f}{n / wall:>10.2f}{st['read_s']:>9.1f}{st['fuse_s']:>9.1f}"
              f"{st['write_s']:>10.1f}{st['score_s']:>10.1f}{busy:>13.2f}")
    single, staged = results[0][3], results[1][3]
    print(f"staged vs single actor: engine busy {staged:.2f} vs {single:.2f} (target >= 0.80 for staged)")
    print(f"engine_busy={staged:.3f}")
    return 0 if staged >= 0.8 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="guided", help=f"fusion method (default: guided; ray-mff's default is {default_method()})")
    p.add_argument("--stacks", type=int, default=200)
    p.add_argument("--scale", type=int, default=10, help="memory run: this many times more stacks (1 = skip)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for the local Ray instance")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--simulate-gpu-ms", type=float, default=None,
                   help="staged vs single-actor pipeline with a stand-in GPU engine sleeping MS per stack")
    p.add_argument("--lytro", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "lytro"),
                   help="--simulate-gpu-ms: folder of lytro_NN_A/B.png pairs")
    args = p.parse_args(argv)
    if args.simulate_gpu_ms is not None:
        args.stacks = max(args.stacks if "--stacks" in (argv or sys.argv) else 64, 64)
        return simulate_gpu(args)
    method = args.method
    spec = {"name": method}
    tmp = Path(tempfile.mkdtemp(prefix="ray-mff-bench-"))
    rows = []
    try:
        make_archive(tmp / "small", args.stacks, args.size)
        small = discover_stacks(str(tmp / "small"))
        mp = len(small) * 2 * args.size * args.size / 1e6

        fuser = get_fuser(**spec)
        with PeakRSS() as mem:
            loop, t_loop = timed(lambda: run_local(small, fuser, str(tmp / "out-loop"), RunOptions(), progress=False))
        assert loop.fused == len(small), loop.rows[:1]
        rows.append(("loop", len(small), t_loop, mp, mem.peak))

        import ray

        from ray_mff.pipeline import run_pipeline

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        with PeakRSS() as mem:
            pipe, t_pipe = timed(lambda: run_pipeline(small, spec, str(tmp / "out-pipe"), RunOptions()))
        assert pipe.fused == len(small), pipe.rows[:1]
        rows.append(("pipeline", len(small), t_pipe, mp, mem.peak))
        peak_small = mem.peak

        if args.scale > 1:
            n_big = args.stacks * args.scale
            make_archive(tmp / "big", n_big, args.size)
            big = discover_stacks(str(tmp / "big"))
            with PeakRSS() as mem:
                pipe_big, t_big = timed(lambda: run_pipeline(big, spec, str(tmp / "out-big"), RunOptions()))
            assert pipe_big.fused == n_big
            rows.append((f"pipeline x{args.scale}", n_big, t_big, n_big * 2 * args.size * args.size / 1e6, mem.peak))
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmethod {method}, {args.size}x{args.size} RGB pairs, {args.cpus} CPUs for Ray, "
          f"{os.cpu_count()} cores on this machine (load average now {os.getloadavg()[0]:.1f})")
    header = f"{'executor':<14}{'stacks':>7}{'seconds':>9}{'stacks/s':>10}{'MP/s':>8}{'vs loop':>9}{'peak RSS MB':>13}{'RSS growth':>12}"
    print(header)
    print("-" * len(header))
    loop_rate = rows[0][1] / rows[0][2]
    for name, n, secs, mpix, peak in rows:
        rate = n / secs
        growth = f"{peak / peak_small:.2f}x" if name.startswith("pipeline x") else "-"
        print(f"{name:<14}{n:>7}{secs:>9.1f}{rate:>10.1f}{mpix / secs:>8.1f}{rate / loop_rate:>8.2f}x"
              f"{peak / 2**20:>13.0f}{growth:>12}")
    ratio = (rows[1][1] / rows[1][2]) / loop_rate
    ok = ratio >= 0.7 and all(r[4] / peak_small <= 1.3 for r in rows[2:])
    print(f"pipeline/loop {ratio:.2f}x (target >= 0.70)"
          + (f"; peak RSS growth {rows[2][4] / peak_small:.2f}x for {args.scale}x stacks (target <= 1.30)" if len(rows) > 2 else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
