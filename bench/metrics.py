"""Fusion metrics before and after issue 14, timed in the same run: Q_G, Q_Y, Q_MI on the 20 Lytro pairs.

    .venv/bin/python bench/metrics.py            # ../shared/data/lytro + the survey's CNN results
    .venv/bin/python bench/metrics.py --repeat 5

The baseline is the implementation ray-mff shipped before (float64 ``scipy.ndimage`` filters,
float64 grey conversion and normalisation, one ``_prepare`` per metric), kept below verbatim as
``reference_*``; the package has only the new one. For each pair both versions run alternately
``--repeat`` times and the fastest time of each is kept, so load from other processes on a shared
machine hits both alike. The table gives milliseconds per pair, the speed-up (old / new) and the
largest difference in value over the 20 pairs; ``scores`` is what a pipeline row costs (the three
metrics from one grey conversion, :func:`ray_mff.metrics.evaluate` with ``keys``) against the old
three separate calls. Acceptance: ``scores`` >= 5x, every difference <= 1e-6.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_mff import io, metrics  # noqa: E402
from ray_mff.fusion.luminance import BT601, dtype_max  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ------------------------------------------------------------------------------------------------
# the baseline: ray_mff/metrics.py as it was before issue 14 (verbatim, less docstrings)
# ------------------------------------------------------------------------------------------------

def _round_half_away(x: np.ndarray) -> np.ndarray:
    """MATLAB ``round``: halves go away from zero (numpy's ``rint`` goes to even)."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.copysign(fl + (a - fl >= 0.5), x)


def _grey255(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) image of any dtype -> (H, W) float64 whole grey levels in 0..255."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {a.shape}")
    if a.dtype == np.uint8 and a.ndim == 2:
        return a.astype(np.float64)
    x = a.astype(np.float64)
    if a.dtype != np.uint8:
        # First to 8 bits per channel, as MATLAB im2uint8 does, so that every dtype meets the
        # same rgb2gray rounding (a float image equal to uint8 / 255 scores exactly the same).
        if a.dtype.kind == "f":
            x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * 255.0
        elif a.dtype.kind in "ui":
            x = np.clip(x, 0.0, None) * 255.0 / dtype_max(a.dtype)
        else:
            raise ValueError(f"unsupported dtype {a.dtype}")
        x = _round_half_away(x)
    if x.ndim == 3:
        if x.shape[2] in (3, 4):
            # MATLAB rgb2gray: first row of the NTSC (YIQ) inverse matrix, applied in double.
            x = x[..., 0] * BT601[0] + x[..., 1] * BT601[1] + x[..., 2] * BT601[2]
        else:
            x = x.mean(axis=2)
    # rgb2gray on uint8 returns uint8: rounded (half away from zero) and saturated.
    return np.clip(_round_half_away(x), 0.0, 255.0)


def _prepare(sources: Sequence[np.ndarray], fused: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Sources and fused image -> N (H, W) uint8 grey images and one (H, W) uint8 grey image.

    Kept as uint8 (the values are whole grey levels) so that large stacks stay small; each
    metric takes float64 copies one image at a time.
    """
    srcs = list(sources)
    if len(srcs) < 2:
        raise ValueError(f"fusion metrics need at least 2 source images, got {len(srcs)}")
    g_f = _grey255(fused).astype(np.uint8)
    g_src = []
    for i, s in enumerate(srcs):
        g = _grey255(s).astype(np.uint8)
        if g.shape != g_f.shape:
            raise ValueError(f"source {i} is {g.shape[0]}x{g.shape[1]} but the fused image is "
                             f"{g_f.shape[0]}x{g_f.shape[1]}")
        g_src.append(g)
    return g_src, g_f


_QG_GAMMA_G, _QG_K_G, _QG_SIGMA_G = 0.9994, -15.0, 0.5
_QG_GAMMA_A, _QG_K_A, _QG_SIGMA_A = 0.9879, -22.0, 0.8
_QG_L = 1.0
_TINY = 1e-5  # the survey's guard against 0/0 in gradient ratios and atan(gy/0)


def _sobel_strength_angle(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel edge strength g and orientation alpha = atan(gy/gx), Xydeas & Petrovic Eqs. (1)-(2).

    Correlation with zero padding, as MATLAB ``filter2(h, x, 'same')``:
    gx with [-1 0 1; -2 0 2; -1 0 1], gy with [-1 -2 -1; 0 0 0; 1 2 1].
    """
    smooth_rows = ndimage.correlate1d(x, [1.0, 2.0, 1.0], axis=0, mode="constant")
    smooth_cols = ndimage.correlate1d(x, [1.0, 2.0, 1.0], axis=1, mode="constant")
    gx = ndimage.correlate1d(smooth_rows, [-1.0, 0.0, 1.0], axis=1, mode="constant")
    gy = ndimage.correlate1d(smooth_cols, [-1.0, 0.0, 1.0], axis=0, mode="constant")
    g = np.sqrt(gx * gx + gy * gy)
    gx = gx + (gx == 0) * _TINY
    return g, np.arctan(gy / gx)


def _q_g(srcs: list[np.ndarray], f: np.ndarray) -> float:
    g_f, a_f = _sobel_strength_angle(f.astype(np.float64))
    num = 0.0
    den = 0.0
    for s in srcs:
        g_s, a_s = _sobel_strength_angle(s.astype(np.float64))
        # Relative strength G^{AF}, Eq. (3): the smaller gradient over the larger one. The
        # survey's code guards zeros in place, source by source (g_f keeps its guard for the
        # next source); we follow that order so N = 2 is the published number bit for bit.
        larger_src = g_s > g_f
        g_s = g_s + (g_s == 0) * _TINY
        ratio_f_over_s = g_f / g_s
        g_f = g_f + (g_f == 0) * _TINY
        ratio_s_over_f = g_s / g_f
        g_rel = np.where(larger_src, ratio_f_over_s, ratio_s_over_f)
        # Relative orientation A^{AF}, Eq. (4): 1 - |alpha_A - alpha_F| / (pi/2).
        a_rel = 1.0 - np.abs(a_s - a_f) * 2.0 / np.pi
        # Edge-strength and orientation preservation, Eqs. (5)-(7).
        q_sf = (_QG_GAMMA_G / (1.0 + np.exp(_QG_K_G * (g_rel - _QG_SIGMA_G)))
                * _QG_GAMMA_A / (1.0 + np.exp(_QG_K_A * (a_rel - _QG_SIGMA_A))))
        # Eq. (8): edge-strength-weighted sum; with N sources the sums run over all of them.
        w = g_s ** _QG_L
        num += float(np.sum(q_sf * w))
        den += float(np.sum(w))
    return num / den


_QY_WIN, _QY_SIGMA = 7, 1.5
_QY_C1 = _QY_C2 = 2e-16
_QY_THRESHOLD = 0.75
_QY_BAND_ELEMENTS = 1 << 22  # pixels per moment array across all images of one band (~32 MB)


def _gauss_valid(x: np.ndarray) -> np.ndarray:
    """MATLAB ``filter2(fspecial('gaussian', 7, 1.5), x, 'valid')``; the window is separable."""
    r = _QY_WIN // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t * t) / (2.0 * _QY_SIGMA * _QY_SIGMA))
    g /= g.sum()
    y = ndimage.correlate1d(x, g, axis=0, mode="constant")
    y = ndimage.correlate1d(y, g, axis=1, mode="constant")
    return y[r:-r, r:-r]


class _LocalMoments:
    """Gaussian-window means and variances of one image, cached for the SSIM maps (Wang 2004)."""

    __slots__ = ("x", "mu", "mu_sq", "var", "flat")

    def __init__(self, x: np.ndarray):
        self.x = x
        self.mu = _gauss_valid(x)
        self.mu_sq = self.mu * self.mu
        r = _QY_WIN // 2
        # Windows where the image is constant have zero variance (and zero covariance with
        # anything). E[x^2] - mu^2 leaves round-off there (~1e-12, far above C2 = 2e-16) which
        # turns the SSIM structure term into noise; the survey's values (its NaN guard for
        # sigma_A^2 + sigma_B^2 == 0 shows MATLAB met exact zeros) are reproduced only with the
        # exact zero. Inputs are whole grey levels, so any other window has variance >= 1e-3.
        self.flat = (ndimage.maximum_filter(x, _QY_WIN, mode="nearest")
                     == ndimage.minimum_filter(x, _QY_WIN, mode="nearest"))[r:-r, r:-r]
        self.var = np.where(self.flat, 0.0, _gauss_valid(x * x) - self.mu_sq)


def _ssim_map(p: _LocalMoments, q: _LocalMoments) -> np.ndarray:
    """SSIM map of two images, Wang et al. 2004 Eq. (13) with C1 = C2 = 2e-16 (Yang 2008)."""
    mu_pq = p.mu * q.mu
    cov = np.where(p.flat | q.flat, 0.0, _gauss_valid(p.x * q.x) - mu_pq)
    return (((2.0 * mu_pq + _QY_C1) * (2.0 * cov + _QY_C2))
            / ((p.mu_sq + q.mu_sq + _QY_C1) * (p.var + q.var + _QY_C2)))


def _q_y_band(srcs: list[np.ndarray], f: np.ndarray) -> float:
    """Sum of Yang's quality map over the 'valid' windows of one band of rows."""
    mom = [_LocalMoments(s.astype(np.float64)) for s in srcs]
    mom_f = _LocalMoments(f.astype(np.float64))
    # Redundant windows (Yang 2008, first case of Q_Y): the sources are similar,
    # SSIM(A, B) >= 0.75; with N sources: every pair of sources is similar (min over pairs).
    ssim_src = None
    for i, j in combinations(range(len(mom)), 2):
        m = _ssim_map(mom[i], mom[j])
        ssim_src = m if ssim_src is None else np.minimum(ssim_src, m)
    similar = ssim_src >= _QY_THRESHOLD
    # Local weights lambda_n = sigma_n^2 / sum sigma^2 (Yang 2008); where all variances are
    # exactly 0 the survey adds 0.5 to each (equal weights), i.e. 1/N here.
    var_sum = mom[0].var
    for m in mom[1:]:
        var_sum = var_sum + m.var
    no_var = var_sum == 0
    var_sum = np.where(no_var, 1.0, var_sum)
    weighted = np.zeros_like(var_sum)
    best = None
    for m in mom:
        sf = _ssim_map(m, mom_f)
        weighted += np.where(no_var, 1.0 / len(mom), m.var / var_sum) * sf
        best = sf if best is None else np.maximum(best, sf)
    return float(np.sum(np.where(similar, weighted, best)))


def _q_y(srcs: list[np.ndarray], f: np.ndarray) -> float:
    h, w = f.shape
    if min(h, w) < _QY_WIN:
        raise ValueError(f"Q_Y needs images of at least {_QY_WIN}x{_QY_WIN} pixels, got {f.shape}")
    r = _QY_WIN // 2
    out_h, out_w = h - 2 * r, w - 2 * r
    # The quality map is local (7x7 windows), so large stacks are scored in bands of rows to
    # bound memory; every window is computed exactly as in one pass.
    band = max(1, _QY_BAND_ELEMENTS // ((len(srcs) + 1) * w))
    total = 0.0
    for y0 in range(0, out_h, band):
        rows = slice(y0, min(out_h, y0 + band) + 2 * r)
        total += _q_y_band([s[rows] for s in srcs], f[rows])
    return total / (out_h * out_w)


def _normalize255(x: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..255 and round, as the survey's ``normalize1``.

    An all-zero image stays as is (as in the survey); another constant image, which the survey
    turns into NaN, maps to 0.
    """
    x = np.asarray(x, dtype=np.float64)
    hi, lo = float(x.max()), float(x.min())
    if hi == lo:
        return np.zeros_like(x)
    # Same operation order as the MATLAB code so rounding ties fall the same way.
    return _round_half_away(((x - lo) / (hi - lo)) * 255.0)


def _entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of a probability array (zeros contribute nothing)."""
    p = p[p > 0]
    return float(0.0 - np.sum(p * np.log2(p)))


def _mi_terms(x: np.ndarray, f: np.ndarray) -> tuple[float, float, float]:
    """Mutual information I(X;F), H(X), H(F) in bits from the 256x256 joint histogram."""
    xi = x.astype(np.int64).ravel()
    fi = f.astype(np.int64).ravel()
    joint = np.bincount(xi * 256 + fi, minlength=256 * 256).astype(np.float64)
    joint /= joint.sum()
    joint = joint.reshape(256, 256)
    h_x = _entropy_bits(joint.sum(axis=1))
    h_f = _entropy_bits(joint.sum(axis=0))
    h_xf = _entropy_bits(joint.ravel())
    return h_x + h_f - h_xf, h_x, h_f


def _q_mi(srcs: list[np.ndarray], f: np.ndarray) -> float:
    f8 = _normalize255(f)
    total = 0.0
    for s in srcs:
        mi, h_s, h_f = _mi_terms(_normalize255(s), f8)
        # Hossny 2008: MI normalised by the two marginal entropies; 0 when both are constant.
        total += mi / (h_s + h_f) if h_s + h_f > 0 else 0.0
    # 2 [I(A,F)/(H(A)+H(F)) + I(B,F)/(H(B)+H(F))] for N = 2; 2 * (2/N) * sum for N sources.
    return 2.0 * (2.0 / len(srcs)) * total

def reference_q_g(sources, fused) -> float:
    return _q_g(*_prepare(sources, fused))


def reference_q_y(sources, fused) -> float:
    return _q_y(*_prepare(sources, fused))


def reference_q_mi(sources, fused) -> float:
    return _q_mi(*_prepare(sources, fused))


def reference_scores(sources, fused) -> dict[str, float]:
    """What the runner did per stack: three metrics, each converting to grey again."""
    return {"q_g": reference_q_g(sources, fused), "q_y": reference_q_y(sources, fused),
            "q_mi": reference_q_mi(sources, fused)}


# ------------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------------

KEYS = ("q_g", "q_y", "q_mi")
CASES = {
    "q_g": (reference_q_g, metrics.q_g),
    "q_y": (reference_q_y, metrics.q_y),
    "q_mi": (reference_q_mi, metrics.q_mi),
    "scores": (reference_scores, lambda s, f: metrics.evaluate(s, f, keys=KEYS)),
}


def _fastest(fn, *args, repeat: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, value


def _as_dict(value) -> dict[str, float]:
    return value if isinstance(value, dict) else {"value": value}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (lytro/, lytro_results/)")
    p.add_argument("--fused", default="cnn", help="lytro_results/<NAME>/ holds the fused images scored")
    p.add_argument("--repeat", type=int, default=5, help="runs per pair and version; the fastest counts")
    p.add_argument("--threads", type=int, default=1,
                   help="OpenCV and torch threads (default 1: one core per scoring task, as in the pipeline; 0 = their defaults)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        cv2.setNumThreads(args.threads)
        torch.set_num_threads(args.threads)
    if not (args.data / "lytro").is_dir():
        print(f"no Lytro pairs under {args.data}", file=sys.stderr)
        return 2
    pairs = [([io.read_image(str(args.data / "lytro" / f"lytro_{i:02d}_{s}.png")) for s in "AB"],
              io.read_image(str(args.data / "lytro_results" / args.fused / f"lytro_{i:02d}.png")))
             for i in range(1, 21)]
    rows, ok = [], True
    for name, (old, new) in CASES.items():
        t_old = t_new = 0.0
        worst = 0.0
        for sources, fused in pairs:
            # alternate, so a burst of load elsewhere does not favour one version
            a, v_old = _fastest(old, sources, fused, repeat=1)
            b, v_new = _fastest(new, sources, fused, repeat=1)
            for _ in range(args.repeat - 1):
                a = min(a, _fastest(old, sources, fused, repeat=1)[0])
                b = min(b, _fastest(new, sources, fused, repeat=1)[0])
            t_old, t_new = t_old + a, t_new + b
            d_old, d_new = _as_dict(v_old), _as_dict(v_new)
            worst = max([worst] + [abs(d_old[k] - d_new[k]) for k in d_old])
        rows.append((name, 1000 * t_old / len(pairs), 1000 * t_new / len(pairs), t_old / t_new, worst))
        ok &= worst <= 1e-6
    print(f"\n20 Lytro pairs (520x520 RGB) against lytro_results/{args.fused}; fastest of {args.repeat} per pair")
    header = f"{'metric':<8}{'old ms':>9}{'new ms':>9}{'speed-up':>10}{'max |diff|':>12}"
    print(header)
    print("-" * len(header))
    for name, a, b, ratio, worst in rows:
        print(f"{name:<8}{a:>9.1f}{b:>9.1f}{ratio:>9.1f}x{worst:>12.1e}")
    speedup = rows[-1][3]
    ok &= speedup >= 5.0
    print(f"scores speed-up {speedup:.1f}x (target >= 5), largest difference {max(r[4] for r in rows):.1e} "
          f"(target <= 1e-6): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
