"""Objective quality metrics for multi-focus image fusion.

Fusion metrics (no ground truth; the fused image is scored against its N >= 2 sources), defined
as in the MATLAB evaluation code of Yu Liu et al., "Multi-focus image fusion: A survey of the
state of the art", Information Fusion 64 (2020) (github.com/yuliu316316/MFIF), whose Table 7 is
the reference this module reproduces (see tests/test_metrics.py):

- ``q_g``  Xydeas & Petrovic gradient-based edge preservation, Q^{AB/F}.
- ``q_y``  Yang et al. SSIM-based structural similarity, Q_Y.
- ``q_mi`` Hossny et al. normalised mutual information, Q_MI.
- ``q_cb`` Chen & Blum human-perception-based contrast preservation, Q_CB.

Full-reference metrics against a ground-truth all-in-focus image: ``psnr``, ``ssim``.
Single-image statistics of a fused image: ``spatial_frequency``, ``average_gradient``, ``entropy``.
``evaluate(sources, fused, truth=None)`` computes the fusion metrics (and PSNR/SSIM) in one call.

Grey scale
----------
Every metric except ``psnr``/``ssim`` works on an 8-bit grey image, as the survey's code does
(``rgb2gray`` on uint8, then ``double``):

- uint8 colour (H, W, 3|4): ``round(0.298936 R + 0.587043 G + 0.114021 B)`` like MATLAB
  ``rgb2gray`` (alpha ignored); uint8 grey (H, W) or (H, W, 1) is used as is.
- other dtypes are first brought to 8 bits per channel like MATLAB ``im2uint8`` (uint16:
  round(x * 255 / 65535); float: round(clip(x, 0, 1) * 255)), then converted the same way.
  Hence a uint16 image equal to ``uint8 * 257`` or a float32 image equal to ``uint8 / 255``
  scores exactly like its uint8 original; finer levels do not enter the metrics, whose
  published values are defined on 8-bit grey images.
- other channel counts (multichannel microscopy) use the channel mean.

Inputs are numpy arrays (H, W) or (H, W, C); all sources and the fused image must have the
same height and width. Returned values are Python floats.

Example
-------
>>> import numpy as np
>>> from ray_mff import metrics
>>> rng = np.random.default_rng(0)
>>> a = rng.integers(0, 256, (64, 64), dtype=np.uint8)
>>> round(metrics.q_mi([a, a], a), 6)   # a perfect copy of identical sources
2.0
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import cv2
import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from ray_mff.fusion.luminance import BT601, dtype_max

__all__ = [
    "q_g",
    "q_y",
    "q_mi",
    "q_cb",
    "psnr",
    "ssim",
    "spatial_frequency",
    "average_gradient",
    "entropy",
    "evaluate",
]


# --------------------------------------------------------------------------------------------
# grey conversion and input checks
# --------------------------------------------------------------------------------------------

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
    if a.dtype == np.uint8:
        return _grey8(a).astype(np.float64)
    x = a.astype(np.float64)
    # First to 8 bits per channel, as MATLAB im2uint8 does, so that every dtype meets the
    # same rgb2gray rounding (a float image equal to uint8 / 255 scores exactly the same).
    if a.dtype.kind == "f":
        x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * 255.0
    elif a.dtype.kind in "ui":
        x = np.clip(x, 0.0, None) * 255.0 / dtype_max(a.dtype)
    else:
        raise ValueError(f"unsupported dtype {a.dtype}")
    return _grey8(_round_half_away(x).astype(np.uint8)).astype(np.float64)


# rgb2gray's products of each 8-bit level with its weight, tabulated per channel:
# T[0, v, c] == v * BT601[c] exactly, so T[R] + T[G] + T[B] is the double sum MATLAB forms.
_RGB2GRAY_LUT = np.ascontiguousarray(
    (np.arange(256, dtype=np.float64)[:, None] * np.asarray(BT601[:3], dtype=np.float64)[None, :])[None])


def _grey8(a: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> (H, W) uint8 grey, as MATLAB ``rgb2gray`` on uint8."""
    if a.ndim == 2:
        return a
    if a.shape[2] in (3, 4):
        # MATLAB rgb2gray: first row of the NTSC (YIQ) inverse matrix, applied in double.
        t = cv2.LUT(np.ascontiguousarray(a[..., :3]), _RGB2GRAY_LUT)
        x = t[..., 0] + t[..., 1]
        x += t[..., 2]
    else:
        x = a.mean(axis=2)
    # rgb2gray on uint8 returns uint8: rounded half away from zero (x >= 0: floor(x + 0.5)),
    # saturated.
    x += 0.5
    np.minimum(x, 255.0, out=x)
    return x.astype(np.uint8)


def _grey_u8(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8 and a.ndim in (2, 3) and a.size:
        return _grey8(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)
    return _grey255(a).astype(np.uint8)


def _prepare(sources: Sequence[np.ndarray], fused: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Sources and fused image -> N (H, W) uint8 grey images and one (H, W) uint8 grey image.

    Kept as uint8 (the values are whole grey levels) so that large stacks stay small; each
    metric takes float64 copies one image at a time.
    """
    srcs = list(sources)
    if len(srcs) < 2:
        raise ValueError(f"fusion metrics need at least 2 source images, got {len(srcs)}")
    g_f = _grey_u8(fused)
    g_src = []
    for i, s in enumerate(srcs):
        g = _grey_u8(s)
        if g.shape != g_f.shape:
            raise ValueError(f"source {i} is {g.shape[0]}x{g.shape[1]} but the fused image is "
                             f"{g_f.shape[0]}x{g_f.shape[1]}")
        g_src.append(g)
    return g_src, g_f


# --------------------------------------------------------------------------------------------
# Q_G: Xydeas & Petrovic
# --------------------------------------------------------------------------------------------

# Sigmoid constants of Xydeas & Petrovic, "Objective image fusion performance measure",
# Electronics Letters 36(4) (2000), Eqs. (5)-(6), with the values the survey reads off Fig. 1.
_QG_GAMMA_G, _QG_K_G, _QG_SIGMA_G = 0.9994, -15.0, 0.5
_QG_GAMMA_A, _QG_K_A, _QG_SIGMA_A = 0.9879, -22.0, 0.8
_TINY = 1e-5  # the survey's guard against 0/0 in gradient ratios and atan(gy/0)


_SOBEL_SMOOTH = np.array([1.0, 2.0, 1.0], dtype=np.float32)
_SOBEL_DIFF = np.array([-1.0, 0.0, 1.0], dtype=np.float32)


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sobel gradients gx, gy and edge strength g of a uint8 image, Xydeas & Petrovic Eq. (1).

    Correlation with zero padding, as MATLAB ``filter2(h, x, 'same')``:
    gx with [-1 0 1; -2 0 2; -1 0 1], gy with [-1 -2 -1; 0 0 0; 1 2 1]. The gradients are whole
    numbers below 2^11, exact in float32; gx == 0 is replaced by 1e-5 as the survey does before
    its atan(gy / gx).
    """
    gx = cv2.sepFilter2D(x, cv2.CV_32F, _SOBEL_DIFF, _SOBEL_SMOOTH, borderType=cv2.BORDER_CONSTANT)
    gy = cv2.sepFilter2D(x, cv2.CV_32F, _SOBEL_SMOOTH, _SOBEL_DIFF, borderType=cv2.BORDER_CONSTANT)
    g = cv2.magnitude(gx, gy)
    gx[gx == 0] = _TINY
    return gx, gy, g


def _orientation_difference(gx_s, gy_s, gx_f, gy_f) -> np.ndarray:
    """|alpha_S - alpha_F| with alpha = atan(gy / gx), Xydeas & Petrovic Eqs. (2) and (4).

    With u = tan alpha_S, v = tan alpha_F: sin(alpha_S - alpha_F) and cos(alpha_S - alpha_F) are
    (u - v) and (1 + u v) times cos alpha_S cos alpha_F > 0, so the difference is
    atan2(|u - v|, 1 + u v); multiplied through by |gx_S gx_F| this is the angle of a cross and
    a dot product: one atan per source instead of one per image and source. numpy's float32
    ``arctan`` is vectorised (its ``arctan2`` is not, and is several times slower), so the
    quadrant is restored by hand: atan(|cross| / |dot|), or pi minus it where the dot is negative.
    """
    cross = gy_s * gx_f
    cross -= gy_f * gx_s
    np.abs(cross, out=cross)
    dot = gx_s * gx_f
    flip = dot < 0
    dot += gy_s * gy_f
    np.not_equal(flip, dot < 0, out=flip)  # sign of (1 + u v) = sign(dot) * sign(gx_S gx_F)
    np.abs(dot, out=dot)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.arctan(np.divide(cross, dot, out=cross), out=cross)  # cross / 0 -> inf -> pi/2
    np.subtract(np.float32(np.pi), angle, out=angle, where=flip)
    return angle


def _sigmoid(x: np.ndarray, gamma: float, k: float, sigma: float) -> np.ndarray:
    """gamma / (1 + exp(k (x - sigma))), in place on ``x`` (Xydeas & Petrovic Eqs. (5)-(6))."""
    x -= sigma
    x *= k
    np.exp(x, out=x)
    x += 1.0
    np.divide(gamma, x, out=x)
    return x


def _q_g(srcs: list[np.ndarray], f: np.ndarray) -> float:
    gx_f, gy_f, g_f = _sobel(f)
    num = 0.0
    den = 0.0
    for s in srcs:
        gx_s, gy_s, g_s = _sobel(s)
        # Relative strength G^{AF}, Eq. (3): the smaller gradient over the larger one. The
        # survey's code guards zeros in place, source by source (g_f keeps its guard for the
        # next source); we follow that order so N = 2 is the published number.
        larger_src = g_s > g_f
        g_s[g_s == 0] = _TINY
        ratio_f_over_s = g_f / g_s
        g_f[g_f == 0] = _TINY
        g_rel = np.divide(g_s, g_f)
        np.copyto(g_rel, ratio_f_over_s, where=larger_src)
        # Relative orientation A^{AF}, Eq. (4): 1 - |alpha_A - alpha_F| / (pi/2).
        a_rel = _orientation_difference(gx_s, gy_s, gx_f, gy_f)
        a_rel *= np.float32(-2.0 / np.pi)
        a_rel += 1.0
        # Edge-strength and orientation preservation, Eqs. (5)-(7).
        q_sf = _sigmoid(g_rel, _QG_GAMMA_G, _QG_K_G, _QG_SIGMA_G)
        q_sf *= _sigmoid(a_rel, _QG_GAMMA_A, _QG_K_A, _QG_SIGMA_A)
        # Eq. (8): edge-strength-weighted sum (L = 1); with N sources the sums run over all of
        # them. Sums in float64.
        q_sf *= g_s
        num += float(np.sum(q_sf, dtype=np.float64))
        den += float(np.sum(g_s, dtype=np.float64))
    return num / den


def q_g(sources: Sequence[np.ndarray], fused: np.ndarray) -> float:
    """Xydeas-Petrovic gradient-based fusion metric Q^{AB/F} in [0, 1] (higher is better).

    C. S. Xydeas, V. Petrovic, "Objective image fusion performance measure", Electronics
    Letters 36(4):308-309 (2000), as implemented in the MFIF survey (Liu et al. 2020,
    ``metricXydeas``): Sobel gradients with zero padding, Gamma_g=0.9994, k_g=-15,
    sigma_g=0.5, Gamma_a=0.9879, k_a=-22, sigma_a=0.8, L=1.

    N sources: Q = sum_n sum_px Q^{S_n F} w_n / sum_n sum_px w_n with w_n the Sobel edge strength
    of source n, i.e. Eq. (8) summed over all sources (N = 2 is the published formula).

    Args:
        sources: N >= 2 images (H, W) or (H, W, C).
        fused: the fused image, same H, W.
    """
    srcs, f = _prepare(sources, fused)
    return _q_g(srcs, f)


# --------------------------------------------------------------------------------------------
# Q_Y: Yang et al.
# --------------------------------------------------------------------------------------------

_QY_WIN, _QY_SIGMA = 7, 1.5
_QY_C1 = _QY_C2 = 2e-16
_QY_THRESHOLD = 0.75
# Pixels per band across all images: the map is computed in bands of rows that stay in cache
# (and bound memory on large stacks); about 64 rows of a 520-pixel pair with its fused image.
_QY_BAND_ELEMENTS = 1 << 17


def _gauss_kernel(size: int, sigma: float) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)`` is the outer product of this 1-D kernel."""
    r = size // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return g / g.sum()


_QY_KERNEL = _gauss_kernel(_QY_WIN, _QY_SIGMA)
_QY_BOX = np.ones((_QY_WIN, _QY_WIN), np.uint8)


def _gauss_valid(x: np.ndarray) -> np.ndarray:
    """MATLAB ``filter2(fspecial('gaussian', 7, 1.5), x, 'valid')`` in float64, from a uint8 or
    uint16 image; the window is separable, and 'valid' windows never reach the border, so
    OpenCV's border mode is moot."""
    r = _QY_WIN // 2
    return cv2.sepFilter2D(x, cv2.CV_64F, _QY_KERNEL, _QY_KERNEL)[r:-r, r:-r]


class _LocalMoments:
    """Gaussian-window means and variances of one uint8 image, cached for the SSIM maps (Wang 2004).

    All in float64: E[x^2] - mu^2 cancels (x^2 reaches 65025), and float32 would move Q_Y by
    ~1e-5. OpenCV filters the uint8 image and its exact uint16 squares and products directly.
    """

    __slots__ = ("x", "mu", "mu_sq_c", "var", "var_c", "flat")

    def __init__(self, x: np.ndarray):
        self.x = x
        self.mu = _gauss_valid(x)
        r = _QY_WIN // 2
        # Windows where the image is constant have zero variance (and zero covariance with
        # anything). E[x^2] - mu^2 leaves round-off there (~1e-12, far above C2 = 2e-16) which
        # turns the SSIM structure term into noise; the survey's values (its NaN guard for
        # sigma_A^2 + sigma_B^2 == 0 shows MATLAB met exact zeros) are reproduced only with the
        # exact zero. Inputs are whole grey levels, so any other window has variance >= 1e-3.
        self.flat = (cv2.dilate(x, _QY_BOX) == cv2.erode(x, _QY_BOX))[r:-r, r:-r]
        mu_sq = self.mu * self.mu
        self.var = _gauss_valid(cv2.multiply(x, x, dtype=cv2.CV_16U))
        self.var -= mu_sq
        self.var[self.flat] = 0.0
        # mu^2 + C1/2 and var + C2/2: the SSIM denominators' terms, constants halved (_ssim_map)
        mu_sq += _QY_C1 / 2
        self.mu_sq_c = mu_sq
        self.var_c = self.var + _QY_C2 / 2


def _ssim_map(p: _LocalMoments, q: _LocalMoments) -> np.ndarray:
    """SSIM map of two images, Wang et al. 2004 Eq. (13) with C1 = C2 = 2e-16 (Yang 2008).

    ((2 mu_pq + C1)(2 cov + C2)) / ((mu_p^2 + mu_q^2 + C1)(var_p + var_q + C2)), in place, with
    the constants halved into per-image terms (``mu_sq_c``, ``var_c``) and the factor 4 applied
    last, which saves passes over the band and moves the result by ~1e-16.
    """
    mu_pq = p.mu * q.mu
    cov = _gauss_valid(cv2.multiply(p.x, q.x, dtype=cv2.CV_16U))
    cov -= mu_pq
    cov[p.flat | q.flat] = 0.0
    cov += _QY_C2 / 2
    mu_pq += _QY_C1 / 2
    cov *= mu_pq
    den = p.mu_sq_c + q.mu_sq_c
    den *= p.var_c + q.var_c
    cov /= den
    cov *= 4.0
    return cov


def _q_y_band(srcs: list[np.ndarray], f: np.ndarray) -> float:
    """Sum of Yang's quality map over the 'valid' windows of one band of rows."""
    mom = [_LocalMoments(s) for s in srcs]
    mom_f = _LocalMoments(f)
    # Redundant windows (Yang 2008, first case of Q_Y): the sources are similar,
    # SSIM(A, B) >= 0.75; with N sources: every pair of sources is similar (min over pairs).
    ssim_src = None
    for i, j in combinations(range(len(mom)), 2):
        m = _ssim_map(mom[i], mom[j])
        ssim_src = m if ssim_src is None else np.minimum(ssim_src, m, out=ssim_src)
    similar = ssim_src >= _QY_THRESHOLD
    # Local weights lambda_n = sigma_n^2 / sum sigma^2 (Yang 2008); where all variances are
    # exactly 0 the survey adds 0.5 to each (equal weights), i.e. 1/N here.
    var_sum = mom[0].var.copy()
    for m in mom[1:]:
        var_sum += m.var
    no_var = var_sum == 0
    var_sum[no_var] = 1.0
    weighted = np.zeros_like(var_sum)
    best = None
    for m in mom:
        sf = _ssim_map(m, mom_f)
        lam = m.var / var_sum
        lam[no_var] = 1.0 / len(mom)
        lam *= sf
        weighted += lam
        best = sf if best is None else np.maximum(best, sf, out=best)
    np.copyto(best, weighted, where=similar)
    return float(np.sum(best, dtype=np.float64))


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


def q_y(sources: Sequence[np.ndarray], fused: np.ndarray) -> float:
    """Yang's SSIM-based fusion metric Q_Y (at most 1, higher is better).

    C. Yang, J.-Q. Zhang, X.-R. Wang, X. Liu, "A novel similarity based quality metric for image
    fusion", Information Fusion 9(2):156-160 (2008), as in the MFIF survey's ``metricYang``:
    SSIM maps with a normalised 7x7 Gaussian window (sigma 1.5), 'valid' filtering,
    C1 = C2 = 2e-16; per window, if SSIM(A, B) >= 0.75 use
    lambda SSIM(A, F) + (1 - lambda) SSIM(B, F) with lambda = sigma_A^2 / (sigma_A^2 + sigma_B^2),
    else max(SSIM(A, F), SSIM(B, F)); the mean over windows.

    N sources (our generalisation, equal to the above for N = 2): a window is redundant when
    every pair of sources has SSIM >= 0.75 (the minimum over pairs); there the score is
    sum_n lambda_n SSIM(S_n, F) with lambda_n = sigma_n^2 / sum_m sigma_m^2, elsewhere
    max_n SSIM(S_n, F). Time grows as N (N - 1) / 2 pairwise SSIM maps (about 0.1 s each per
    2 megapixels: fine for pairs and small stacks, minutes for a 65-image stack); memory stays
    bounded (bands of rows).

    Args:
        sources: N >= 2 images (H, W) or (H, W, C), H, W >= 7.
        fused: the fused image, same H, W.
    """
    srcs, f = _prepare(sources, fused)
    return _q_y(srcs, f)


# --------------------------------------------------------------------------------------------
# Q_MI: Hossny et al.
# --------------------------------------------------------------------------------------------

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


def _normalize_u8(x: np.ndarray) -> np.ndarray:
    """:func:`_normalize255` of a uint8 grey image, as uint8: the 256 possible levels are
    scaled once (the same double arithmetic) and looked up."""
    lo, hi = cv2.minMaxLoc(x)[:2]
    if hi == lo:
        return np.zeros_like(x)
    return _normalize255(np.arange(256, dtype=np.float64).clip(lo, hi)).astype(np.uint8)[x]


def _entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of a probability array (zeros contribute nothing)."""
    p = p[p > 0]
    return float(0.0 - np.sum(p * np.log2(p)))


def _joint_histogram(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    """256 x 256 joint histogram (float64 counts) of two uint8 images, rows indexed by ``x``.

    OpenCV counts in float32, exact below 2^24 per bin; larger images use ``np.bincount``.
    """
    if x.size < 1 << 24:
        return cv2.calcHist([x, f], [0, 1], None, [256, 256], [0, 256, 0, 256]).astype(np.float64)
    codes = x.ravel().astype(np.int32) * 256 + f.ravel()
    return np.bincount(codes, minlength=256 * 256).astype(np.float64).reshape(256, 256)


def _mi_terms(x: np.ndarray, f: np.ndarray, h_f: float) -> tuple[float, float]:
    """Mutual information I(X;F) and H(X) in bits from the 256x256 joint histogram; H(F) given."""
    joint = _joint_histogram(x, f)
    joint /= x.size
    h_x = _entropy_bits(joint.sum(axis=1))
    h_xf = _entropy_bits(joint.ravel())
    return h_x + h_f - h_xf, h_x


def _q_mi(srcs: list[np.ndarray], f: np.ndarray) -> float:
    f8 = _normalize_u8(f)
    h_f = _entropy_bits(np.bincount(f8.ravel(), minlength=256) / f8.size)
    total = 0.0
    for s in srcs:
        mi, h_s = _mi_terms(_normalize_u8(s), f8, h_f)
        # Hossny 2008: MI normalised by the two marginal entropies; 0 when both are constant.
        total += mi / (h_s + h_f) if h_s + h_f > 0 else 0.0
    # 2 [I(A,F)/(H(A)+H(F)) + I(B,F)/(H(B)+H(F))] for N = 2; 2 * (2/N) * sum for N sources.
    return 2.0 * (2.0 / len(srcs)) * total


def q_mi(sources: Sequence[np.ndarray], fused: np.ndarray) -> float:
    """Hossny's normalised mutual information Q_MI in [0, 2] (higher is better).

    M. Hossny, S. Nahavandi, D. Creighton, "Comments on 'Information measure for performance of
    image fusion'", Electronics Letters 44(18):1066-1067 (2008), as the survey's ``metricMI``
    (sw=1): every image min-max scaled to 0..255 and rounded, 256-bin joint histograms,
    Q_MI = 2 [I(A;F) / (H(A) + H(F)) + I(B;F) / (H(B) + H(F))] with entropies in bits.

    N sources: Q_MI = 2 (2/N) sum_n I(S_n;F) / (H(S_n) + H(F)), so duplicated sources do not
    change the score and N = 2 is the published formula.

    Args:
        sources: N >= 2 images (H, W) or (H, W, C).
        fused: the fused image, same H, W.
    """
    srcs, f = _prepare(sources, fused)
    return _q_mi(srcs, f)


# --------------------------------------------------------------------------------------------
# Q_CB: Chen & Blum
# --------------------------------------------------------------------------------------------

# Chen & Blum, "A new automated quality assessment algorithm for image fusion", Image and Vision
# Computing 27(10):1421-1432 (2009), with the survey's parameters: the difference-of-Gaussians
# contrast sensitivity function (f0, f1, a), Peli's band-limited local contrast (E. Peli, JOSA A
# 7(10), 1990) with Gaussian sigmas 2 and 4 on a 31x31 support, and contrast masking
# k C^p / (h C^q + Z) with k=1, h=1, p=3, q=2, Z=1e-4.
_CB_F0, _CB_F1, _CB_A = 15.3870, 1.3456, 0.7622
_CB_K, _CB_H, _CB_P, _CB_Q, _CB_Z = 1.0, 1.0, 3.0, 2.0, 1e-4
_CB_SIGMA_CENTRE, _CB_SIGMA_SURROUND, _CB_RADIUS = 2.0, 4.0, 15
_CB_FREQ_SCALE = 15.0  # the survey's u*W/30, v*H/30 on MATLAB freqspace: integer index / 15


def _csf_filter(x: np.ndarray, sd_half: np.ndarray) -> np.ndarray:
    """Contrast-sensitivity filtering in the frequency domain (Chen & Blum 2009).

    The CSF is symmetric in frequency, so the result is real; rfft2 halves the work.
    """
    return sfft.irfft2(sfft.rfft2(x) * sd_half, s=x.shape)


def _csf_response(shape: tuple[int, int]) -> np.ndarray:
    """CSF S(r) sampled on the rfft2 grid of an (H, W) image: (H, W // 2 + 1) float64."""
    h, w = shape
    # MATLAB freqspace gives (k - floor(n/2)) * 2/n for the shifted spectrum; scaled by n/30 this
    # is the signed frequency index k / 15, whatever the image size.
    ky = np.fft.fftfreq(h) * h
    kx = np.fft.rfftfreq(w) * w
    r = np.sqrt(kx[None, :] ** 2 + ky[:, None] ** 2) / _CB_FREQ_SCALE
    return np.exp(-(r / _CB_F0) ** 2) - _CB_A * np.exp(-(r / _CB_F1) ** 2)


def _gauss31(x: np.ndarray, sigma: float) -> np.ndarray:
    """filter2 with the survey's unnormalised 31x31 Gaussian exp(-(x^2+y^2)/2s^2)/(2 pi s^2),
    zero padding; the kernel is separable."""
    t = np.arange(-_CB_RADIUS, _CB_RADIUS + 1, dtype=np.float64)
    g = np.exp(-(t * t) / (2.0 * sigma * sigma))
    y = ndimage.correlate1d(x, g, axis=0, mode="constant")
    y = ndimage.correlate1d(y, g, axis=1, mode="constant")
    return y / (2.0 * np.pi * sigma * sigma)


def _masked_contrast(x: np.ndarray, sd_half: np.ndarray) -> np.ndarray:
    """CSF filtering, Peli band-limited contrast |G1*I / G2*I - 1| and masking C^p/(h C^q + Z)."""
    y = _csf_filter(x, sd_half)
    centre = _gauss31(y, _CB_SIGMA_CENTRE)
    surround = _gauss31(y, _CB_SIGMA_SURROUND)
    # A zero surround (only in constant images) counts as no contrast rather than 0/0.
    ratio = np.divide(centre, surround, out=np.ones_like(centre), where=surround != 0)
    c = np.abs(ratio - 1.0)
    return (_CB_K * c ** _CB_P) / (_CB_H * c ** _CB_Q + _CB_Z)


def _q_cb(srcs: list[np.ndarray], f: np.ndarray) -> float:
    sd_half = _csf_response(f.shape)
    c_f = _masked_contrast(_normalize_u8(f).astype(np.float64), sd_half)
    num = np.zeros_like(c_f)       # sum_n C_n^2 Q_{S_n F}
    sal_sum = np.zeros_like(c_f)   # sum_n C_n^2
    q_sum = np.zeros_like(c_f)     # sum_n Q_{S_n F}, for the equal-weight fallback
    for s in srcs:
        c_s = _masked_contrast(_normalize_u8(s).astype(np.float64), sd_half)
        with np.errstate(divide="ignore", invalid="ignore"):
            # Contrast preservation Q_{SF}: the smaller masked contrast over the larger.
            q_sf = np.where(c_s < c_f, c_s / c_f, c_f / c_s)
        # Both contrasts 0 (0/0 in the survey's code): contrast is preserved.
        q_sf = np.where((c_s == 0) & (c_f == 0), 1.0, q_sf)
        # Saliency lambda_n = C_n^2 / sum_m C_m^2 (two sources in the paper, N here).
        sal = c_s * c_s
        num += sal * q_sf
        sal_sum += sal
        q_sum += q_sf
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(sal_sum > 0, num / sal_sum, q_sum / len(srcs))
    return float(np.mean(q))


def q_cb(sources: Sequence[np.ndarray], fused: np.ndarray) -> float:
    """Chen-Blum human-perception-based fusion metric Q_CB in [0, 1] (higher is better).

    Y. Chen, R. S. Blum, "A new automated quality assessment algorithm for image fusion", Image
    and Vision Computing 27(10):1421-1432 (2009), as the survey's ``metricChenBlum``: images
    min-max scaled to 0..255, contrast sensitivity filtering in the frequency domain, Peli's
    local contrast with 31x31 Gaussians (sigma 2 / 4, zero padding), masking C^3 / (C^2 + 1e-4),
    contrast preservation Q_AF = min/max ratio of masked contrasts, saliency weights
    lambda_A = C_A^2 / (C_A^2 + C_B^2) of the masked contrasts;
    the mean of lambda_A Q_AF + lambda_B Q_BF.

    N sources (our generalisation, equal to the above for N = 2): lambda_n = C_n^2 / sum_m C_m^2
    and Q = mean(sum_n lambda_n Q_{S_n F}). Where the survey's code divides 0 by 0 (no contrast
    anywhere) we score contrast preservation 1 and use equal weights.

    Args:
        sources: N >= 2 images (H, W) or (H, W, C).
        fused: the fused image, same H, W.
    """
    srcs, f = _prepare(sources, fused)
    return _q_cb(srcs, f)


# --------------------------------------------------------------------------------------------
# full-reference metrics against a ground-truth all-in-focus image
# --------------------------------------------------------------------------------------------

def _check_reference_pair(truth: np.ndarray, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    t = np.asarray(truth)
    x = np.asarray(img)
    if t.shape != x.shape:
        raise ValueError(f"ground truth is {t.shape} but the image is {x.shape}")
    if t.dtype != x.dtype:
        raise ValueError(f"ground truth is {t.dtype} but the image is {x.dtype}: "
                         "the data range would be ambiguous")
    if t.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {t.shape}")
    # Data range from the dtype: 255 for uint8, 65535 for uint16, 1.0 for float images in [0, 1].
    return t, x, dtype_max(t.dtype)


def psnr(truth: np.ndarray, img: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``img`` against ``truth`` (inf when identical).

    PSNR = 10 log10(R^2 / MSE) with R the dtype's full scale (255, 65535, or 1.0 for floats) and
    the MSE over all pixels and channels.

    Args:
        truth: ground truth (H, W) or (H, W, C).
        img: image of the same shape and dtype.
    """
    t, x, data_range = _check_reference_pair(truth, img)
    mse = float(np.mean((t.astype(np.float64) - x.astype(np.float64)) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range * data_range / mse))


def ssim(truth: np.ndarray, img: np.ndarray) -> float:
    """Mean structural similarity of ``img`` against ``truth``, at most 1.

    Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error
    visibility to structural similarity", IEEE TIP 13(4) (2004), with the paper's settings
    (11x11 Gaussian window of sigma 1.5, K1=0.01, K2=0.03, population covariances) via
    ``skimage.metrics.structural_similarity``; data range from the dtype; colour (H, W, C)
    images are scored per channel and averaged.

    Args:
        truth: ground truth (H, W) or (H, W, C), at least 11x11 pixels.
        img: image of the same shape and dtype.
    """
    from skimage.metrics import structural_similarity

    t, x, data_range = _check_reference_pair(truth, img)
    return float(structural_similarity(
        t.astype(np.float64), x.astype(np.float64), data_range=data_range,
        channel_axis=-1 if t.ndim == 3 else None,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


# --------------------------------------------------------------------------------------------
# single-image statistics (on the 0..255 grey scale)
# --------------------------------------------------------------------------------------------

def spatial_frequency(img: np.ndarray) -> float:
    """Spatial frequency SF = sqrt(RF^2 + CF^2) of the 0..255 grey image (higher = more detail).

    A. M. Eskicioglu, P. S. Fisher, "Image quality measures and their performance", IEEE Trans.
    Communications 43(12) (1995); as used for fusion by S. Li, J. T. Kwok, Y. Wang, Information
    Fusion 2(3) (2001): RF^2 and CF^2 are the sums of squared horizontal and vertical first
    differences divided by H*W.

    Args:
        img: (H, W) or (H, W, C), any dtype (see the module docstring for the grey scale).
    """
    x = _grey255(img)
    n = x.size
    rf2 = float(np.sum(np.diff(x, axis=1) ** 2)) / n
    cf2 = float(np.sum(np.diff(x, axis=0) ** 2)) / n
    return float(np.sqrt(rf2 + cf2))


def average_gradient(img: np.ndarray) -> float:
    """Average gradient of the 0..255 grey image (higher = sharper).

    AG = 1/((H-1)(W-1)) sum sqrt((dx^2 + dy^2) / 2) with forward differences dx, dy over the
    (H-1) x (W-1) grid (e.g. Z. Liu et al., IEEE TPAMI 34(1) (2012), the fusion metrics review).

    Args:
        img: (H, W) or (H, W, C), any dtype, at least 2x2.
    """
    x = _grey255(img)
    if min(x.shape) < 2:
        raise ValueError(f"average_gradient needs at least 2x2 pixels, got {x.shape}")
    dx = x[:-1, 1:] - x[:-1, :-1]
    dy = x[1:, :-1] - x[:-1, :-1]
    return float(np.mean(np.sqrt((dx * dx + dy * dy) / 2.0)))


def entropy(img: np.ndarray) -> float:
    """Shannon entropy in bits of the 256-bin histogram of the 0..255 grey image (0..8).

    Args:
        img: (H, W) or (H, W, C), any dtype.
    """
    x = _grey255(img).astype(np.int64)
    hist = np.bincount(x.ravel(), minlength=256).astype(np.float64)
    return _entropy_bits(hist / hist.sum())


# --------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------

_FUSION_METRICS = {"q_g": _q_g, "q_y": _q_y, "q_mi": _q_mi, "q_cb": _q_cb}


def evaluate(sources: Sequence[np.ndarray], fused: np.ndarray,
             truth: np.ndarray | None = None,
             keys: Sequence[str] = ("q_g", "q_y", "q_mi", "q_cb")) -> dict[str, float]:
    """Fusion metrics of one fused image, converting every image to grey once.

    Args:
        sources: N >= 2 source images (H, W) or (H, W, C).
        fused: the fused image, same H, W.
        truth: optional ground-truth all-in-focus image, same shape and dtype as ``fused``.
        keys: which of ``q_g``, ``q_y``, ``q_mi``, ``q_cb`` to compute (the pipeline scores
            ``q_g``, ``q_y``, ``q_mi``; Q_CB's frequency-domain filtering costs as much as the
            three together).

    Returns:
        ``{key: value}`` as floats, plus ``"psnr"`` and ``"ssim"`` when ``truth`` is given.
    """
    unknown = set(keys) - set(_FUSION_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {sorted(_FUSION_METRICS)}")
    srcs, f = _prepare(sources, fused)
    out = {key: _FUSION_METRICS[key](srcs, f) for key in keys}
    if truth is not None:
        out["psnr"] = psnr(truth, fused)
        out["ssim"] = ssim(truth, fused)
    return out
