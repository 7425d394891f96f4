"""Full-reference benchmark: fuse rendered focus stacks whose all-in-focus truth is known.

No-reference metrics (Q_G, Q_Y, Q_MI) saturate on real benchmark pairs; methods really differ at
focus boundaries, where a blurred near object spreads over a sharp background. So this bench
renders 2- and 4-image stacks from natural images the models never trained on (BSDS500 *val*;
training uses *train*) with a defocus model unlike the training blur: a disk (pillbox) PSF,
layered depth with occlusion-aware compositing (the near object's blur spills over the sharp
background) and sensor noise (:func:`ray_mff.synthetic.render_focus_stack`). It prints PSNR and
SSIM against the truth over the whole image and in a band around the focus boundaries, for every
method, in one table, with each method's speed (output megapixels per second, fusion only) from
the same run, and two oracle bounds that know the truth:

- ``oracle-7x7``: per 7x7 window, the source closest to the truth (a perfect *selection* at the
  granularity of a patch-based decision);
- ``oracle-pixel``: per pixel, the source closest to the truth (the best any pure selection can do).

``--error-maps DIR`` writes |fused - truth| (x8, grey) of the first samples of every method as
PNGs, with the truth and the ideal decision map beside them: look at them. ``openfocus``
(StackMFF-V3) joins as a peer when its CLI is on PATH or named by ``RAY_MFF_OPENFOCUS`` (install it
in its own venv; it is run in its batch mode on CPU, its wall time includes loading its model).

    .venv/bin/python bench/ground_truth.py                 # 24 val images, N = 2 and 4
    .venv/bin/python bench/ground_truth.py --images 50 --sizes 2,4,8 --markdown --error-maps bench/results/gt
    .venv/bin/python bench/ground_truth.py --methods stacknet,guided --weights stacknet=/tmp/stacknet.safetensors
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from skimage.metrics import structural_similarity

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report_table import format_table  # noqa: E402  (bench/ is sys.path[0] when run as a script)
from ray_mff import io  # noqa: E402
from ray_mff.methods import get_fuser, list_methods  # noqa: E402
from ray_mff.synthetic import render_focus_stack  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "bsds500" / "val"


def boundary_band(depth_index: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within ``width`` px of a change in the ideal decision (depth index) map."""
    d = depth_index.astype(np.int32)
    edge = np.zeros(d.shape, bool)
    edge[:, 1:] |= d[:, 1:] != d[:, :-1]
    edge[1:, :] |= d[1:, :] != d[:-1, :]
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    return cv2.dilate(edge.astype(np.uint8), k) > 0


def scores(truth: np.ndarray, fused: np.ndarray, band: np.ndarray) -> dict:
    """PSNR and SSIM overall and inside ``band``, on the image's own data range."""
    rng = 255.0 if truth.dtype == np.uint8 else float(np.iinfo(truth.dtype).max)
    t = truth.astype(np.float64)
    f = fused.astype(np.float64)
    err = (t - f) ** 2
    if err.ndim == 3:
        err = err.mean(axis=2)
    _, smap = structural_similarity(t, f, data_range=rng, channel_axis=2 if t.ndim == 3 else None, full=True)
    if smap.ndim == 3:
        smap = smap.mean(axis=2)

    def psnr(mse: float) -> float:
        return float("inf") if mse == 0 else 10 * np.log10(rng * rng / mse)

    return {
        "psnr": psnr(err.mean()),
        "ssim": float(smap.mean()),
        "psnr_b": psnr(err[band].mean()) if band.any() else float("nan"),
        "ssim_b": float(smap[band].mean()) if band.any() else float("nan"),
    }


def oracle_fuse(stack: list[np.ndarray], truth: np.ndarray, window: int) -> np.ndarray:
    """The source closest to the truth per ``window`` x ``window`` window (1 = per pixel), by the
    squared error summed over channels and averaged over the window."""
    t = truth.astype(np.float32)
    errs = []
    for img in stack:
        e = (img.astype(np.float32) - t) ** 2
        e = e.sum(axis=2) if e.ndim == 3 else e
        errs.append(cv2.blur(e, (window, window), borderType=cv2.BORDER_REFLECT) if window > 1 else e)
    pick = np.argmin(np.stack(errs), axis=0)
    out = np.take_along_axis(np.stack(stack), pick[None, ..., None] if truth.ndim == 3 else pick[None], axis=0)
    return out[0]


ORACLES = {"oracle-7x7": 7, "oracle-pixel": 1}


def openfocus_cli() -> str | None:
    """The openfocus (StackMFF-V3) command: ``RAY_MFF_OPENFOCUS`` or ``openfocus`` on PATH."""
    return os.environ.get("RAY_MFF_OPENFOCUS") or shutil.which("openfocus")


def run_openfocus(cli: str, stacks: list[list[np.ndarray]], work: Path) -> tuple[list[np.ndarray], float]:
    """Fuse stacks with the openfocus CLI (StackMFF-V3, its defaults otherwise) in its batch mode
    (``-i`` stack folders ``-d`` output folder, ``--cpu``): one call for all, as a user would run it
    -> (fused images in order, wall seconds, model loading included)."""
    src, dst = work / "in", work / "out"
    folders = []
    for i, stack in enumerate(stacks):
        d = src / f"s{i:04d}"
        d.mkdir(parents=True)
        for k, img in enumerate(stack):
            io.write_image(str(d / f"{k:02d}.png"), img)
        folders.append(str(d))
    dst.mkdir(parents=True)
    cmd = [cli, "-i", *folders, "-d", str(dst), "-m", "stackmffv3", "--cpu"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"openfocus failed ({' '.join(cmd)}): {res.stderr[-800:]}")
    fused = []
    for i in range(len(stacks)):
        found = sorted(p for p in dst.rglob("*") if p.is_file() and p.stem.startswith(f"s{i:04d}"))
        if not found:
            raise RuntimeError(f"openfocus wrote no result for stack s{i:04d} under {dst}")
        fused.append(io.read_image(str(found[0])))
    return fused, wall


def error_map(truth: np.ndarray, fused: np.ndarray, gain: float = 8.0) -> np.ndarray:
    """|fused - truth| averaged over channels, x ``gain``, as uint8 (0 = exact)."""
    e = np.abs(fused.astype(np.float32) - truth.astype(np.float32))
    e = e.mean(axis=2) if e.ndim == 3 else e
    scale = 255.0 / (255.0 if truth.dtype == np.uint8 else float(np.iinfo(truth.dtype).max))
    return np.clip(e * scale * gain, 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24, help="how many val images (sorted by name)")
    p.add_argument("--folder", default=str(DEFAULT_IMAGES), help="folder of all-in-focus images")
    p.add_argument("--sizes", default="2,4", help="stack sizes to render (e.g. 2,4,8)")
    p.add_argument("--stacks", type=int, default=None,
                   help="images used for stacks of more than 2 (default: --images); e.g. 50 pairs, 25 stacks")
    p.add_argument("--methods", default=None,
                   help="comma list (default: every method with weights); NAME:key=value passes a fuser "
                        "option, e.g. stacknet_s:correction=off")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                   help="weights file of a learned method (e.g. a training checkpoint); repeatable")
    p.add_argument("--engine", default="auto")
    p.add_argument("--band", type=int, default=8, help="half-width of the boundary band in px")
    p.add_argument("--max-radius", type=float, default=8.0, help="disk PSF radius for the full depth range")
    p.add_argument("--noise", type=float, default=0.004, help="sensor noise sigma (full scale)")
    p.add_argument("--no-oracles", action="store_true", help="leave out the two oracle rows")
    p.add_argument("--no-metrics", action="store_true", help="time the methods only (no scores, no oracles)")
    p.add_argument("--no-openfocus", action="store_true", help="leave out openfocus even when installed")
    p.add_argument("--error-maps", default=None, metavar="DIR", help="write |fused - truth| PNGs here")
    p.add_argument("--error-samples", type=int, default=3, help="samples per stack size with error maps")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (for model cards)")
    args = p.parse_args(argv)

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"bench/ground_truth.py: {folder} not found (needs ../shared/data/bsds500/val)", file=sys.stderr)
        return 2
    files = sorted(x for x in folder.iterdir() if x.suffix.lower() in (".jpg", ".png", ".tif"))[: args.images]
    methods = args.methods.split(",") if args.methods else _available_methods()
    sizes = [int(s) for s in args.sizes.split(",")]
    weights = dict(w.split("=", 1) for w in args.weights)
    oracles = {} if (args.no_oracles or args.no_metrics) else ORACLES
    peer = None if args.no_openfocus else openfocus_cli()
    maps = Path(args.error_maps) if args.error_maps else None
    if maps:
        maps.mkdir(parents=True, exist_ok=True)

    fusers = {m: _fuser(m, args.engine, weights) for m in methods}
    totals: dict[tuple[str, int], list[dict]] = {}
    seconds: dict[tuple[str, int], float] = {}
    pixels: dict[int, float] = {}
    stacks: dict[int, int] = {}
    for n in sizes:
        count = len(files) if n == 2 or args.stacks is None else min(len(files), args.stacks)
        rendered = []
        stacks[n] = count
        for i, path in enumerate(files[:count]):
            stack, truth, depth = render_focus_stack(io.read_image(str(path)), n, seed=1000 * n + i, psf="disk",
                                                     max_radius=args.max_radius, noise_sigma=args.noise)
            rendered.append((stack, truth, depth))
            pixels[n] = pixels.get(n, 0.0) + truth.shape[0] * truth.shape[1]
        outputs: dict[str, list[np.ndarray]] = {}
        for m, fuser in fusers.items():
            fuser.fuse(rendered[0][0])  # warm-up: sessions, exports, caches are not the method's speed
            outputs[m] = []
            t0 = time.perf_counter()
            for stack, _, _ in rendered:
                outputs[m].append(fuser.fuse(stack).fused)
            seconds[(m, n)] = time.perf_counter() - t0
        if peer:
            with tempfile.TemporaryDirectory(prefix="gt_openfocus_") as tmp:
                outputs["openfocus"], seconds[("openfocus", n)] = run_openfocus(peer, [r[0] for r in rendered],
                                                                               Path(tmp))
        if args.no_metrics:
            continue
        for name, window in oracles.items():
            outputs[name] = [oracle_fuse(stack, truth, window) for stack, truth, _ in rendered]
        for i, (stack, truth, depth) in enumerate(rendered):
            band = boundary_band(depth, args.band)
            for m, fused in outputs.items():
                totals.setdefault((m, n), []).append(scores(truth, fused[i], band))
            if maps and i < args.error_samples:
                io.write_image(str(maps / f"n{n}_{i:03d}_truth.png"), truth)
                depth_vis = (depth.astype(np.float32) * (255.0 / max(1, n - 1))).astype(np.uint8)
                io.write_image(str(maps / f"n{n}_{i:03d}_depth.png"), depth_vis)
                for m, fused in outputs.items():
                    io.write_image(str(maps / f"n{n}_{i:03d}_err_{m}.png"), error_map(truth, fused[i]))
                    io.write_image(str(maps / f"n{n}_{i:03d}_fused_{m}.png"), fused[i])

    rows = []
    for (m, n), sec in seconds.items():
        rs = totals.get((m, n), [])
        row = {"method": m, "n": n, "mps": pixels[n] / 1e6 / sec if sec > 0 else float("nan")}
        row.update({k: float(np.mean([r[k] for r in rs])) if rs else float("nan")
                    for k in ("psnr", "ssim", "psnr_b", "ssim_b")})
        rows.append(row)
    for (m, n), rs in totals.items():
        if m in oracles:
            rows.append({"method": m, "n": n, "mps": float("nan"),
                         **{k: float(np.mean([r[k] for r in rs])) for k in ("psnr", "ssim", "psnr_b", "ssim_b")}})
    rows.sort(key=lambda r: (r["n"], -(r["psnr"] if r["psnr"] == r["psnr"] else -r["mps"])))
    counts = ", ".join(f"{stacks[n]} stacks of N={n}" for n in sizes)
    print(f"ground truth: {counts} from {folder}, "
          f"disk PSF r<= {args.max_radius}px, noise {args.noise}, boundary band +-{args.band}px; "
          f"MP/s = output megapixels per second of fusion{'; openfocus: ' + peer if peer else ''}")
    _print(rows, args.markdown)
    return 0


def _option_value(text: str):
    low = text.lower()
    if low in ("true", "false", "on", "off"):
        return low in ("true", "on")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _fuser(spec: str, engine: str, weights: dict):
    """``NAME`` or ``NAME:key=value[:key=value...]`` (fuser options, e.g. ``stacknet_s:correction=off``,
    so one run can compare a method with and without an option; the row keeps the whole spec)."""
    name, *pairs = spec.split(":")
    options = {k: _option_value(v) for k, v in (pair.split("=", 1) for pair in pairs)}
    if name in weights:
        options["weights"] = weights[name]
    return get_fuser(name, engine=engine, **options)


def _available_methods() -> list[str]:
    from ray_mff.models import list_models

    shipped = Path(REPO / "ray_mff" / "models" / "weights")
    learned = [m for m in list_models() if (shipped / f"{m}.safetensors").is_file()]
    return learned + [m for m in list_methods() if m not in list_models()]


def _print(rows: list[dict], markdown: bool) -> None:
    head = ["method", "N", "PSNR dB", "SSIM", "PSNR@boundary", "SSIM@boundary", "MP/s"]

    def f(x: float, fmt: str) -> str:
        return "-" if x != x else format(x, fmt)

    lines = [[r["method"], str(r["n"]), f(r["psnr"], ".2f"), f(r["ssim"], ".4f"), f(r["psnr_b"], ".2f"),
              f(r["ssim_b"], ".4f"), f(r["mps"], ".2f")] for r in rows]
    print(format_table(head, lines, markdown))


if __name__ == "__main__":
    sys.exit(main())
