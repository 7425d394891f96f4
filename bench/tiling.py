"""Tiled fusion of large images: peak memory on a huge stack, and tiled vs untiled on a crop.

1. ``--huge``: a synthetic 12000 x 12000 3-image uint16 RGB focus stack (864 MB per image) is
   generated block by block and fused by ``get_fuser(<model>)`` (ONNX Runtime, tiles of
   ``--tile-size``) in a subprocess whose peak resident memory (VmHWM) is reported
   against the 6 GiB bound.
2. ``--crop``: a ``--crop-size`` square (default 3000) of the same scene is fused whole and tiled;
   prints the max difference in 8-bit grey levels (16-bit values / 257) and how many pixels
   differ by more than 1.

    .venv/bin/python bench/tiling.py --crop              # 3000 x 3000: tiled vs untiled
    .venv/bin/python bench/tiling.py --huge              # 12000 x 12000 x 3 uint16: peak RSS
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1 << 30


def peak_rss() -> int:
    """Peak resident bytes of this process (VmHWM; see bench/engines.py for why not ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_stack(size: int, n: int = 3, seed: int = 0, block: int = 1000) -> list[np.ndarray]:
    """(size, size, 3) uint16 sources of one textured scene; source k is sharp inside ring k of a
    set of concentric rings (focus depth varies with the distance to the centre) and defocused
    (Gaussian, sigma 3) elsewhere. Generated in row blocks: memory ~ the sources only."""
    import cv2

    rng = np.random.default_rng(seed)
    low = rng.random((size // 16 + 2, size // 16 + 2, 3)).astype(np.float32)
    images = [np.empty((size, size, 3), np.uint16) for _ in range(n)]
    halo = 16
    yy_c = xx_c = size / 2
    r_max = np.hypot(size / 2, size / 2)
    for y0 in range(0, size, block):
        y1 = min(size, y0 + block)
        a0, a1 = max(0, y0 - halo), min(size, y1 + halo)
        # texture: smooth shapes (upsampled low-res noise) plus fine detail
        ly0, ly1 = a0 // 16, a1 // 16 + 2
        coarse = cv2.resize(low[ly0:ly1], (size, (ly1 - ly0) * 16), interpolation=cv2.INTER_CUBIC)
        coarse = coarse[a0 - ly0 * 16:a1 - ly0 * 16]
        fine = np.random.default_rng(seed + y0).random(coarse.shape, dtype=np.float32)
        sharp = np.clip(0.7 * coarse + 0.3 * fine, 0, 1)
        blurred = cv2.GaussianBlur(sharp, (0, 0), 3.0)
        yy, xx = np.mgrid[y0:y1, 0:size].astype(np.float32)
        ring = np.minimum((np.hypot(yy - yy_c, xx - xx_c) / r_max * n * 2).astype(np.int32) % n, n - 1)
        s, b = sharp[y0 - a0:y1 - a0], blurred[y0 - a0:y1 - a0]
        for k in range(n):
            img = np.where((ring == k)[..., None], s, b)
            images[k][y0:y1] = np.rint(img * 65535).astype(np.uint16)
    return images


def _fuser(model: str, tile_size: int | None, engine: str):
    import torch

    from ray_mff.methods import get_fuser
    from ray_mff.models import default_weights_path

    torch.manual_seed(0)
    weights = "default" if default_weights_path(model).is_file() else None
    return get_fuser(model, engine=engine, weights=weights, tile_size=tile_size)


def run_huge(args) -> dict:
    """Subprocess body: generate, fuse, report peak RSS."""
    t0 = time.perf_counter()
    images = synthetic_stack(args.size, 3)
    gen = time.perf_counter() - t0
    rss_sources = peak_rss()
    fuser = _fuser(args.model, args.tile_size, args.engine)
    placeholder = None
    if args.strip_rows:
        # Fuse only the top strip (tiles of full width, so the band buffers and the per-tile working
        # set are those of the full run), while full-size output and index-map arrays are held and
        # touched, as the full run would: the peak is an upper bound of the full run's.
        placeholder = (np.ones_like(images[0]), np.ones(images[0].shape[:2], np.uint16))
        images = [img[:args.strip_rows] for img in images]
    t1 = time.perf_counter()
    result = fuser.fuse(images)
    seconds = time.perf_counter() - t1
    peak = peak_rss()
    del placeholder
    return {"size": args.size, "n": 3, "dtype": "uint16", "generate_s": gen, "fuse_s": seconds,
            "fused_rows": images[0].shape[0], "tiles": result.stats.get("tiles"), "engine": result.stats.get("engine"),
            "weights_kept": result.weights is not None,
            "source_bytes": sum(i.base.nbytes if i.base is not None else i.nbytes for i in images),
            "rss_after_sources": rss_sources, "peak_rss": peak}


def run_crop(args) -> dict:
    from ray_mff.tiling import TiledFuser

    images = synthetic_stack(args.crop_size, 3, seed=1)
    fuser = _fuser(args.model, 0, args.engine)  # untiled inner fuser
    t0 = time.perf_counter()
    whole = fuser.fuse(images)
    t_whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    tiled = TiledFuser(fuser, tile_size=args.tile_size, untiled_max_side=args.tile_size).fuse(images)
    t_tiled = time.perf_counter() - t0
    d = np.abs(tiled.fused.astype(np.int64) - whole.fused.astype(np.int64)) / 257.0  # 16-bit -> 8-bit levels
    dw = np.abs(tiled.weights - whole.weights)
    return {"crop": args.crop_size, "tiles": tiled.stats["tiles"], "untiled_s": t_whole, "tiled_s": t_tiled,
            "max_diff_8bit": float(d.max()), "pixels_over_1_level": int((d.max(axis=-1) > 1).sum()),
            "pixels": args.crop_size ** 2, "max_weight_diff": float(dw.max()),
            "index_map_agreement": float((tiled.index_map == whole.index_map).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--huge", action="store_true")
    p.add_argument("--crop", action="store_true")
    p.add_argument("--size", type=int, default=12000)
    p.add_argument("--crop-size", type=int, default=3000)
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--model", default="cascade")
    p.add_argument("--engine", default="onnx")
    p.add_argument("--strip-rows", type=int, default=0,
                   help="huge: fuse only the top N rows at full width (time-boxed peak-memory check)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_huge(args)))
        return 0
    if not (args.huge or args.crop):
        args.huge = args.crop = True
    if args.crop:
        r = run_crop(args)
        print(f"crop {r['crop']}x{r['crop']} x3 uint16, {r['tiles']} tiles of {args.tile_size}: untiled {r['untiled_s']:.1f} s,"
              f" tiled {r['tiled_s']:.1f} s; max |tiled - untiled| {r['max_diff_8bit']:.2f} grey levels (8-bit),"
              f" {r['pixels_over_1_level']} of {r['pixels']} pixels over 1 level; max weight diff {r['max_weight_diff']:.4f};"
              f" index maps agree on {100 * r['index_map_agreement']:.3f}%")
    if args.huge:
        cmd = [sys.executable, __file__, "--child", "--size", str(args.size), "--tile-size", str(args.tile_size),
               "--model", args.model, "--engine", args.engine, "--strip-rows", str(args.strip_rows)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if res.returncode != 0:
            print(res.stderr[-3000:])
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        ok = "OK" if r["peak_rss"] < 6 * GIB else "OVER 6 GiB"
        print(f"huge {r['size']}x{r['size']} x{r['n']} {r['dtype']} RGB ({r['source_bytes'] / GIB:.2f} GiB of sources), "
              f"{r['tiles']} tiles of {args.tile_size} on {r['engine']}: {r['fused_rows']} rows fused in {r['fuse_s']:.0f} s "
              f"(generated in {r['generate_s']:.0f} s); RSS after sources {r['rss_after_sources'] / GIB:.2f} GiB, "
              f"peak {r['peak_rss'] / GIB:.2f} GiB ({ok}); full weights kept: {r['weights_kept']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
