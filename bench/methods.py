"""Every fusion method side by side on the Lytro pairs and triples: Q_G, Q_Y, Q_MI, Q_CB, speed.

Fuses the 20 Lytro pairs (../shared/data/lytro) and the 4 Lytro triples (../shared/data/lytro_triple)
with each method -- classical (``guided``, ``dwt``) and learned (``cascade``, ``ssim``, ``mscnn``,
``cnn``, run by the engine ``--engine`` picks: ``auto`` = ONNX Runtime on CPU here) -- and prints one
table: the mean no-reference metrics (Xydeas-Petrovic Q_G, Yang Q_Y, Hossny Q_MI, Chen-Blum Q_CB;
:mod:`ray_mff.metrics`) and the fusion throughput in megapixels (of fused output) per second of
``fuser.fuse`` wall time, with its ratio to the ``dwt`` baseline measured in the same run.
Reading images and computing metrics are not timed; each fuser fuses one pair first as a warm-up
(engine sessions, ONNX export on first use).

    .venv/bin/python bench/methods.py                           # every method with weights
    .venv/bin/python bench/methods.py --methods dwt,cnn --markdown
    .venv/bin/python bench/methods.py --json out/bench_methods.json   # also keep rows (merged by method)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report_table import format_table  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from ray_mff import io, metrics  # noqa: E402
from ray_mff.methods import get_fuser, list_methods  # noqa: E402
from ray_mff.stacks import discover_stacks  # noqa: E402

DATA = REPO.parent / "shared" / "data"
BASELINE = "dwt"
METRICS = ("q_g", "q_y", "q_mi", "q_cb")


def available_methods() -> list[str]:
    """Classical methods, then every learned model that has shipped weights."""
    from ray_mff.models import default_weights_path, list_models

    learned = [m for m in list_models() if default_weights_path(m).is_file()]
    return [m for m in list_methods() if m not in list_models()] + learned


def load_sets(limit: int | None) -> dict[str, list[tuple[str, list[np.ndarray]]]]:
    sets = {}
    for key, folder in (("pairs", DATA / "lytro"), ("triples", DATA / "lytro_triple")):
        if folder.is_dir():
            stacks = discover_stacks(str(folder))[:limit]
            sets[key] = [(s.id, io.read_stack(list(s.uris))) for s in stacks]
    return sets


def run_method(name: str, sets: dict, engine: str) -> dict:
    fuser = get_fuser(name, engine=engine)
    first = next(iter(sets.values()))[0][1]
    warm = fuser.fuse(first)  # sessions / exports / caches
    row: dict = {"method": name, "engine": warm.stats.get("engine", "?"), "precision": warm.stats.get("precision")}
    for key, stacks in sets.items():
        scores = {m: [] for m in METRICS}
        seconds, megapixels = 0.0, 0.0
        for sid, images in stacks:
            t0 = time.perf_counter()
            result = fuser.fuse(images)
            seconds += time.perf_counter() - t0
            megapixels += images[0].shape[0] * images[0].shape[1] / 1e6
            for m, v in metrics.evaluate(images, result.fused).items():
                scores[m].append(v)
        row[key] = {**{m: float(np.mean(v)) for m, v in scores.items()}, "n": len(stacks),
                    "mp_s": megapixels / seconds if seconds else float("nan"),
                    "calibration": result.stats.get("calibration")}
        print(f"  {name:8s} {key:7s} " + " ".join(f"{m}={row[key][m]:.4f}" for m in METRICS)
              + f" {row[key]['mp_s']:.2f} MP/s", file=sys.stderr, flush=True)
    return row


def methods_table(rows: list[dict], markdown: bool = False) -> str:
    keys = [k for k in ("pairs", "triples") if any(k in r for r in rows)]
    base = {k: next((r[k]["mp_s"] for r in rows if r["method"] == BASELINE and k in r), None) for k in keys}
    head = ["method", "engine"]
    for k in keys:
        n = next(r[k]["n"] for r in rows if k in r)
        tag = f"{n} {k}"
        head += [f"Q_G ({tag})", "Q_Y", "Q_MI", "Q_CB", "MP/s", f"x {BASELINE}"]
    lines = []
    for r in rows:
        ln = [r["method"], r["engine"]]
        for k in keys:
            v = r.get(k)
            if v is None:
                ln += ["-"] * 6
                continue
            ratio = v["mp_s"] / base[k] if base.get(k) else float("nan")
            ln += [f"{v['q_g']:.4f}", f"{v['q_y']:.4f}", f"{v['q_mi']:.4f}", f"{v['q_cb']:.4f}", f"{v['mp_s']:.2f}",
                   f"{ratio:.2f}"]
        lines.append(ln)
    return format_table(head, lines, markdown)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=None, help="comma list (default: classical + every model with weights)")
    p.add_argument("--engine", default="auto", help="engine for learned models (auto | torch | onnx | tensorrt)")
    p.add_argument("--limit", type=int, default=None, help="only the first N stacks of each set (quick look)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", default=None, help="keep the rows in this JSON file (rows of other methods kept)")
    args = p.parse_args(argv)

    methods = args.methods.split(",") if args.methods else available_methods()
    if BASELINE not in methods:
        methods = [BASELINE, *methods]  # the speed ratio needs the baseline measured in this run
    sets = load_sets(args.limit)
    if not sets:
        print("bench/methods.py: needs ../shared/data (lytro, lytro_triple)", file=sys.stderr)
        return 2
    rows = [run_method(m, sets, args.engine) for m in methods]
    if args.json:
        path = Path(args.json)
        kept = json.loads(path.read_text()) if path.is_file() else []
        merged = {r["method"]: r for r in kept}
        merged.update({r["method"]: r for r in rows})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(list(merged.values()), indent=2))
    print(methods_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
