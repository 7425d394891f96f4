"""Apply per-source decision weights to a stack: F = sum_n W_n * I_n, every channel.

The spatial-domain fusion rule shared by every decision-map method (Liu et al. 2017, Eq. 5;
Li et al. 2013): a (H, W, N) weight map, normalised to sum to 1 per pixel, blends the N sources.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ray_mff.fusion.luminance import dtype_max


def normalize_weights(weights: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """(H, W, N) non-negative weights -> float32 weights summing to 1 per pixel.

    Negative values (overshoot of a guided filter) are clipped to 0 first; pixels whose weights
    are all 0 get the uniform 1/N. ``inplace=True`` reuses a float32 input's memory (large N).
    """
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 3:
        raise ValueError(f"weights must be (H, W, N), got {w.shape}")
    if inplace and w is weights:
        np.maximum(w, 0.0, out=w)
    else:
        w = np.maximum(w, 0.0)
    total = w.sum(axis=2, keepdims=True)
    n = w.shape[2]
    empty = total <= 1e-12
    np.divide(w, np.where(empty, 1.0, total), out=w)
    if empty.any():
        w[np.broadcast_to(empty, w.shape)] = 1.0 / n
    return w


def one_hot(index_map: np.ndarray, n: int) -> np.ndarray:
    """(H, W) integer index of the chosen source -> (H, W, n) float32 one-hot weights."""
    idx = np.asarray(index_map)
    if idx.ndim != 2:
        raise ValueError(f"index_map must be (H, W), got {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"index_map values must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    out = np.zeros(idx.shape + (n,), dtype=np.float32)
    np.put_along_axis(out, idx[..., None].astype(np.intp), 1.0, axis=2)
    return out


def fuse_with_weights(images: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Blend N registered sources with (H, W, N) weights: F = sum_n W[..., n] * I_n.

    images:  N arrays of one shape (H, W) or (H, W, C) and one dtype (uint8, uint16, float).
    weights: (H, W, N) float, expected to sum to 1 per pixel (see ``normalize_weights``);
             the same weight is applied to every channel.

    Returns the fused image, same shape and dtype as the sources: integers are rounded and clipped
    to the dtype's range; floats are returned unclipped. The sum is accumulated in float32 one
    source at a time, so peak memory is one float32 image, not N.
    """
    if len(images) == 0:
        raise ValueError("fuse_with_weights needs at least one image")
    first = np.asarray(images[0])
    w = np.asarray(weights)
    if w.ndim != 3 or w.shape[:2] != first.shape[:2] or w.shape[2] != len(images):
        raise ValueError(f"weights {w.shape} do not match {len(images)} images of shape {first.shape}")
    acc = np.zeros(first.shape, dtype=np.float32)
    tmp = np.empty(first.shape, dtype=np.float32)
    for n, img in enumerate(images):
        img = np.asarray(img)
        if img.shape != first.shape or img.dtype != first.dtype:
            raise ValueError(f"image {n} is {img.shape} {img.dtype}, expected {first.shape} {first.dtype}")
        wn = w[..., n].astype(np.float32, copy=False)
        if first.ndim == 3:
            wn = wn[..., None]
        np.multiply(img, wn, out=tmp, casting="unsafe")
        acc += tmp
    dtype = first.dtype
    if dtype.kind in "ui":
        np.rint(acc, out=acc)
        np.clip(acc, 0 if dtype.kind == "u" else np.iinfo(dtype).min, dtype_max(dtype), out=acc)
        return acc.astype(dtype)
    return acc.astype(dtype, copy=False)


def check_stack(images: Sequence[np.ndarray]) -> None:
    """Raise ValueError unless ``images`` holds N >= 2 arrays of one shape and dtype."""
    if len(images) < 2:
        raise ValueError(f"fusion needs N >= 2 images, got {len(images)}")
    first = images[0]
    for n, img in enumerate(images):
        if img.shape != first.shape or img.dtype != first.dtype:
            raise ValueError(f"image {n} is {img.shape} {img.dtype}, image 0 is {first.shape} {first.dtype}")
        if img.ndim not in (2, 3):
            raise ValueError(f"image {n} must be (H, W) or (H, W, C), got {img.shape}")
