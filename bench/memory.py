"""Peak memory against stack depth and plane size: planes stream through fusion.

A single-file z-stack (ImageJ hyperstack, uint16, ``ZYX``) is generated page by page into a
temporary folder, then read, fused and written by :func:`ray_mff.runner.process_stack` (the unit
of work of every run; metrics off, since they compare the fused image with every source) in a
fresh subprocess per configuration, whose peak resident memory (VmHWM) is reported. The planes
are a lazy sequence (:mod:`ray_mff.planes`) and ``guided`` and the default model's calibration
fold over them, so the peak should not grow with the number of planes.

Depth sweep: 10, 40, 100 planes of 2048 x 2048 (``--quick``: 512 x 512); size sweep: 10 planes
of 512, 1024, 2048 px (``--quick``: 256, 512); for ``guided`` and the default model. Acceptance:
peak at 100 planes <= 1.25 x peak at 10 planes, per method.

    .venv/bin/python bench/memory.py            # ~40 min on 2 CPU cores (the default model dominates)
    .venv/bin/python bench/memory.py --quick    # ~3 min
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 1 << 20


def vm(field: str) -> int:
    """A VmXXX line of /proc/self/status, in bytes (VmHWM: peak resident; VmRSS: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def write_stack(path: Path, n: int, size: int, seed: int = 0) -> None:
    """An n x size x size uint16 ImageJ z-stack, generated and written one page at a time.

    Texture: smooth shapes plus fine noise; plane k is sharp where the scene's depth (a smooth
    ramp across the image) rounds to k and Gaussian-defocused (sigma 3) elsewhere."""
    import cv2
    import tifffile

    rng = np.random.default_rng(seed)
    low = rng.random((size // 32 + 2, size // 32 + 2)).astype(np.float32)
    coarse = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    sharp = np.clip(coarse * 0.7 + rng.random((size, size), dtype=np.float32) * 0.3, 0, 1)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    depth = np.rint((xx + yy) / (2 * size - 2) * (n - 1)).astype(np.int32)
    del yy, xx, coarse

    def planes():
        for k in range(n):
            yield np.rint(np.where(depth == k, sharp, blurred) * 65535).astype(np.uint16)

    tifffile.imwrite(path, data=planes(), shape=(n, size, size), dtype=np.uint16, imagej=True,
                     metadata={"axes": "ZYX", "spacing": 1.0, "unit": "um"})


def child(method: str, stack_path: str, out_dir: str) -> dict:
    """Runs in a fresh process: build the fuser, fuse one single-file stack; peak and baseline RSS."""
    from ray_mff.methods import get_fuser
    from ray_mff.runner import RunOptions, process_stack
    from ray_mff.stacks import Stack

    fuser = get_fuser(method)
    baseline = vm("VmRSS")  # libraries and the model loaded, no stack yet
    t0 = time.perf_counter()
    row = process_stack(Stack("bench", (stack_path,), {}), fuser, out_dir, RunOptions(compute_metrics=False))
    if row["status"] != "ok":
        raise SystemExit(f"fusion failed: {row['error']}")
    return {"peak": vm("VmHWM"), "baseline": baseline, "seconds": time.perf_counter() - t0,
            "n": row["n_images"], "size": row["width"]}


def measure(method: str, n: int, size: int, tmp: Path) -> dict:
    path = tmp / f"stack_{n}_{size}.tif"
    if not path.exists():
        write_stack(path, n, size)
    out = tmp / "out"
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(path), str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{method} n={n} size={size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="512 px planes for the depth sweep, 256/512 for sizes")
    p.add_argument("--methods", default=None, help="comma-separated (default: guided and the default model)")
    p.add_argument("--size", type=int, default=None, help="plane side of the depth sweep (default 2048; quick 512)")
    p.add_argument("--sizes", default=None, help="comma-separated plane sides of the size sweep at 10 planes")
    p.add_argument("--child", nargs=3, metavar=("METHOD", "STACK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    from ray_mff.methods import default_method

    methods = args.methods.split(",") if args.methods else ["guided", default_method()]
    depth_size = args.size or (512 if args.quick else 2048)
    depths = (10, 40, 100)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (256, 512) if args.quick \
        else (512, 1024, 2048)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-mff-memory-") as tmp:
        tmp = Path(tmp)
        configs = [(n, depth_size) for n in depths] + [(10, s) for s in sizes if s != depth_size]
        for n, size in configs:
            for method in methods:
                r = measure(method, n, size, tmp)
                rows.append({"method": method, **r})
                print(f"  {method} {n} x {size}^2: peak {r['peak'] / MIB:.0f} MiB "
                      f"(baseline {r['baseline'] / MIB:.0f}), {r['seconds']:.1f} s", file=sys.stderr, flush=True)
            for f in tmp.glob(f"stack_{n}_{size}.tif"):
                f.unlink()
    print(f"{'method':<10} {'planes':>6} {'plane':>11} {'stack MiB':>9} {'peak MiB':>9} {'- baseline':>10} "
          f"{'x peak@10':>9} {'sec':>7}")
    ok = True
    for r in rows:
        ref = next(x for x in rows if x["method"] == r["method"] and x["n"] == 10 and x["size"] == r["size"])
        ratio = r["peak"] / ref["peak"]
        stack_mib = r["n"] * r["size"] ** 2 * 2 / MIB
        print(f"{r['method']:<10} {r['n']:>6} {r['size']:>5}x{r['size']:<5} {stack_mib:>9.0f} {r['peak'] / MIB:>9.0f} "
              f"{(r['peak'] - r['baseline']) / MIB:>10.0f} {ratio:>9.2f} {r['seconds']:>7.1f}")
        if r["n"] == 100:
            ok &= ratio <= 1.25
    print(f"acceptance (peak at 100 planes <= 1.25 x peak at 10, per method): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
