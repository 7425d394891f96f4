"""Engine throughput: megapixels per second and peak memory of every available engine/precision.

Every (engine, precision) fuses, through :class:`ray_mff.fusion.model_fuser.ModelFuser`:

- the 20 Lytro pairs (520 x 520 colour),
- a subset of stack_v4 (1600 x 1200 colour; every ``65 // N``-th image, ``--v4-images N``,
  default 9, spanning the whole focus range), calibrated N-image fusion.

Throughput is *source* megapixels per second (H x W x N / wall time), so pairs and stacks
compare. Timing runs all configurations in one process, *interleaved* stack by stack, for
``--rounds`` rounds, keeping each stack's best time: on a shared machine the load changes by the
minute, and interleaving exposes every engine to the same load (the ratio against torch eager,
the reference, comes from the same run). Peak resident memory (VmHWM) is measured
separately, one subprocess per configuration running the same workload, so it is its own.

    .venv/bin/python bench/engines.py                 # all engines available here
    .venv/bin/python bench/engines.py --lytro-pairs 5 --v4-images 5 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"

CONFIGS = [("torch", "fp32"), ("onnx", "fp32"), ("onnx", "fp16"), ("tensorrt", "fp32"), ("tensorrt", "fp16")]


def _load(lytro_pairs: int, v4_images: int):
    from ray_mff import io

    sets = {}
    lytro = sorted((DATA / "lytro").glob("lytro_*_A.png"))[:lytro_pairs]
    if lytro:
        sets["lytro"] = [[io.read_image(str(a)), io.read_image(str(a).replace("_A.", "_B."))] for a in lytro]
    v4 = sorted((DATA / "stack_v4").glob("V*.jpg"))
    if v4 and v4_images >= 2:
        step = max(1, len(v4) // v4_images)
        sets["stack_v4"] = [[io.read_image(str(p)) for p in v4[::step][:v4_images]]]
    return sets


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries a forking
    parent's high-water mark into the child, so a child of a big parent would report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(engine: str, precision: str, model: str, lytro_pairs: int, v4_images: int, threads: int | None) -> dict:
    """Run in a subprocess: build the engine, fuse every set, report timings and peak RSS."""
    import torch

    from ray_mff.engines import make_engine
    from ray_mff.fusion.model_fuser import ModelFuser
    from ray_mff.models import default_weights_path, get_model

    if threads:
        torch.set_num_threads(threads)
    weights = "default" if default_weights_path(model).is_file() else None
    torch.manual_seed(0)
    net = get_model(model, weights=weights)
    sets = _load(lytro_pairs, v4_images)
    rss_data = peak_rss_mb()
    t0 = time.perf_counter()
    eng = make_engine(model, engine=engine, precision=precision, model=net, threads=threads)
    setup = time.perf_counter() - t0
    fuser = ModelFuser(eng)
    first = next(iter(sets.values()))[0]
    fuser.fuse([img[:128, :128] for img in first])  # warm-up (allocators, lazy kernels)
    out = {"engine": eng.name, "precision": eng.precision, "weights": "shipped" if weights else "random",
           "setup_s": setup, "rss_after_load_mb": rss_data, "sets": {}}
    for name, stacks in sets.items():
        t = time.perf_counter()
        mp = 0.0
        for images in stacks:
            fuser.fuse(images)
            h, w = images[0].shape[:2]
            mp += h * w * len(images) / 1e6
        out["sets"][name] = {"seconds": time.perf_counter() - t, "source_mp": mp, "stacks": len(stacks),
                             "n": len(stacks[0]), "shape": list(stacks[0][0].shape)}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def interleaved_timing(configs, args) -> dict:
    """All configurations in this process; per round, every stack is fused by each engine in turn;
    each stack's best time over the rounds counts."""
    import torch

    from ray_mff.engines import make_engine
    from ray_mff.fusion.model_fuser import ModelFuser
    from ray_mff.models import default_weights_path, get_model

    if args.threads:
        torch.set_num_threads(args.threads)
    weights = "default" if default_weights_path(args.model).is_file() else None
    torch.manual_seed(0)
    net = get_model(args.model, weights=weights)
    sets = _load(args.lytro_pairs, args.v4_images)
    fusers = {}
    for eng, prec in configs:
        fusers[(eng, prec)] = ModelFuser(make_engine(args.model, engine=eng, precision=prec, model=net,
                                                     threads=args.threads))
        first = next(iter(sets.values()))[0]
        fusers[(eng, prec)].fuse([img[:128, :128] for img in first])  # warm-up
    times = {(c, name, i): float("inf") for c in fusers for name, st in sets.items() for i in range(len(st))}
    for r in range(args.rounds):
        for name, stacks in sets.items():
            for i, images in enumerate(stacks):
                for c, fuser in fusers.items():
                    t0 = time.perf_counter()
                    fuser.fuse(images)
                    times[(c, name, i)] = min(times[(c, name, i)], time.perf_counter() - t0)
        print(f"timing round {r + 1} done", file=sys.stderr)
    out = {}
    for c, fuser in fusers.items():
        rec = {"engine": fuser.engine.name, "precision": fuser.engine.precision,
               "weights": "shipped" if weights else "random", "sets": {}}
        for name, stacks in sets.items():
            secs = sum(times[(c, name, i)] for i in range(len(stacks)))
            mp = sum(s[0].shape[0] * s[0].shape[1] * len(s) / 1e6 for s in stacks)
            rec["sets"][name] = {"seconds": secs, "source_mp": mp, "stacks": len(stacks), "n": len(stacks[0])}
        out[c] = rec
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cascade")
    p.add_argument("--lytro-pairs", type=int, default=20)
    p.add_argument("--v4-images", type=int, default=9)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every engine (default: all CPUs)")
    p.add_argument("--configs", default=None, help="comma list like torch:fp32,onnx:fp32 (default: all available)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(*args.worker, args.model, args.lytro_pairs, args.v4_images, args.threads)))
        return 0
    if not DATA.is_dir():
        print(f"{DATA} is not present: nothing to benchmark")
        return 1

    from ray_mff.engines import probe_environment, select_engine
    from ray_mff.errors import EngineUnavailableError

    env = probe_environment()
    configs = CONFIGS if not args.configs else [tuple(c.split(":")) for c in args.configs.split(",")]
    runnable, skipped = [], []
    for eng, prec in configs:
        try:
            select_engine(eng, env)
            runnable.append((eng, prec))
        except EngineUnavailableError as err:
            skipped.append(f"{eng} {prec}: {err}")
    peaks = {}
    if not args.no_memory:  # first, while this process is small
        for eng, prec in runnable:
            cmd = [sys.executable, __file__, "--worker", eng, prec, "--model", args.model,
                   "--lytro-pairs", str(args.lytro_pairs), "--v4-images", str(args.v4_images)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if res.returncode != 0:
                skipped.append(f"{eng} {prec}: memory run failed: {res.stderr.strip().splitlines()[-1:]}")
                continue
            peaks[(eng, prec)] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            print(f"memory: {eng} {prec} done", file=sys.stderr)
    best = interleaved_timing(runnable, args)
    for c, rec in best.items():
        rec["peak_rss_mb"] = peaks.get(c)

    torch_ref = best.get(("torch", "fp32"))
    rows = []
    for (eng, prec), rec in best.items():
        for name, s in rec["sets"].items():
            mps = s["source_mp"] / s["seconds"]
            ratio = None
            if torch_ref and name in torch_ref["sets"]:
                t = torch_ref["sets"][name]
                ratio = mps / (t["source_mp"] / t["seconds"])
            rows.append((rec["engine"], prec, name, f"{s['stacks']}x{s['n']}", mps, ratio, rec.get("peak_rss_mb")))
    any_rec = next(iter(best.values()), None)
    print(f"model {args.model} ({any_rec['weights'] if any_rec else '?'} weights), {os.cpu_count()} CPUs, "
          f"threads {args.threads or 'all'}, best of {args.rounds} round(s)")
    header = ("engine", "precision", "data", "stacks x n", "source MP/s", "vs torch", "peak RSS MB")
    print("  ".join(f"{h:>12s}" for h in header))
    for e, pr, name, sn, mps, ratio, rss in rows:
        print("  ".join([f"{e:>12s}", f"{pr:>12s}", f"{name:>12s}", f"{sn:>12s}", f"{mps:12.3f}",
                         f"{'-' if ratio is None else f'{ratio:.2f}x':>12s}", f"{'-' if rss is None else f'{rss:.0f}':>12s}"]))
    for s in skipped:
        print(f"skipped {s}")
    if torch_ref and ("onnx", "fp32") in best:
        ratios = [r[5] for r in rows if r[0].startswith("onnxruntime") and r[1] == "fp32" and r[5]]
        verdict = "OK" if min(ratios) >= 1.5 else "BELOW 1.5x"
        print(f"ONNX Runtime fp32 vs torch eager: {', '.join(f'{x:.2f}x' for x in ratios)} ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
