"""Build (and check) TensorRT engines for a ray-mff model on an NVIDIA GPU node.

    python trt/build_engine.py --model cascade --precision fp16 --out engines/cascade-fp16
    python trt/build_engine.py --model cascade --precision fp32 --out engines/cascade-fp32 --check

Exports the ONNX graph TensorRT needs for the precision (fp32 graph + BuilderFlag.FP16 on
TensorRT 10; the fp16 graph in a strongly typed network on TensorRT 11), builds
``encoder.plan`` and ``decider.plan`` with one optimisation profile (``--min/--opt/--max`` image
shapes, ``--max-batch``), a workspace limit and a timing cache, and writes ``plans.json`` with
the facts the plans depend on. ``--check`` then runs both plans with ``execute_async_v3`` against
ONNX Runtime on random and real inputs and prints the max abs differences. See trt/README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _hw(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def check(out: Path, facts: dict, precision: str, tolerance: float) -> int:
    """Compare the plans with ONNX Runtime (CPU, same graphs) on a random and a real pair."""
    import numpy as np

    from ray_mff.engines.onnx_engine import OnnxEngine
    from ray_mff.engines.tensorrt_engine import TensorRTEngine
    from ray_mff.export import defocus_pair

    onnx = facts["onnx"]
    ort_eng = OnnxEngine(onnx["encoder"]["path"], onnx["decider"]["path"], precision=facts["mode"]["onnx_precision"],
                         stride=facts["stride"], providers=["CPUExecutionProvider"])
    trt_eng = TensorRTEngine(out / "encoder.plan", out / "decider.plan", precision=precision, stride=facts["stride"])
    rng = np.random.default_rng(0)
    h, w = facts["profile"]["opt_hw"]
    pairs = {"random": (rng.random((h, w), dtype=np.float32), rng.random((h, w), dtype=np.float32)),
             "real": defocus_pair(512)}
    worst = 0.0
    for kind, (ya, yb) in pairs.items():
        y = np.stack([ya, yb])[:, None].astype(np.float32)
        fo, ft = ort_eng.encode(y), trt_eng.encode(y)
        d_ort = ort_eng.decide(fo[:1], fo[1:], y[:1], y[1:])
        d_trt = trt_eng.decide(ft[:1], ft[1:], y[:1], y[1:])
        t0 = time.perf_counter()
        for _ in range(10):
            trt_eng.decide(ft[:1], ft[1:], y[:1], y[1:])
        ms = (time.perf_counter() - t0) * 100
        diff = float(np.abs(d_trt - d_ort).max())
        worst = max(worst, diff)
        print(f"check {kind:6s} {y.shape[-2]}x{y.shape[-1]}: features max|trt-ort| "
              f"{float(np.abs(ft.float().cpu().numpy() - fo).max()):.3g}  decision max|trt-ort| {diff:.3g}  "
              f"(decide {ms:.1f} ms)")
    ok = worst <= tolerance
    print(f"{'OK' if ok else 'FAIL'}: decision max|trt-ort| {worst:.3g} (tolerance {tolerance:g})")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cascade")
    p.add_argument("--weights", default="default", help="'default', a safetensors path, or 'none'")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--out", required=True)
    p.add_argument("--min", dest="min_hw", default="32x32")
    p.add_argument("--opt", dest="opt_hw", default="1024x1024")
    p.add_argument("--max", dest="max_hw", default="2048x2048",
                   help="largest image side fused whole; ray-mff tiles larger images (tile size = max / 2)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--workspace-mib", type=int, default=2048)
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: OUT/timing.cache)")
    p.add_argument("--check", action="store_true", help="compare with ONNX Runtime after building")
    p.add_argument("--tolerance", type=float, default=None, help="check tolerance (default 1e-3 fp32, 2e-2 fp16)")
    args = p.parse_args(argv)

    from ray_mff.engines.tensorrt_build import ShapeProfile, build_plans
    from ray_mff.errors import EngineUnavailableError

    out = Path(args.out)
    try:
        res = build_plans(args.model, out, precision=args.precision, weights=args.weights,
                          profile=ShapeProfile(min_hw=_hw(args.min_hw), opt_hw=_hw(args.opt_hw), max_hw=_hw(args.max_hw),
                                               max_batch=args.max_batch),
                          workspace_bytes=args.workspace_mib << 20,
                          timing_cache=args.timing_cache or out / "timing.cache")
    except EngineUnavailableError as err:
        print(f"build_engine: {err}", file=sys.stderr)
        return 2
    f = res["facts"]
    print(f"TensorRT {f['tensorrt']} on {f['gpu']} (sm {f['compute_capability'][0]}{f['compute_capability'][1]}), "
          f"{args.precision}: {f['mode']['why']}")
    print(f"plans: {res['encoder']} ({res['encoder'].stat().st_size / 1e6:.1f} MB), "
          f"{res['decider']} ({res['decider'].stat().st_size / 1e6:.1f} MB); facts: {out / 'plans.json'}")
    if args.check:
        tol = args.tolerance if args.tolerance is not None else (1e-3 if args.precision == "fp32" else 2e-2)
        return check(out, f, args.precision, tol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
