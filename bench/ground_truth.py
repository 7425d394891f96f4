"""Full-reference benchmark: fuse rendered focus stacks whose all-in-focus truth is known.

No-reference metrics (Q_G, Q_Y, Q_MI) saturate on real benchmark pairs; methods really differ at
focus boundaries, where a blurred near object spreads over a sharp background. So this bench
renders 2- and 4-image stacks from natural images the models never trained on (BSDS500 *val*;
training uses *train*) with a defocus model unlike the training blur: a disk (pillbox) PSF,
layered depth with occlusion-aware compositing (the near object's blur spills over the sharp
background) and sensor noise (:func:`ray_mff.synthetic.render_focus_stack`). It prints PSNR and
SSIM against the truth over the whole image and in a band around the focus boundaries, for every
method, in one table.

    .venv/bin/python bench/ground_truth.py                 # 24 val images, N = 2 and 4
    .venv/bin/python bench/ground_truth.py --images 100 --markdown
"""
from __future__ import annotations

import argparse
import sys
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24, help="how many val images (sorted by name)")
    p.add_argument("--folder", default=str(DEFAULT_IMAGES), help="folder of all-in-focus images")
    p.add_argument("--sizes", default="2,4", help="stack sizes to render")
    p.add_argument("--methods", default=None, help="comma list (default: every method with weights)")
    p.add_argument("--engine", default="auto")
    p.add_argument("--band", type=int, default=8, help="half-width of the boundary band in px")
    p.add_argument("--max-radius", type=float, default=8.0, help="disk PSF radius for the full depth range")
    p.add_argument("--noise", type=float, default=0.004, help="sensor noise sigma (full scale)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (for model cards)")
    args = p.parse_args(argv)

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"bench/ground_truth.py: {folder} not found (needs ../shared/data/bsds500/val)", file=sys.stderr)
        return 2
    files = sorted(x for x in folder.iterdir() if x.suffix.lower() in (".jpg", ".png", ".tif"))[: args.images]
    methods = args.methods.split(",") if args.methods else _available_methods()
    sizes = [int(s) for s in args.sizes.split(",")]

    fusers = {m: get_fuser(m, engine=args.engine) for m in methods}
    totals: dict[tuple[str, int], list[dict]] = {}
    for i, path in enumerate(files):
        truth_src = io.read_image(str(path))
        for n in sizes:
            stack, truth, depth = render_focus_stack(truth_src, n, seed=1000 * n + i, psf="disk",
                                                     max_radius=args.max_radius, noise_sigma=args.noise)
            band = boundary_band(depth, args.band)
            for m, fuser in fusers.items():
                t0 = time.perf_counter()
                fused = fuser.fuse(stack).fused
                row = scores(truth, fused, band)
                row["sec"] = time.perf_counter() - t0
                totals.setdefault((m, n), []).append(row)

    rows = []
    for (m, n), rs in totals.items():
        rows.append({"method": m, "n": n, **{k: float(np.mean([r[k] for r in rs])) for k in rs[0]}})
    rows.sort(key=lambda r: (r["n"], -r["psnr"]))
    print(f"ground truth: {len(files)} images from {folder}, disk PSF r<= {args.max_radius}px, "
          f"noise {args.noise}, boundary band +-{args.band}px")
    _print(rows, args.markdown)
    return 0


def _available_methods() -> list[str]:
    from ray_mff.models import list_models

    shipped = Path(REPO / "ray_mff" / "models" / "weights")
    learned = [m for m in list_models() if (shipped / f"{m}.safetensors").is_file()]
    return learned + [m for m in list_methods() if m not in list_models()]


def _print(rows: list[dict], markdown: bool) -> None:
    head = ["method", "N", "PSNR dB", "SSIM", "PSNR@boundary", "SSIM@boundary", "sec/stack"]
    lines = [[r["method"], str(r["n"]), f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['psnr_b']:.2f}",
              f"{r['ssim_b']:.4f}", f"{r['sec']:.3f}"] for r in rows]
    print(format_table(head, lines, markdown))


if __name__ == "__main__":
    sys.exit(main())
