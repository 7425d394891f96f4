"""Decision calibration vs serial pair-by-pair fusion on many-image stacks, same engine.

Calibrated fusion (Ma et al. 2022) encodes each image once, runs the decision path of a
reference image against every other image and fuses all N in one pass. Serial fusion fuses A with
B, the result with C, and so on: N-1 full network passes that re-encode the intermediate result.
This prints wall time, the speed-up ratio and the N-source Q_G of both, on the Lytro triples and
on stack_v4 (65 images, 1600x1200).

    .venv/bin/python bench/calibration.py                    # default model, engine auto
    .venv/bin/python bench/calibration.py --engine torch --v4-images 65

With encode cost E per image and decide cost d per pair, serial does 2(N-1) encodes and N-1
decides, calibrated N encodes and N-1 decides, so the speed-up is at most
(2(N-1)E + (N-1)d) / (NE + (N-1)d): 4/3 at N = 3 even when d = 0, close to 2 at N = 65.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report_table import format_table  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from ray_mff import io, metrics  # noqa: E402
from ray_mff.methods import get_fuser  # noqa: E402
from ray_mff.stacks import discover_stacks  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def time_interleaved(fusers: list, images, repeats: int) -> list[tuple[float, object]]:
    """Best-of-``repeats`` wall time of each fuser, alternating between them every repeat so a
    shared machine's changing load falls on both alike."""
    best = [(float("inf"), None) for _ in fusers]
    for _ in range(repeats):
        for i, fuser in enumerate(fusers):
            t0 = time.perf_counter()
            result = fuser.fuse(images)
            best[i] = (min(best[i][0], time.perf_counter() - t0), result)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cascade")
    p.add_argument("--engine", default="auto")
    p.add_argument("--v4-images", type=int, default=65, help="how many of stack_v4's 65 images (spread over the range; 0 = skip it)")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats on the Lytro triples; the best time counts")
    p.add_argument("--v4-repeats", type=int, default=2, help="alternating repeats on stack_v4 (minutes each)")
    args = p.parse_args(argv)

    stacks = []
    triples = DATA / "lytro_triple"
    if triples.is_dir():
        stacks += [(s.id, list(s.uris)) for s in discover_stacks(str(triples))]
    v4 = DATA / "stack_v4"
    if v4.is_dir() and args.v4_images > 0:
        all_v4 = [str(x) for x in sorted(v4.glob("V*.jpg"))]
        step = max(1, len(all_v4) // max(1, args.v4_images))
        uris = all_v4[::step][: args.v4_images]
        stacks.append((f"stack_v4[{len(uris)}]", uris))
    if not stacks:
        print("bench/calibration.py: needs ../shared/data (lytro_triple, stack_v4)", file=sys.stderr)
        return 2

    calibrated = get_fuser(args.model, engine=args.engine, calibration=True)
    serial = get_fuser(args.model, engine=args.engine, calibration=False)
    rows = []
    for name, uris in stacks:
        images = io.read_stack(uris)
        repeats = args.v4_repeats if name.startswith("stack_v4") else args.repeats
        (t_cal, r_cal), (t_ser, r_ser) = time_interleaved([calibrated, serial], images, repeats)
        rows.append({
            "stack": name, "n": len(images), "size": f"{images[0].shape[1]}x{images[0].shape[0]}",
            "serial_s": t_ser, "calibrated_s": t_cal, "speedup": t_ser / t_cal,
            "qg_serial": metrics.q_g(images, r_ser.fused), "qg_calibrated": metrics.q_g(images, r_cal.fused),
        })
        print(f"  {name}: serial {t_ser:.2f}s, calibrated {t_cal:.2f}s", file=sys.stderr)

    engine = r_cal.stats.get("engine")
    print(f"model {args.model}, engine {engine} ({r_cal.stats.get('precision')}), best of {args.repeats} "
          f"(stack_v4: {args.v4_repeats}) alternating runs")
    head = ["stack", "n", "size", "serial s", "calibrated s", "speed-up", "Q_G serial", "Q_G calibrated", "dQ_G"]
    lines = [[r["stack"], str(r["n"]), r["size"], f"{r['serial_s']:.2f}", f"{r['calibrated_s']:.2f}",
              f"{r['speedup']:.2f}x", f"{r['qg_serial']:.4f}", f"{r['qg_calibrated']:.4f}",
              f"{r['qg_calibrated'] - r['qg_serial']:+.4f}"] for r in rows]
    print(format_table(head, lines))
    worst_speed = min(r["speedup"] for r in rows)
    worst_dq = min(r["qg_calibrated"] - r["qg_serial"] for r in rows)
    ok = worst_speed >= 1.3 and worst_dq >= -0.005
    print(f"goal (speed-up >= 1.3x, dQ_G >= -0.005): worst {worst_speed:.2f}x, {worst_dq:+.4f} -> "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
