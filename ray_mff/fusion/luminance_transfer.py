"""Colour for networks that fuse luminance directly: weights solved from the fused luminance.

Direct-fusion networks (``ssim``, ``mscnn``) map the two source luminances to a fused luminance
Y_F; they give no decision map to apply to the colour channels. We recover one, then transfer:

1. **weights solved from the fused luminance**: per pixel, the mix w of the sources that best
   explains Y_F, by least squares over a small window (the local-linear idea of He et al.'s guided
   filter, 2013), regularised towards 1/2 where the sources do not differ (there any w fits)::

       w = (box((Y_F - Y_B)(Y_A - Y_B)) + eps / 2) / (box((Y_A - Y_B)^2) + eps),   clipped to [0, 1]

2. **colour blend plus the luminance residual**: ``F = w A + (1 - w) B + (Y_F - (w Y_A + (1 - w) Y_B))``
   on every colour channel. Chroma comes from the solved blend of real source colours (no false
   colours at focus boundaries), and since luminance is linear in RGB, the luminance of F is Y_F
   exactly wherever nothing clips: what the network produced is what the user gets.

The alternative, YCbCr with the chroma of the source of larger local contrast, switches chroma
abruptly at focus boundaries; the solved weights vary smoothly where the network blends.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.random((8, 8, 3), dtype=np.float32), rng.random((8, 8, 3), dtype=np.float32)
    >>> from ray_mff.fusion.luminance import luminance
    >>> w = solve_weights(luminance(a), luminance(a), luminance(b))   # the network chose A
    >>> bool(w.mean() > 0.95)
    True
"""
from __future__ import annotations

import cv2
import numpy as np



def _box(x: np.ndarray, radius: int) -> np.ndarray:
    k = 2 * radius + 1
    return cv2.blur(x, (k, k), borderType=cv2.BORDER_REFLECT)


def solve_weights(fused_lum: np.ndarray, lum_a: np.ndarray, lum_b: np.ndarray, *, radius: int = 2,
                  eps: float = 1e-4) -> np.ndarray:
    """(H, W) float32 luminances in [0, 1] -> (H, W) float32 weight of A in [0, 1] (see module docstring)."""
    f = np.asarray(fused_lum, np.float32)
    a = np.asarray(lum_a, np.float32)
    b = np.asarray(lum_b, np.float32)
    diff = a - b
    num = _box((f - b) * diff, radius) + 0.5 * eps
    den = _box(diff * diff, radius) + eps
    return np.clip(num / den, 0.0, 1.0).astype(np.float32)


def luminance_channels(x: np.ndarray) -> slice:
    """The channels the luminance is computed from (:func:`ray_mff.fusion.luminance.luminance`):
    RGB of RGB/RGBA images, every channel of other multichannel images."""
    return slice(0, 3) if x.ndim == 3 and x.shape[2] in (3, 4) else slice(None)


def transfer_luminance(a: np.ndarray, b: np.ndarray, weight_a: np.ndarray, fused_lum: np.ndarray,
                       lum_a: np.ndarray | None = None, lum_b: np.ndarray | None = None) -> np.ndarray:
    """Unit-float sources (H, W) or (H, W, C) + weight of A (H, W) + fused luminance -> fused float32 image.

    F = w A + (1 - w) B, plus the luminance residual Y_F - (w Y_A + (1 - w) Y_B) added to the
    luminance channels; clipped to [0, 1]. Grey images give Y_F itself.
    """
    from ray_mff.fusion.luminance import luminance

    w = np.asarray(weight_a, np.float32)
    lum_a = luminance(a) if lum_a is None else lum_a
    lum_b = luminance(b) if lum_b is None else lum_b
    residual = np.asarray(fused_lum, np.float32) - (w * lum_a + (1.0 - w) * lum_b)
    if a.ndim == 2:
        out = w * a + (1.0 - w) * b + residual
    else:
        out = w[..., None] * a + (1.0 - w[..., None]) * b
        # RGB: Y = BT601 . RGB and the weights sum to 1, so adding r to R, G and B adds r to Y
        out[..., luminance_channels(a)] += residual[..., None]
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


__all__ = ["solve_weights", "transfer_luminance", "luminance_channels"]
