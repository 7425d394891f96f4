"""Alignment benchmark: registration choices, fusion of misregistered stacks, real stacks, cost.

Four tables, each against a baseline measured in the same run:

1. *estimators*: synthetic focus stacks from BSDS500 *val* (disk-PSF defocus,
   :func:`ray_mff.synthetic.render_focus_stack`) misregistered with known similarities (shift up
   to 3% of the width, scale up to 2%, :func:`ray_mff.synthetic.misregister_stack`). Error = the
   largest corner displacement between the estimated and the true transform (px); time per
   plane. Candidates: ECC as :mod:`ray_mff.align` runs it, with other registration images
   (raw luminance, gradient magnitude, band-pass) and at full resolution; phase correlation
   (OpenCV; log-polar for scale after Reddy & Chatterji 1996); scikit-image's
   ``phase_cross_correlation``; ORB and SIFT features with RANSAC similarity fits.
2. *fusion vs truth*: the same stacks fused with ``guided``: registered (the baseline), moved and
   fused as they are, moved and aligned (similarity; middle and chain). PSNR against the truth on
   the common valid region: reference-frame pixels that every moved plane saw (the intersection
   of their footprints, eroded by 3 px).
3. *real stacks*: stack_v4 (65 x 1600x1200) and the Lytro pairs and triples fused with
   ``guided`` under ``--align none`` (checked bit-identical to no align stage) and ``similarity``;
   Q_G / Q_Y / Q_MI against the sources in the fused image's frame (as ``ray-mff eval --align``).
   Also: planes not resampled, and how many of them because their ECC estimate showed no
   evidence of motion (:meth:`ray_mff.align._Registrar.evidence`); and the aligned fusion scored
   against the sources as read (the wrong frame for a moved stack; for comparison).
4. *cost*: alignment time (estimate + apply) / guided fusion time on stack_v4, same run, wall
   clock and process CPU time (the steadier one on a loaded machine).
5. *resampling kernels* (``--kernels``): CPU time per 1600x1200 RGB plane of the warps OpenCV
   offers and of a separable resize + phase-shift path, and their accuracy on the synthetic stacks
   with the true transforms.

    .venv/bin/python bench/alignment.py                    # all four (about 10 min on 2 cores)
    .venv/bin/python bench/alignment.py --images 8 --skip-real
    .venv/bin/python bench/alignment.py --real-only        # tables 3 and 4 only
    .venv/bin/python bench/alignment.py --kernels --images 6   # table 5 only
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report_table import format_table  # noqa: E402
from ray_mff import align, io, metrics  # noqa: E402
from ray_mff.align import AlignOptions, PlaneAlignment, StackAlignment, align_stack, estimate_alignment  # noqa: E402
from ray_mff.fusion.luminance import luminance  # noqa: E402
from ray_mff.methods import get_fuser  # noqa: E402
from ray_mff.synthetic import render_misregistered_stack  # noqa: E402

DATA = REPO.parent / "shared" / "data"


# ------------------------------------------------------------------------------ shared helpers


def corner_error(estimated: np.ndarray, truth: np.ndarray, shape) -> float:
    """Largest displacement (px) between two reference->plane maps at the image corners."""
    h, w = shape
    p = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float).T
    return float(np.abs((estimated @ p - truth @ p)[:2]).max())


def valid_region(transforms, shape, erode: int = 3) -> np.ndarray:
    """(H, W) bool: reference pixels x with T x inside every moved plane's frame, eroded."""
    h, w = shape
    ones = np.ones((h, w), np.uint8)
    mask = ones.copy()
    for t in transforms:
        seen = cv2.warpAffine(ones, t[:2], (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mask &= seen
    return cv2.erode(mask, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8)) > 0


def psnr(truth: np.ndarray, fused: np.ndarray, mask: np.ndarray) -> float:
    peak = 255.0 if truth.dtype == np.uint8 else float(np.iinfo(truth.dtype).max)
    err = (truth.astype(np.float64) - fused.astype(np.float64)) ** 2
    if err.ndim == 3:
        err = err.mean(axis=2)
    return float(10 * np.log10(peak * peak / err[mask].mean()))


def synthetic_cases(folder: Path, count: int, n: int, max_radius: float):
    files = sorted(x for x in folder.iterdir() if x.suffix.lower() in (".jpg", ".png"))[:count]
    rng = np.random.default_rng(17)
    for k, path in enumerate(files):
        picture = io.read_image(str(path))
        stack, moved, truth, transforms = render_misregistered_stack(picture, n, rng=rng, max_radius=max_radius)
        yield stack, truth, moved, transforms


# ---------------------------------------------------------------------------- 1. estimators


def _small(lum, f):
    h, w = lum.shape
    return cv2.resize(lum, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)


def _level(f):
    return np.array([[f, 0, 0.5 * f - 0.5], [0, f, 0.5 * f - 0.5], [0, 0, 1.0]])


def _phase_logpolar(ref, mov):
    """Scale from log-polar magnitude spectra, then translation (Reddy & Chatterji 1996)."""
    win = cv2.createHanningWindow(ref.shape[::-1], cv2.CV_32F)

    def spectrum(x):
        return np.log1p(np.fft.fftshift(np.abs(np.fft.fft2(x * win)))).astype(np.float32)

    a, b = spectrum(ref), spectrum(mov)
    size = (a.shape[1], a.shape[0])
    c, r = (a.shape[1] / 2, a.shape[0] / 2), min(a.shape) / 2
    la = cv2.warpPolar(a, size, c, r, cv2.WARP_POLAR_LOG + cv2.INTER_LINEAR)
    lb = cv2.warpPolar(b, size, c, r, cv2.WARP_POLAR_LOG + cv2.INTER_LINEAR)
    (dx, _), _ = cv2.phaseCorrelate(la, lb)
    s = float(np.exp(-dx * np.log(r) / size[0]))
    cx, cy = (ref.shape[1] - 1) / 2, (ref.shape[0] - 1) / 2
    m = np.array([[s, 0, cx - s * cx], [0, s, cy - s * cy], [0, 0, 1.0]])
    unscaled = cv2.warpAffine(mov, m[:2], size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
    (tx, ty), _ = cv2.phaseCorrelate(ref, unscaled, win)
    return m @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


def _phase_translation(ref, mov):
    (tx, ty), _ = cv2.phaseCorrelate(ref, mov, cv2.createHanningWindow(ref.shape[::-1], cv2.CV_32F))
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


def _skimage_translation(ref, mov):
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(ref, mov, upsample_factor=20)
    return np.array([[1, 0, -shift[1]], [0, 1, -shift[0]], [0, 0, 1.0]])


def _features(detector, norm):
    def estimate(ref, mov):
        a = np.clip(ref * 255, 0, 255).astype(np.uint8)
        b = np.clip(mov * 255, 0, 255).astype(np.uint8)
        ka, da = detector.detectAndCompute(a, None)
        kb, db = detector.detectAndCompute(b, None)
        matches = cv2.BFMatcher(norm, crossCheck=True).match(da, db)
        pa = np.float32([ka[m.queryIdx].pt for m in matches])
        pb = np.float32([kb[m.trainIdx].pt for m in matches])
        m, _ = cv2.estimateAffinePartial2D(pa, pb, method=cv2.RANSAC, ransacReprojThreshold=2.0)
        return np.vstack([m, [0, 0, 1.0]])

    return estimate


def _pairwise(fn, f=1.0):
    """A pairwise estimator on luminance resized by ``f`` -> full-resolution 3x3 map."""
    def run(moved, ref_index):
        ref = _small(luminance(moved[ref_index]), f)
        out = []
        for i, plane in enumerate(moved):
            if i == ref_index:
                out.append(np.eye(3))
                continue
            s = _level(f)
            try:
                out.append(np.linalg.inv(s) @ fn(ref, _small(luminance(plane), f)) @ s)
            except Exception:  # a candidate that cannot register counts with the identity
                out.append(np.eye(3))
        return out

    return run


def _one_direction(registrar, template, moving, m):
    """Replaces ``_Registrar._symmetric``: the forward ECC estimate alone."""
    return m


def _align_module(preparation=None, symmetric=True, **opts):
    """ray_mff.align as it ships, optionally with another registration image or one direction only."""
    def run(moved, ref_index):
        original, original_sym = align._common_scale, align._Registrar._symmetric
        if preparation is not None:
            align._common_scale = preparation
        if not symmetric:
            align._Registrar._symmetric = _one_direction
        try:
            return estimate_alignment(moved, AlignOptions(mode="similarity", **opts)).transforms
        finally:
            align._common_scale, align._Registrar._symmetric = original, original_sym

    return run


def _gradient_magnitude(lum, sigma):
    g = cv2.GaussianBlur(lum, (0, 0), sigma)
    return cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))


def _band_pass(lum, sigma):
    return cv2.GaussianBlur(lum, (0, 0), sigma) - cv2.GaussianBlur(lum, (0, 0), 4 * sigma)


def estimator_table(cases) -> list[list[str]]:
    candidates = {
        "ecc, luminance blurred to a common scale, both directions averaged (shipped)": _align_module(),
        "the same, one direction (reference as ECC's template)": _align_module(symmetric=False),
        "ecc, raw luminance": _align_module(lambda x, s: x),
        "ecc, gradient magnitude": _align_module(_gradient_magnitude),
        "ecc, band-pass (DoG)": _align_module(_band_pass),
        "ecc, full resolution (working_size 4096)": _align_module(working_size=4096),
        "ecc + full-res windows (refine_pixels 2^17)": _align_module(refine_pixels=1 << 17),
        "phase correlation, log-polar scale (cv2)": _pairwise(_phase_logpolar, 0.5),
        "phase correlation, translation (cv2)": _pairwise(_phase_translation),
        "phase_cross_correlation (skimage)": _pairwise(_skimage_translation),
        "ORB + RANSAC similarity (cv2)": _pairwise(_features(cv2.ORB_create(2000), cv2.NORM_HAMMING)),
        "SIFT + RANSAC similarity (cv2)": _pairwise(_features(cv2.SIFT_create(), cv2.NORM_L2)),
    }
    lines = []
    for name, run in candidates.items():
        errors, seconds, planes = [], 0.0, 0
        for _, _, moved, transforms in cases:
            ref = len(moved) // 2
            t0 = time.perf_counter()
            estimated = run(moved, ref)
            seconds += time.perf_counter() - t0
            planes += len(moved) - 1
            shape = moved[0].shape[:2]
            errors += [corner_error(estimated[i], transforms[i], shape) for i in range(len(moved)) if i != ref]
        e = np.array(errors)
        lines.append([name, f"{np.median(e):.3f}", f"{np.percentile(e, 90):.3f}", f"{e.max():.2f}",
                      f"{(e > 1).mean() * 100:.0f}%", f"{1000 * seconds / planes:.1f}"])
    return lines


# ------------------------------------------------------------------------ 2. fusion vs truth


def fusion_table(cases, fuser) -> tuple[list[list[str]], dict]:
    variants = {
        "registered (baseline)": None,
        "moved, fused unaligned": AlignOptions(),
        "moved, --align similarity": AlignOptions(mode="similarity"),
        "moved, --align similarity --align-reference chain": AlignOptions(mode="similarity", reference="chain"),
        "moved, --align translation": AlignOptions(mode="translation"),
    }
    scores = {k: [] for k in variants}
    kernels: dict[str, list[float]] = {}
    for stack, truth, moved, transforms in cases:
        mask = valid_region(transforms, truth.shape[:2])
        for name, opts in variants.items():
            planes = list(stack) if opts is None else list(moved)
            if opts is not None:  # lazily, as the runner aligns for guided (ray_mff.align.AlignedPlanes)
                planes, _ = align_stack(planes, opts, lazy=True)
            scores[name].append(psnr(truth, fuser.fuse(planes).fused, mask))
        planes, _ = align_stack(list(moved), AlignOptions(mode="similarity"))  # every plane warped bicubically
        scores.setdefault("moved, --align similarity, eager (every plane warped, before)", []).append(
            psnr(truth, fuser.fuse(planes).fused, mask))
        original = align._Registrar._symmetric  # the estimate before it was made symmetric
        align._Registrar._symmetric = _one_direction
        try:
            planes, _ = align_stack(list(moved), AlignOptions(mode="similarity"))
        finally:
            align._Registrar._symmetric = original
        scores.setdefault("moved, --align similarity, ECC one direction only", []).append(
            psnr(truth, fuser.fuse(planes).fused, mask))
        # the resampling kernel of the apply step; and the true transforms (the estimator's ceiling)
        for kernel in align.RESAMPLING:
            planes, _ = align_stack(list(moved), AlignOptions(mode="similarity", resampling=kernel))
            kernels.setdefault(f"moved, --align similarity --align-resampling {kernel}", []).append(
                psnr(truth, fuser.fuse(planes).fused, mask))
            oracle = StackAlignment(AlignOptions(mode="similarity", resampling=kernel), truth.shape[:2], len(moved) // 2,
                                    [PlaneAlignment(transform=t, status="ok") for t in transforms])
            planes = [oracle.apply(p, i) for i, p in enumerate(moved)]
            kernels.setdefault(f"moved, true transforms, {kernel} resampling", []).append(
                psnr(truth, fuser.fuse(planes).fused, mask))
    scores.update(kernels)
    base = np.mean(scores["registered (baseline)"])
    lines = [[name, f"{np.mean(v):.2f}", f"{np.mean(v) - base:+.2f}", f"{np.min(np.array(v) - np.array(scores['registered (baseline)'])):+.2f}"]
             for name, v in scores.items()]
    return lines, {k: float(np.mean(v)) for k, v in scores.items()}


# ---------------------------------------------------------------------------- 3-4. real stacks


def _quality(sources, fused, q_y: bool) -> dict:
    out = {"q_g": metrics.q_g(sources, fused), "q_mi": metrics.q_mi(sources, fused)}
    if q_y:
        out["q_y"] = metrics.q_y(sources, fused)
    return out


def cost_rounds(fuser, images, how, rounds: int = 3) -> dict:
    """Alignment and guided fusion timed in alternation, ``rounds`` times (on a shared, loaded
    machine the ratio within a round is what means something), wall clock and process CPU time.

    Per round: estimate (default options); *eager*: warp every plane bicubically, then fuse the
    warped stack (how the stage ran before: its cost is estimate + warp, against this fusion);
    *lazy*: fuse :class:`ray_mff.align.AlignedPlanes`, which warps what guided uses (its cost is
    estimate + the fusion's extra time over the fusion of the same planes already warped); and the
    unaligned stack fused as read (the same cost against plain guided: estimate + lazy - plain).
    Every fusion reads a lazy sequence (one luminance at a time, as the runner's), so the fusions
    differ only in what they warp.
    """
    from ray_mff.planes import ArrayPlanes

    rows, out = [], {"eager": [], "lazy": [], "lazy_vs_plain": []}
    axes = "ZYXS" if images[0].ndim == 3 else "ZYX"
    plain = ArrayPlanes(np.stack(images), axes)

    def now():
        return np.array([time.perf_counter(), time.process_time()])  # wall; CPU of all threads

    for _ in range(rounds):
        t0 = now()
        estimated = estimate_alignment(images, AlignOptions(mode="similarity"))
        t1 = now()
        aligned = ArrayPlanes(np.stack([estimated.apply(img, i) for i, img in enumerate(images)]), axes)
        t2 = now()
        eager = fuser.fuse(aligned)
        t3 = now()
        lazy = fuser.fuse(align.AlignedPlanes(images, estimated))
        t4 = now()
        fuser.fuse(plain)
        t5 = now()
        est, warp, g_eager, g_lazy, g_plain = t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4
        out["eager"].append((est + warp) / g_eager)
        out["lazy"].append((est + g_lazy - g_eager) / g_eager)
        out["lazy_vs_plain"].append((est + g_lazy - g_plain) / g_plain)
        rows.append((est, warp, g_eager, g_lazy, g_plain))
        del aligned
    # the fused images of the two paths against each other (the last round's)
    a, b = eager.fused, lazy.fused
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    agreement = float(np.mean(eager.index_map == lazy.index_map))
    kernels = {}
    for kernel in align.RESAMPLING:  # apply time of each resampling kernel, against bicubic's
        how.options = AlignOptions(mode="similarity", resampling=kernel)
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            how.apply(img, i)
        kernels[kernel] = time.perf_counter() - t0
    how.options = AlignOptions(mode="similarity")
    return {"rounds": rows, "ratios": out, "kernels": kernels, "summary": how.summary(),
            "psnr_lazy_vs_eager": float(10 * np.log10(255.0 ** 2 / err)) if err > 0 else float("inf"),
            "max_diff": int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()), "index_agreement": agreement}


def real_tables(fuser, lytro_pairs: int):
    quality_lines, cost = [], {}
    sets = []
    v4 = DATA / "stack_v4"
    if v4.is_dir():
        sets.append(("stack_v4 (65 planes)", [sorted(str(p) for p in v4.glob("*.jpg"))], False))
    lytro = DATA / "lytro"
    if lytro.is_dir():
        pairs = [[str(lytro / f"lytro_{k:02d}_A.png"), str(lytro / f"lytro_{k:02d}_B.png")]
                 for k in range(1, lytro_pairs + 1)]
        sets.append((f"Lytro pairs ({len(pairs)})", pairs, True))
    triples = DATA / "lytro_triple"
    if triples.is_dir():
        tri = [[str(triples / f"lytro-0{k}-{c}.jpg") for c in "ABC"] for k in range(1, 5)]
        sets.append(("Lytro triples (4)", tri, True))
    for name, stacks, q_y in sets:
        acc = {"none": [], "similarity": [], "similarity, vs sources as read": []}
        identical = True
        still = moved_planes = 0  # non-reference planes within align.STILL_PX of the identity (not resampled)
        held = 0  # of those, planes whose ECC estimate was not significant (align._Registrar.evidence)
        for uris in stacks:
            images = io.read_stack(uris)
            plain = fuser.fuse(images).fused
            aligned_none, _ = align_stack(list(images), AlignOptions())
            identical &= bool(np.array_equal(plain, fuser.fuse(aligned_none).fused))
            aligned, how = align_stack(list(images), AlignOptions(mode="similarity"))  # the sources to score against
            fused = fuser.fuse(align.AlignedPlanes(images, how)).fused  # fused as the runner does for guided
            motion = [align.corner_motion(t, images[0].shape[:2]) for i, t in enumerate(how.transforms) if i != how.reference]
            still += sum(m < align.STILL_PX for m in motion)
            moved_planes += len(motion)
            held += len(how.held)
            acc["none"].append(_quality(images, plain, q_y))
            acc["similarity"].append(_quality(aligned, fused, q_y))
            if not name.startswith("stack_v4"):  # the fused frame against the planes as read
                acc["similarity, vs sources as read"].append(_quality(images, fused, q_y))
            if name.startswith("stack_v4"):
                cost = cost_rounds(fuser, images, how)
        for mode, rows in acc.items():
            if not rows:
                continue
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            quality_lines.append([name, mode, f"{mean['q_g']:.4f}", f"{mean['q_y']:.4f}" if "q_y" in mean else "-",
                                  f"{mean['q_mi']:.4f}", ("yes" if identical else "NO") if mode == "none" else "",
                                  f"{still}/{moved_planes} ({held} held)" if mode == "similarity" else ""])
    return quality_lines, cost


# ------------------------------------------------------------------------- 5. resampling kernels


def _cubic_taps(e: float) -> np.ndarray:
    """4-tap cubic convolution kernel (Keys 1981, a = -0.75 as OpenCV) sampling at +e, taps -1..2."""
    x = np.abs(np.arange(-1, 3) - e)
    a = -0.75
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0)).astype(np.float32)


def _resize_then_shift(img, m, size):
    """Scale + shift maps only: cv2.resize (separable, vectorised) by the exact scale, then the
    sub-pixel phase that resize cannot take (it samples output j at lo + (j + 1/2) a - 1/2 for an
    integer crop start lo) as a 4-tap cubic shift: two interpolations in a row."""
    out = img
    for axis, (a, c) in enumerate(((m[0, 0], m[0, 2]), (m[1, 1], m[1, 2]))):
        n_out, n_in = size[axis], out.shape[1 - axis]
        lo = int(np.floor(c)) - 2
        position = (c - lo + 0.5) / a - 0.5  # resize output index that lands on output 0's source
        j0 = int(np.floor(position))
        hi = lo + int(np.ceil((n_out + j0 + 4) * a)) + 4
        idx = np.clip(np.arange(lo, hi), 0, n_in - 1)  # replicated borders
        part = np.take(out, idx, axis=1 - axis)
        fx, fy = (1 / a, 1.0) if axis == 0 else (1.0, 1 / a)
        r = cv2.resize(part, None, fx=fx, fy=fy, interpolation=cv2.INTER_CUBIC)
        k = _cubic_taps(position - j0)
        r = cv2.filter2D(r, -1, k[None] if axis == 0 else k[:, None], anchor=(1, 0) if axis == 0 else (0, 1),
                         borderType=cv2.BORDER_REPLICATE)
        out = r[:, j0:j0 + n_out] if axis == 0 else r[j0:j0 + n_out]
    return np.ascontiguousarray(out)


def kernel_table(cases, fuser) -> list[list[str]]:
    """CPU ms per 1600x1200 RGB plane (stack_v4, a breathing map) and, for the kernels that can,
    guided fusion of the synthetic stacks with the *true* transforms (PSNR vs registered)."""
    v4 = sorted((DATA / "stack_v4").glob("*.jpg"))
    if not v4:
        return []
    img = io.read_image(str(v4[9]))
    h, w = img.shape[:2]
    m = np.array([[1.031, -0.00024, -20.5], [0.00024, 1.031, -16.2], [0, 0, 1.0]])
    axis_aligned = m.copy()
    axis_aligned[0, 1] = axis_aligned[1, 0] = 0.0
    inv = cv2.WARP_INVERSE_MAP
    rep = cv2.BORDER_REPLICATE
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    map1, map2 = cv2.convertMaps((m[0, 0] * xs + m[0, 1] * ys + m[0, 2]).astype(np.float32),
                                 (m[1, 0] * xs + m[1, 1] * ys + m[1, 2]).astype(np.float32), cv2.CV_16SC2)

    def warp(flag, conv=None):
        def run(x, t, size):
            y = x if conv is None else x.astype(conv)
            out = cv2.warpAffine(y, t[:2], size, flags=flag | inv, borderMode=rep)
            return out if conv is None else np.clip(np.rint(out), 0, 255).astype(x.dtype)
        return run

    kernels = {
        "warpAffine bicubic, uint8 (shipped)": (warp(cv2.INTER_CUBIC), m),
        "warpAffine bicubic, float32 (+ conversions)": (warp(cv2.INTER_CUBIC, np.float32), m),
        "warpAffine bicubic, uint16 (+ conversions)": (warp(cv2.INTER_CUBIC, np.uint16), m),
        "warpAffine bilinear, uint8": (warp(cv2.INTER_LINEAR), m),
        "warpAffine Lanczos-4, uint8": (warp(cv2.INTER_LANCZOS4), m),
        "remap bicubic, fixed-point maps (CV_16SC2)": (lambda x, t, size: cv2.remap(x, map1, map2, cv2.INTER_CUBIC, borderMode=rep), m),
        "resize bicubic by the scale (no sub-pixel phase: not a warp)": (
            lambda x, t, size: cv2.resize(x, None, fx=1 / t[0, 0], fy=1 / t[1, 1], interpolation=cv2.INTER_CUBIC), axis_aligned),
        "resize bicubic + 4-tap cubic phase shift (no rotation)": (_resize_then_shift, axis_aligned),
    }
    lines = []
    for name, (run, t) in kernels.items():
        times = []
        for _ in range(5):
            c0 = time.process_time()
            run(img, t, (w, h))
            times.append(time.process_time() - c0)
        quality = ""
        if cases and "not a warp" not in name and "remap" not in name:
            losses = []
            for stack, truth, moved, transforms in cases:
                mask = valid_region(transforms, truth.shape[:2])
                base = psnr(truth, fuser.fuse(stack).fused, mask)
                ref = len(moved) // 2
                planes = [p if i == ref else run(p, tr, (p.shape[1], p.shape[0])) for i, (p, tr) in enumerate(zip(moved, transforms))]
                losses.append(psnr(truth, fuser.fuse(planes).fused, mask) - base)
            quality = f"{np.mean(losses):+.2f}"
        lines.append([name, f"{1000 * np.median(times):.1f}", quality])
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12, help="BSDS500 val images (sorted by name)")
    p.add_argument("--planes", type=int, default=4, help="planes per synthetic stack")
    p.add_argument("--max-radius", type=float, default=8.0, help="disk PSF radius for the whole depth range")
    p.add_argument("--lytro-pairs", type=int, default=20)
    p.add_argument("--skip-estimators", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--real-only", action="store_true", help="only tables 3 and 4 (real stacks, cost)")
    p.add_argument("--kernels", action="store_true", help="only table 5 (resampling kernels: time and accuracy)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    folder = DATA / "bsds500" / "val"
    if not folder.is_dir():
        print(f"bench/alignment.py: {folder} not found (needs ../shared/data)", file=sys.stderr)
        return 2
    fuser = get_fuser("guided")
    if args.real_only:
        args.skip_estimators = True
        args.images = 0
    if args.kernels:
        cases = list(synthetic_cases(folder, args.images, args.planes, args.max_radius))
        print("5. resampling kernels: CPU ms per 1600x1200 RGB plane (stack_v4, scale 1.031 + shift); "
              "guided fusion of the synthetic stacks with the true transforms, dB vs registered")
        print(format_table(["kernel", "CPU ms / plane", "dB vs registered"], kernel_table(cases, fuser), args.markdown))
        return 0
    cases = list(synthetic_cases(folder, args.images, args.planes, args.max_radius))
    print(f"synthetic: {len(cases)} BSDS500 val images x {args.planes} planes, disk PSF r<={args.max_radius}px, "
          "moved by shifts <= 3% of the width and scales 1 +- 2% (reference: the middle plane)\n")
    if not args.skip_estimators:
        print("1. registration error against the known transforms (corner displacement, px)")
        print(format_table(["estimator", "median", "p90", "max", ">1 px", "ms/plane"], estimator_table(cases),
                           args.markdown) + "\n")
    if cases:
        lines, means = fusion_table(cases, fuser)
        print("2. guided fusion vs truth, PSNR dB on the common valid region")
        print(format_table(["stack", "PSNR", "vs registered", "worst stack vs registered"], lines, args.markdown))
        aligned, base = means["moved, --align similarity"], means["registered (baseline)"]
        unaligned = means["moved, fused unaligned"]
        print(f"similarity: {aligned - base:+.2f} dB vs registered (need >= -0.5), "
              f"{aligned - unaligned:+.2f} dB vs unaligned (need >= +3)\n")
    if not args.skip_real:
        qlines, cost = real_tables(fuser, args.lytro_pairs)
        print("3. real stacks, guided: quality against the sources in the fused frame")
        print(format_table(["set", "align", "Q_G", "Q_Y", "Q_MI", "none bit-identical",
                                     "planes not resampled (no evidence of motion)"], qlines, args.markdown))
        if cost:
            print("\n4. stack_v4 cost: align against guided fusion, alternating rounds (s wall / CPU); "
                  "ratios in CPU time (wall in brackets)")
            r = cost["ratios"]
            lines = [[str(k + 1)] + [f"{t[0]:.2f} / {t[1]:.2f}" for t in row]
                     + [f"{e[1]:.3f} ({e[0]:.3f})", f"{z[1]:.3f} ({z[0]:.3f})", f"{p[1]:.3f} ({p[0]:.3f})"]
                     for k, (row, e, z, p) in enumerate(zip(cost["rounds"], r["eager"], r["lazy"], r["lazy_vs_plain"]))]
            print(format_table(["round", "estimate", "warp all (bicubic)", "guided, warped list", "guided, lazy view",
                                "guided, unaligned", "eager / guided", "lazy / guided", "lazy / unaligned guided"],
                               lines, args.markdown))
            med = {k: np.median(np.array(v), axis=0) for k, v in r.items()}
            print(f"median align / guided, CPU (wall): eager {med['eager'][1]:.3f} ({med['eager'][0]:.3f}), "
                  f"lazy {med['lazy'][1]:.3f} ({med['lazy'][0]:.3f}), lazy vs unaligned guided "
                  f"{med['lazy_vs_plain'][1]:.3f} ({med['lazy_vs_plain'][0]:.3f}) (need <= 0.30)")
            print(f"lazy vs eager fused image: PSNR {cost['psnr_lazy_vs_eager']:.2f} dB, max difference "
                  f"{cost['max_diff']}, index maps agree on {100 * cost['index_agreement']:.2f}% of pixels")
            print("apply time against bicubic: " + ", ".join(f"{k} {t / cost['kernels']['cubic']:.2f}x"
                                                            for k, t in cost["kernels"].items()))
            print(f"   {cost['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
