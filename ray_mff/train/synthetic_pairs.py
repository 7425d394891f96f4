"""Synthetic multi-focus pairs made on the fly from all-in-focus natural images.

Training data in the manner of Ma et al. 2022 (GACN, Sec. 4.1) and Liu et al. 2017: a sharp
natural image and a random object-shaped focus mask M give a pair

    A = sharp where M, defocused elsewhere;   B = defocused where M, sharp elsewhere,

and the decision map the network must learn is M (A is in focus where M = 1).

Realism, each drawn per sample from one seeded generator:

- **masks**: smoothed random blobs (thresholded low-pass noise), random star-shaped polygons with
  rounded corners, and segment-like regions that follow the image's own content (a connected
  region of the thresholded, heavily smoothed colour image), so boundaries run along edges as
  real object boundaries do;
- **defocus**: Gaussian PSF of random strength per side (sigma 0.8-4 px), with an occasional slight
  blur of the "sharp" side too;
- **defocus spread across the boundary**: in half the samples the blurred *foreground* is
  composited layer-wise, blur(M * I) + (1 - blur(M)) * I, so its blur spills over the sharp
  background as it does in a real lens (the hard part of focus boundaries);
- **misregistration**: a small sub-pixel shift / scale of B (focus breathing);
- **noise**: Gaussian sensor noise of random level;
- random flips / transposes and a random A/B swap (M -> 1 - M).

Example:
    >>> import numpy as np
    >>> img = (np.random.default_rng(0).random((160, 200, 3)) * 255).astype(np.uint8)
    >>> s = make_pair(img, np.random.default_rng(1), patch=64)
    >>> s["y_a"].shape, s["mask"].shape, s["y_a"].dtype
    ((64, 64), (64, 64), dtype('float32'))
"""
from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from ray_mff.fusion.luminance import luminance, to_unit_float

# ../shared/data beside the repository checkout (see /work/shared/data/README.md); pass --data elsewhere
_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
DEFAULT_TRAIN_ROOT = os.path.normpath(os.path.join(_SHARED, "bsds500", "train"))
DEFAULT_VAL_ROOT = os.path.normpath(os.path.join(_SHARED, "bsds500", "val"))


def list_images(root: str, *, s3_endpoint: str | None = None) -> list[str]:
    """Image uris (png/jpg/tif) under a local folder or ``s3://`` prefix, sorted."""
    from ray_mff import storage
    from ray_mff.stacks import is_image_name

    return [e.uri for e in storage.list_files(os.fspath(root), s3_endpoint=s3_endpoint) if is_image_name(e.uri)]


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return x
    return cv2.GaussianBlur(x, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT)


def _blob_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Threshold of low-pass random noise: one or several organic blobs."""
    scale = rng.uniform(0.08, 0.3) * min(h, w)
    noise = _gauss(rng.standard_normal((h, w)).astype(np.float32), scale)
    return noise > np.quantile(noise, rng.uniform(0.3, 0.7))


def _polygon_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random star-shaped polygon (an object silhouette), possibly touching the border."""
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    k = int(rng.integers(3, 12))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(0.2, 0.6, k) * min(h, w)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1).astype(np.int32)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [pts], 1)
    return m.astype(bool)


def _segment_mask(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A region that follows the image content: thresholded smoothed colour along a random direction."""
    x = to_unit_float(img)
    x = x if x.ndim == 3 else x[..., None]
    proj = x @ rng.standard_normal(x.shape[2]).astype(np.float32)
    proj = cv2.bilateralFilter(proj.astype(np.float32), 9, 0.1, 5) if rng.random() < 0.5 else _gauss(proj, 2.0)
    m = proj > np.quantile(proj, rng.uniform(0.3, 0.7))
    # keep the largest connected region (and fill its small holes) so it reads as one object
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    if n > 1:
        m = lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return m


def _smooth_mask(m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round the corners / remove specks: blur then re-threshold (still a hard 0/1 mask)."""
    s = rng.uniform(1.0, 4.0)
    return _gauss(m.astype(np.float32), s) > 0.5


def random_focus_mask(img: np.ndarray, rng: np.random.Generator, min_frac: float = 0.15) -> np.ndarray:
    """(H, W) float32 0/1 focus mask of a random kind; covers between min_frac and 1 - min_frac."""
    h, w = img.shape[:2]
    for _ in range(8):
        kind = rng.choice(3, p=[0.3, 0.3, 0.4])
        m = _blob_mask(h, w, rng) if kind == 0 else _polygon_mask(h, w, rng) if kind == 1 else _segment_mask(img, rng)
        m = _smooth_mask(m, rng)
        if min_frac <= m.mean() <= 1 - min_frac:
            return m.astype(np.float32)
    # fallback: a half-plane with a wavy edge (always valid)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    edge = w * rng.uniform(0.3, 0.7) + 0.1 * w * np.sin(yy / h * rng.uniform(2, 8))
    return (xx < edge).astype(np.float32)


def _shift(x: np.ndarray, dy: float, dx: float, scale: float) -> np.ndarray:
    h, w = x.shape[:2]
    mat = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, scale)
    mat[:, 2] += (dx, dy)
    return cv2.warpAffine(x, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def defocus_pair(sharp: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All-in-focus (H, W, C) float image + 0/1 mask -> (A focused on mask, B focused off it), float32."""
    m = mask[..., None] if sharp.ndim == 3 else mask
    sig_fg, sig_bg = rng.uniform(0.8, 4.0), rng.uniform(0.8, 4.0)
    residual = rng.uniform(0.0, 0.5) if rng.random() < 0.3 else 0.0  # the "sharp" side is rarely perfect
    base = _gauss(sharp, residual)
    # A: foreground (mask) sharp, background defocused. The background lies behind the object, so
    # its blur does not spill over the sharp foreground: a plain cut is physical here.
    a = m * base + (1 - m) * _gauss(sharp, sig_bg)
    if rng.random() < 0.5:
        # B, layered: the defocused foreground occludes, its blur spreads over the sharp background.
        mb = _gauss(mask.astype(np.float32), sig_fg)
        mb = mb[..., None] if sharp.ndim == 3 else mb
        b = _gauss(sharp * m, sig_fg) + (1 - mb) * base
    else:
        b = m * _gauss(sharp, sig_fg) + (1 - m) * base
    return a.astype(np.float32), b.astype(np.float32)


def make_pair(img: np.ndarray, rng: np.random.Generator, patch: int = 128, *, colour: bool = False) -> dict:
    """One synthetic training pair from an all-in-focus image.

    img: (H, W) or (H, W, C) any dtype, at least ``patch`` pixels on each side (smaller is upscaled).
    Returns dict with ``y_a``, ``y_b`` (patch, patch) float32 luminances in [0, 1], ``mask``
    (patch, patch) float32, 1 where A is in focus; with ``colour``, also ``a``, ``b`` (patch, patch, C).
    """
    x = to_unit_float(img)
    if x.ndim == 2:
        x = x[..., None]
    x = x[..., :3]
    h, w = x.shape[:2]
    # a margin around the crop so blur, shifts and scale change read real pixels, not padding
    margin = 8
    need = patch + 2 * margin
    if min(h, w) < need:
        f = need / min(h, w)
        x = cv2.resize(x, (int(np.ceil(w * f)), int(np.ceil(h * f))), interpolation=cv2.INTER_CUBIC)
        x = x if x.ndim == 3 else x[..., None]
        h, w = x.shape[:2]
    if rng.random() < 0.3:  # scale augmentation: also see coarser texture
        f = rng.uniform(0.6, 1.0)
        if min(h, w) * f >= need:
            x = cv2.resize(x, (int(w * f), int(h * f)), interpolation=cv2.INTER_AREA)
            x = x if x.ndim == 3 else x[..., None]
            h, w = x.shape[:2]
    y0, x0 = int(rng.integers(0, h - need + 1)), int(rng.integers(0, w - need + 1))
    crop = np.ascontiguousarray(x[y0:y0 + need, x0:x0 + need])
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    if rng.random() < 0.5:
        crop = crop.transpose(1, 0, 2)
    crop = np.ascontiguousarray(crop)
    mask = random_focus_mask((crop * 255).astype(np.uint8), rng)
    a, b = defocus_pair(crop, mask, rng)
    if rng.random() < 0.3:  # misregistration of B: sub-pixel shift and focus breathing
        b = _shift(b, rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.7), rng.uniform(0.995, 1.005))
        b = b if b.ndim == 3 else b[..., None]
    noise = rng.uniform(0.0, 0.02) if rng.random() < 0.7 else 0.0
    if noise:
        a = a + rng.normal(0, noise, a.shape).astype(np.float32)
        b = b + rng.normal(0, noise, b.shape).astype(np.float32)
    a = np.clip(a, 0, 1)[margin:-margin, margin:-margin]
    b = np.clip(b, 0, 1)[margin:-margin, margin:-margin]
    mask = mask[margin:-margin, margin:-margin]
    if rng.random() < 0.5:  # random A/B swap: the decision flips with it
        a, b, mask = b, a, 1.0 - mask
    out = {"y_a": luminance(a), "y_b": luminance(b), "mask": np.ascontiguousarray(mask, dtype=np.float32)}
    if colour:
        out["a"], out["b"] = a, b
    return out


def make_batch(images: Sequence[np.ndarray], rng: np.random.Generator, patch: int = 128) -> dict[str, np.ndarray]:
    """One pair per image -> ``y_a``, ``y_b``, ``mask`` as (B, 1, patch, patch) float32 arrays."""
    pairs = [make_pair(img, rng, patch) for img in images]
    return {k: np.stack([p[k] for p in pairs])[:, None] for k in ("y_a", "y_b", "mask")}
