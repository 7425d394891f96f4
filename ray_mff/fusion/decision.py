"""Apply per-source decision weights to a stack: F = sum_n W_n * I_n, every channel.

The spatial-domain fusion rule shared by every decision-map method (Liu et al. 2017, Eq. 5;
Li et al. 2013): a (H, W, N) weight map, normalised to sum to 1 per pixel, blends the N sources.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ray_mff.fusion.luminance import dtype_max
from ray_mff.planes import is_lazy, plane_shape


#: results keep their full (H, W, N) float32 weights up to this size; deeper or larger stacks carry
#: the (H, W) index map instead, so memory does not grow with the number of planes
FULL_WEIGHTS_MAX_BYTES = 64 << 20


def keep_full_weights(shape: tuple[int, ...], n: int) -> bool:
    return shape[0] * shape[1] * n * 4 <= FULL_WEIGHTS_MAX_BYTES


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


def fuse_with_weights(images: Sequence[np.ndarray], weights) -> np.ndarray:
    """Blend N registered sources with (H, W, N) weights: F = sum_n W[..., n] * I_n.

    images:  N arrays of one shape (H, W) or (H, W, C) and one dtype (uint8, uint16, float), or a
             lazy :class:`ray_mff.planes.PlaneSequence` (each plane is read once, in order).
    weights: (H, W, N) float, expected to sum to 1 per pixel (see ``normalize_weights``), or a
             *weight source*: an object whose ``weight(k)`` returns source k's (H, W) float32
             weight, or None where it is 0 everywhere (that plane is then not read at all);
             the same weight is applied to every channel.

    Returns the fused image, same shape and dtype as the sources: integers are rounded and clipped
    to the dtype's range; floats are returned unclipped. The sum is accumulated in float32 one
    source at a time, so peak memory is one float32 image, not N. A source of weight 0 adds
    exactly 0, so skipping it leaves the result bit-identical.
    """
    n_images = len(images)
    if n_images == 0:
        raise ValueError("fuse_with_weights needs at least one image")
    if isinstance(weights, np.ndarray) or not callable(getattr(weights, "weight", None)):
        w = np.asarray(weights)
        shape = plane_shape(images)
        if w.ndim != 3 or w.shape[:2] != shape[:2] or w.shape[2] != n_images:
            raise ValueError(f"weights {w.shape} do not match {n_images} images of shape {shape}")
        weight_of = lambda k: w[..., k]  # noqa: E731
    else:
        weight_of = weights.weight
    # a sequence that can align (or read) parts of a plane is read only where the weight is non-zero
    read_regions = getattr(images, "read_regions", None)
    acc = tmp = first = None
    for n in range(n_images):
        wn = weight_of(n)
        if wn is None:
            continue
        wn = wn.astype(np.float32, copy=False)
        if read_regions is None:
            windows, parts = [None], [np.asarray(images[n])]
        else:
            windows = nonzero_windows(wn)
            parts = read_regions(n, windows)
        for window, img in zip(windows, parts):
            if first is None:
                first = img
                acc = np.zeros(wn.shape + img.shape[2:], dtype=np.float32)
                tmp = np.empty(acc.shape, dtype=np.float32)
            sl = np.s_[:, :] if window is None else np.s_[window[0]:window[1], window[2]:window[3]]
            expected = acc[sl].shape
            if img.shape != expected or img.dtype != first.dtype:
                raise ValueError(f"image {n} is {img.shape} {img.dtype}, expected {expected} {first.dtype}")
            wp = wn[sl][..., None] if img.ndim == 3 else wn[sl]
            part = tmp[sl]
            np.multiply(img, wp, out=part, casting="unsafe")
            acc[sl] += part
    if first is None:
        raise ValueError("every source has weight 0")
    dtype = first.dtype
    if dtype.kind in "ui":
        np.rint(acc, out=acc)
        np.clip(acc, 0 if dtype.kind == "u" else np.iinfo(dtype).min, dtype_max(dtype), out=acc)
        return acc.astype(dtype)
    return acc.astype(dtype, copy=False)


def nonzero_windows(weight: np.ndarray, tile: int = 128) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) windows covering every non-zero pixel of an (H, W) map: the ``tile`` x
    ``tile`` cells that hold one, runs of neighbouring cells in a row of cells merged into one
    window. A guided-filtered one-hot weight is exactly 0 beyond twice the filter radius from its
    region (He et al. 2013: box filters of a zero neighbourhood), so these cover a plane's support."""
    h, w = weight.shape
    ty, tx = -(-h // tile), -(-w // tile)
    padded = np.zeros((ty * tile, tx * tile), bool)
    np.not_equal(weight, 0, out=padded[:h, :w])
    cells = padded.reshape(ty, tile, tx, tile).any(axis=(1, 3))
    windows = []
    for r in range(ty):
        row = np.concatenate([[False], cells[r], [False]])
        edges = np.flatnonzero(row[1:] != row[:-1]).reshape(-1, 2)  # [start, stop) of each run
        windows += [(r * tile, min((r + 1) * tile, h), a * tile, min(b * tile, w)) for a, b in edges]
    return windows


def select_planes(images: Sequence[np.ndarray], index: np.ndarray) -> np.ndarray:
    """Hard decision: F(p) = I_index(p)(p), reading only the planes that ``index`` chooses, once each.

    Equal to ``fuse_with_weights(images, one_hot(index, N))`` (a weight of exactly 1 or 0 changes
    no value), without the (H, W, N) weights.
    """
    out = None
    for k in np.flatnonzero(np.bincount(index.ravel(), minlength=len(images))):
        img = np.asarray(images[int(k)])
        if out is None:
            out = np.empty_like(img)
        sel = index == k
        out[sel] = img[sel]
    return out


def check_stack(images: Sequence[np.ndarray]) -> None:
    """Raise ValueError unless ``images`` holds N >= 2 arrays of one shape and dtype."""
    if len(images) < 2:
        raise ValueError(f"fusion needs N >= 2 images, got {len(images)}")
    if is_lazy(images):  # one array, or files checked as they are read: nothing to read here
        if len(images.shape) not in (2, 3):
            raise ValueError(f"planes must be (H, W) or (H, W, C), got {images.shape}")
        return
    first = images[0]
    for n, img in enumerate(images):
        if img.shape != first.shape or img.dtype != first.dtype:
            raise ValueError(f"image {n} is {img.shape} {img.dtype}, image 0 is {first.shape} {first.dtype}")
        if img.ndim not in (2, 3):
            raise ValueError(f"image {n} must be (H, W) or (H, W, C), got {img.shape}")
