"""Speed bar of issue 13: a stack-native model against ``guided`` in the same run, --no-metrics.

Times fusion only (no scores), each method in its own fresh process so its peak resident memory
is its own: the BSDS500-val pairs of ``bench/ground_truth.py`` (rendered the same way, same seeds)
and a subset (or all) of ``stack_v4`` (65 x 1600x1200). Prints seconds per pair, seconds per
stack, each method's speed relative to ``guided`` (guided's time / the method's time; the bar is
>= 0.5), peak RSS, and FLOPs per input pixel for learned models (torch's FlopCounterMode). Runs
alternate between methods (``--repeat`` rounds, best time kept) so a busy machine slows all alike.

    .venv/bin/python bench/stacknet_speed.py                                   # 24 pairs, 8 planes
    .venv/bin/python bench/stacknet_speed.py --planes 65 --weights stacknet=/tmp/sn.safetensors
    .venv/bin/python bench/stacknet_speed.py --methods stacknet,stacknet_s,guided --weights stacknet_s=none
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ground_truth import DEFAULT_IMAGES  # noqa: E402
from report_table import format_table  # noqa: E402

STACK_V4 = REPO.parent / "shared" / "data" / "stack_v4"


def _load(kind: str, count: int) -> list[list]:
    """The stacks to fuse: ``pairs`` (ground_truth.py's N = 2 renders) or ``stack_v4`` (one stack)."""
    from ray_mff import io
    from ray_mff.synthetic import render_focus_stack

    if kind == "pairs":
        files = sorted(x for x in DEFAULT_IMAGES.iterdir() if x.suffix.lower() in (".jpg", ".png"))[:count]
        return [render_focus_stack(io.read_image(str(p)), 2, seed=2000 + i, psf="disk", max_radius=8.0,
                                   noise_sigma=0.004)[0] for i, p in enumerate(files)]
    files = sorted(STACK_V4.glob("V*.jpg"))
    step = max(1, len(files) // count)
    return [[io.read_image(str(p)) for p in files[::step][:count]]]


def _measure(method: str, weights: str | None, engine: str, kind: str, count: int, queue) -> None:
    """In a fresh process: build the fuser, warm it up on a pair, time every stack; report
    (seconds, peak RSS in bytes) on ``queue``."""
    import resource

    from ray_mff.methods import get_fuser

    opts = {} if weights is None else {"weights": None if weights == "none" else weights}
    fuser = get_fuser(method, engine=engine, **opts)
    stacks = _load(kind, count)
    fuser.fuse(stacks[0][:2])  # warm-up: sessions, exports, caches are not the method's speed
    t0 = time.perf_counter()
    for stack in stacks:
        fuser.fuse(stack)
    seconds = time.perf_counter() - t0
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def run_isolated(method: str, weights: str | None, engine: str, kind: str, count: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, weights, engine, kind, count, queue))
    proc.start()
    while True:  # a child that dies without reporting must not hang the bench
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty
            if not proc.is_alive():
                raise RuntimeError(f"{method} on {kind}: the measuring process exited with {proc.exitcode}")
    proc.join()
    return result


def flops(method: str) -> float | None:
    """FLOPs per input pixel of a stack-native model (N = 2), None for other methods."""
    from ray_mff.models import build_model, list_models

    if method not in list_models():
        return None
    net = build_model(method)
    if not hasattr(net, "decide_stack"):
        return None
    from ray_mff.models.stacknet import flops_per_pixel

    return flops_per_pixel(net, n=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="stacknet,guided", help="comma list; guided is the baseline (added)")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                   help="weights of a learned method (PATH 'none' = random init: speed only); repeatable")
    p.add_argument("--engine", default="onnx")
    p.add_argument("--images", type=int, default=24, help="BSDS500 val pairs (0 = none)")
    p.add_argument("--planes", type=int, default=8, help="stack_v4 planes, evenly spaced (65 = all, 0 = none)")
    p.add_argument("--repeat", type=int, default=2, help="alternating rounds; the best time is kept")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m != "guided"] + ["guided"]
    weights = dict(w.split("=", 1) for w in args.weights)
    work = []
    if args.images > 0:
        if not DEFAULT_IMAGES.is_dir():
            print(f"bench/stacknet_speed.py: {DEFAULT_IMAGES} not found", file=sys.stderr)
            return 2
        work.append(("pairs", args.images))
    if args.planes > 0:
        if not STACK_V4.is_dir():
            print(f"bench/stacknet_speed.py: {STACK_V4} not found", file=sys.stderr)
            return 2
        work.append(("stack_v4", args.planes))
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for kind, count in work:
        for _ in range(max(1, args.repeat)):
            for m in methods:
                sec, rss = run_isolated(m, weights.get(m), args.engine, kind, count)
                print(f"  {m} on {kind} x{count}: {sec:.2f} s, peak RSS {rss / 1e9:.2f} GB", file=sys.stderr,
                      flush=True)
                old = best.get((m, kind))
                best[(m, kind)] = (min(sec, old[0]) if old else sec, max(rss, old[1]) if old else rss)
    head = ["method", "kFLOP/px", "work", "s per stack", "speed vs guided", "peak RSS GB"]
    lines = []
    for kind, count in work:
        label = f"{count} BSDS pairs" if kind == "pairs" else f"stack_v4 {count} planes"
        base = best[("guided", kind)][0]
        for m in methods:
            sec, rss = best[(m, kind)]
            f = flops(m)
            per_stack = sec / (count if kind == "pairs" else 1)
            lines.append([m, "-" if f is None else f"{f / 1e3:.1f}", label, f"{per_stack:.3f}", f"{base / sec:.2f}x",
                          f"{rss / 1e9:.2f}"])
    print(f"speed, engine {args.engine}, fusion only (no metrics), best of {args.repeat} alternating rounds")
    print(format_table(head, lines, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
