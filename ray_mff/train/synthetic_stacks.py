"""Synthetic focus sweeps that look like optics, made on the fly from all-in-focus natural images.

Training data for the stack-native network (:mod:`ray_mff.models.stacknet`): each sample is a
focus sweep of N = 2..8 luminance images of one scene and its all-in-focus truth, so the network
is supervised on the truth itself (the fused result), not only on a decision mask. The scene and
its defocus come from :func:`ray_mff.synthetic.render_focus_stack` (layered depth with occlusion:
a blurred near object spreads over the sharp background, Hasinoff & Kutulakos 2007), with, drawn
per sample from one seeded generator:

- **aperture**: pillbox (circular iris), polygonal (5-9 straight blades, any rotation) or
  Gaussian PSF; blur radius proportional to the distance from the focal plane in dioptres
  (thin lens), the whole sweep spanning 1.5-16 px;
- **scene**: 2-5 depth layers, smooth objects or thin structures (twigs, grass blades: 1-3 px
  polylines) in front of a background, layers off their image's focal plane by up to 0.3 of the
  focus spacing in half the samples (the sharpest image of a layer is not perfectly sharp);
- **sub-pixel misregistration** of each image (shift ~0.3 px, focus breathing ~0.3 % scale) in
  half the samples; the truth stays in the reference geometry;
- **Poisson-Gaussian sensor noise** (Foi et al., "Practical Poissonian-Gaussian noise modeling
  and fitting for single-image raw-data", IEEE TIP 2008): photon counts of 100-10000 at full
  scale plus read noise up to 0.01 (both ranges are options: `make_stack(photons=, read_noise=)`,
  `--photons`, `--read-noise`), then 8-bit quantisation;
- **JPEG artefacts** (quality 50-95) in 30 % of the samples;
- random rescale (0.6-1x), crop, flips and transposes of the source picture.

Example:
    >>> import numpy as np
    >>> img = (np.random.default_rng(0).random((160, 200, 3)) * 255).astype(np.uint8)
    >>> s = make_stack(img, np.random.default_rng(1), patch=64, n=3)
    >>> s["stack"].shape, s["truth"].shape, s["depth"].shape
    ((3, 1, 64, 64), (1, 64, 64), (3, 64, 64))
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from ray_mff.fusion.luminance import luminance
from ray_mff.synthetic import render_focus_stack

#: stack sizes drawn for a batch and their probabilities (pairs are the commonest use)
SIZES = (2, 3, 4, 5, 6, 8)
SIZE_P = (0.3, 0.12, 0.2, 0.13, 0.12, 0.13)


def _crop(lum: np.ndarray, rng: np.random.Generator, patch: int) -> np.ndarray:
    """Random rescale, crop of ``patch`` x ``patch`` (upscaling small images first), flips."""
    scale = rng.uniform(0.6, 1.0)
    h, w = lum.shape
    scale = max(scale, (patch + 2) / min(h, w))
    if abs(scale - 1.0) > 1e-3:
        lum = cv2.resize(lum, (max(patch, round(w * scale)), max(patch, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    h, w = lum.shape
    y0, x0 = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
    c = lum[y0:y0 + patch, x0:x0 + patch]
    if rng.random() < 0.5:
        c = c[:, ::-1]
    if rng.random() < 0.5:
        c = c.T
    return np.ascontiguousarray(c, dtype=np.float32)


def _misregister(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape
    mat = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, 1.0 + rng.normal(0.0, 0.003))
    mat[:, 2] += rng.normal(0.0, 0.3, 2)
    return cv2.warpAffine(x, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _sensor(x: np.ndarray, rng: np.random.Generator, photons: float, read: float, jpeg: int | None) -> np.ndarray:
    """Poisson-Gaussian noise (Foi et al. 2008), 8-bit quantisation, optional JPEG round trip."""
    x = rng.poisson(np.clip(x, 0.0, 1.0) * photons).astype(np.float32) / photons
    x = x + rng.normal(0.0, read, x.shape).astype(np.float32)
    q = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    if jpeg is not None:
        ok, buf = cv2.imencode(".jpg", q, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg)])
        q = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return q.astype(np.float32) / 255.0


#: default sensor noise: photon counts at full scale (drawn log-uniformly) and the largest read noise
PHOTONS = (100.0, 10000.0)
READ_NOISE = 0.01


def make_stack(image: np.ndarray, rng: np.random.Generator, patch: int = 112, n: int = 4,
               photons: tuple[float, float] = PHOTONS, read_noise: float = READ_NOISE) -> dict[str, np.ndarray]:
    """One training focus sweep from an all-in-focus picture (see the module docstring).
    ``photons`` (lo, hi) and ``read_noise`` set the range of the sensor noise.

    Returns ``stack`` (N, 1, P, P) float32 luminances in [0, 1], ``truth`` (1, P, P) float32 and
    ``depth`` (N, P, P) float32 one-hot of the image in which each pixel's front layer is in focus.
    """
    truth = _crop(luminance(image), rng, patch)
    kind = rng.choice(3, p=[0.4, 0.35, 0.25])
    psf, opts = ("disk", {}) if kind == 0 else ("polygon", {"blades": int(rng.integers(5, 10)),
                                                         "rotation": float(rng.uniform(0, np.pi))}) \
        if kind == 1 else ("gaussian", {})
    max_radius = float(rng.uniform(max(1.5, 0.8 * (n - 1)), min(16.0, 4.0 * (n - 1) + 4.0)))
    layers = int(rng.integers(2, min(n, 5) + 1))
    stack, _, depth = render_focus_stack(truth, n, rng=rng, psf=psf, psf_options=opts, max_radius=max_radius,
                                         noise_sigma=0.0, layers=layers, thin_prob=0.3,
                                         depth_jitter=0.3 if rng.random() < 0.5 else 0.0)
    if rng.random() < 0.5:
        stack = [_misregister(s, rng) for s in stack]
    count = float(np.exp(rng.uniform(np.log(photons[0]), np.log(photons[1]))))
    read = float(rng.uniform(0.0, read_noise))
    jpeg = int(rng.integers(50, 96)) if rng.random() < 0.3 else None
    stack = [_sensor(s, rng, count, read, jpeg) for s in stack]
    onehot = (depth[None] == np.arange(n, dtype=depth.dtype)[:, None, None]).astype(np.float32)
    return {"stack": np.stack(stack)[:, None], "truth": truth[None], "depth": onehot}


def make_batch(images: Sequence[np.ndarray], rng: np.random.Generator, patch: int = 112,
               n: int | None = None, photons: tuple[float, float] = PHOTONS,
               read_noise: float = READ_NOISE) -> dict[str, np.ndarray]:
    """One stack per image, all of one size N (drawn from :data:`SIZES` unless given):
    ``stack`` (B, N, 1, P, P), ``truth`` (B, 1, P, P), ``depth`` (B, N, P, P)."""
    n = int(rng.choice(SIZES, p=SIZE_P)) if n is None else int(n)
    samples = [make_stack(img, rng, patch, n, photons, read_noise) for img in images]
    return {k: np.stack([s[k] for s in samples]) for k in ("stack", "truth", "depth")}
