"""Spatial-domain focus measures: per-pixel sharpness of a luminance image over a local window.

W. Huang, Z. Jing, "Evaluation of focus measures in multi-focus image fusion", Pattern Recognition
Letters 28(4), 2007, compare the classic measures for fusion and find the energy of the Laplacian
(EOL) and the sum-modified-Laplacian (SML, Nayar & Nakagawa, "Shape from focus", TPAMI 1994) best,
ahead of spatial frequency (Li, Kwok, Wang, "Combination of images with diverse focuses using the
spatial frequency", Information Fusion 2(3), 2001). All three are here; each returns a local window
mean (the window sum up to a constant, which no argmax over sources can tell apart).
"""
from __future__ import annotations

import cv2
import numpy as np

_BORDER = cv2.BORDER_REFLECT


def _window_mean(x: np.ndarray, window: int) -> np.ndarray:
    window = int(window)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window == 1:
        return x
    return cv2.boxFilter(x, cv2.CV_32F, (window, window), normalize=True, borderType=_BORDER)


def laplacian_energy(lum: np.ndarray, window: int = 7) -> np.ndarray:
    """Energy of the Laplacian (Huang & Jing 2007, EOL): local mean of (I_xx + I_yy)^2.

    lum:    (H, W) float32 luminance in [0, 1].
    window: side of the square averaging window (pixels).
    Returns (H, W) float32. The Laplacian is the 4-neighbour kernel [[0,1,0],[1,-4,1],[0,1,0]].
    """
    lum = np.asarray(lum, dtype=np.float32)
    lap = cv2.Laplacian(lum, cv2.CV_32F, ksize=1, borderType=_BORDER)
    return _window_mean(lap * lap, window)


def sum_modified_laplacian(lum: np.ndarray, window: int = 7, step: int = 1) -> np.ndarray:
    """Sum-modified-Laplacian (Nayar & Nakagawa 1994; Huang & Jing 2007, SML).

    ML = |2I(x,y) - I(x-s,y) - I(x+s,y)| + |2I(x,y) - I(x,y-s) - I(x,y+s)| with s = ``step``;
    the absolute values keep the x and y second derivatives from cancelling. Returns the local
    window mean of ML^2 as (H, W) float32 (Huang & Jing's squared form).
    """
    lum = np.asarray(lum, dtype=np.float32)
    s = int(step)
    k = np.zeros((1, 2 * s + 1), dtype=np.float32)
    k[0, 0], k[0, s], k[0, 2 * s] = -1.0, 2.0, -1.0
    mlx = np.abs(cv2.filter2D(lum, cv2.CV_32F, k, borderType=_BORDER))
    mly = np.abs(cv2.filter2D(lum, cv2.CV_32F, k.T.copy(), borderType=_BORDER))
    ml = mlx + mly
    return _window_mean(ml * ml, window)


def spatial_frequency_map(lum: np.ndarray, window: int = 7) -> np.ndarray:
    """Local spatial frequency (Li, Kwok, Wang 2001): sqrt(RF^2 + CF^2) over a window.

    RF^2 and CF^2 are local means of the squared first differences along rows and columns
    (Eskicioglu & Fisher's SF, computed per window). Returns (H, W) float32.
    """
    lum = np.asarray(lum, dtype=np.float32)
    dx = np.zeros_like(lum)
    dy = np.zeros_like(lum)
    dx[:, 1:] = lum[:, 1:] - lum[:, :-1]
    dy[1:, :] = lum[1:, :] - lum[:-1, :]
    return np.sqrt(_window_mean(dx * dx, window) + _window_mean(dy * dy, window))


#: name -> focus measure, for ``fuse_guided(focus_measure=...)``.
FOCUS_MEASURES = {
    "laplacian_energy": laplacian_energy,
    "sum_modified_laplacian": sum_modified_laplacian,
    "spatial_frequency": spatial_frequency_map,
}
