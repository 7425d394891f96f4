"""Guided image filter: edge-preserving smoothing of a map, steered by a guide image.

Follows K. He, J. Sun, X. Tang, "Guided Image Filtering", IEEE TPAMI 35(6), 2013, Algorithm 1,
written with normalised box filters (``cv2.boxFilter``). OpenCV's own ``cv2.ximgproc.guidedFilter``
lives in opencv-contrib, which ray-mff does not depend on, so the O(N) box-filter form is spelled
out here. In multi-focus fusion it snaps a decision map to the edges of the fused image
(Li, Kang, Hu, "Image fusion with guided filtering", IEEE TIP 2013; Liu et al. 2017).
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np


def _box(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1) x (2r+1) window, mirrored borders (He et al. 2013, f_mean)."""
    k = 2 * radius + 1
    return cv2.boxFilter(x, cv2.CV_32F, (k, k), normalize=True, borderType=cv2.BORDER_REFLECT)


def make_guided_filter(guide: np.ndarray, radius: int = 8, eps: float = 0.1) -> Callable[[np.ndarray], np.ndarray]:
    """Precompute the guide's window statistics; return ``q = f(p)`` filtering any (H, W) map p.

    Filtering K maps with one guide (the K one-hot channels of a decision map) then costs four box
    filters per map instead of six. See ``guided_filter`` for the arguments.
    """
    guide = np.ascontiguousarray(guide, dtype=np.float32)
    if guide.ndim != 2:
        raise ValueError(f"guide must be (H, W), got {guide.shape}")
    radius = int(radius)
    # Alg. 1 steps 1-2: mean_I and var_I = corr_I - mean_I^2, shared by every input map.
    mean_i = _box(guide, radius)
    var_i = _box(guide * guide, radius) - mean_i * mean_i
    np.maximum(var_i, 0.0, out=var_i)  # float32 round-off can make flat windows slightly negative
    denom = var_i + np.float32(eps)

    def apply(p: np.ndarray) -> np.ndarray:
        p = np.ascontiguousarray(p, dtype=np.float32)
        if p.shape != guide.shape:
            raise ValueError(f"map {p.shape} does not match guide {guide.shape}")
        mean_p = _box(p, radius)
        cov_ip = _box(guide * p, radius) - mean_i * mean_p
        a = cov_ip / denom  # Alg. 1 step 3: a = cov_Ip / (var_I + eps)
        b = mean_p - a * mean_i  # b = mean_p - a mean_I
        return _box(a, radius) * guide + _box(b, radius)  # steps 4-5: q = mean_a I + mean_b

    return apply


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int = 8, eps: float = 0.1) -> np.ndarray:
    """Filter ``src`` with the grey guided filter steered by ``guide`` (He et al. 2013, Alg. 1).

    guide:  (H, W) float32, typically in [0, 1] (``eps`` is relative to that scale).
    src:    (H, W) float32, or (H, W, K) stack filtered channel by channel with the same guide
            (the guide's statistics are computed once and shared by all K channels).
    radius: window radius r; windows are (2r+1) x (2r+1), borders mirrored (BORDER_REFLECT).
    eps:    regulariser epsilon; larger values smooth more across weak guide edges.

    Returns float32 of the same shape as ``src``.

    Example:
        >>> g = np.random.rand(64, 64).astype(np.float32)
        >>> q = guided_filter(g, (g > 0.5).astype(np.float32), radius=4, eps=0.01)
        >>> q.shape, q.dtype
        ((64, 64), dtype('float32'))
    """
    src = np.asarray(src, dtype=np.float32)
    guide = np.asarray(guide)
    if src.shape[:2] != guide.shape or src.ndim not in (2, 3):
        raise ValueError(f"src must be (H, W) or (H, W, K) matching guide {guide.shape}, got {src.shape}")
    apply = make_guided_filter(guide, radius, eps)
    if src.ndim == 2:
        return apply(src)
    out = np.empty(src.shape, dtype=np.float32)
    for k in range(src.shape[2]):
        out[..., k] = apply(src[..., k])
    return out
