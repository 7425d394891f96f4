"""Dtype-aware conversion between stored pixels and unit floats, and luminance for focus measures.

Focus is measured on luminance (Liu et al. 2017; Ma et al. 2022): RGB(A) uses ITU-R BT.601
weights (the ones MATLAB's rgb2gray uses); other multichannel data (microscopy C x H x W) uses
the channel mean, since its channels have no colour meaning.
"""
from __future__ import annotations

import numpy as np

BT601 = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103], dtype=np.float64)


def dtype_max(dtype: np.dtype) -> float:
    """Full-scale value of a stored dtype: 255 for uint8, 65535 for uint16, 1.0 for floats."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" or dtype.kind == "i":
        return float(np.iinfo(dtype).max)
    return 1.0


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """Stored pixels (any dtype) -> float32 in [0, 1] (floats pass through unscaled)."""
    return (img.astype(np.float32) / np.float32(dtype_max(img.dtype))).astype(np.float32, copy=False)


def from_unit_float(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float in [0, 1] -> stored dtype, rounded and clipped for integer dtypes."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        m = dtype_max(dtype)
        return np.clip(np.rint(x * m), 0, m).astype(dtype)
    return x.astype(dtype, copy=False)


def luminance(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) image of any dtype -> (H, W) float32 luminance in [0, 1]."""
    x = to_unit_float(img)
    if x.ndim == 2:
        return x
    c = x.shape[2]
    if c in (3, 4):
        return (x[..., :3] @ BT601.astype(np.float32)).astype(np.float32)
    return x.mean(axis=2, dtype=np.float32)
