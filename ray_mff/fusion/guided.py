"""Focus-measure + guided-filter fusion: a classical decision-map method for N >= 2 sources.

Pipeline (per stack):
  1. focus measure per source on luminance (energy of the Laplacian by default; Huang & Jing 2007),
  2. per-pixel argmax over sources -> index map (the "initial decision map"),
  3. consistency verification: small-region relabelling, then guided-filter refinement with the
     initial fused image as guide (Liu et al. 2017, Sec. 3.3-3.4; He et al. 2013),
  4. F = sum_n W_n * I_n on every channel.
Every step is a fold over the planes or works on (H, W) maps, so a lazy plane sequence
(:mod:`ray_mff.planes`) is read three times (focus measure; guide; blend) and never held whole:
peak memory is a few (H, W) maps plus one plane, whatever N. Results equal the whole-stack
computation (bit-identical for N < 8; see :class:`ray_mff.fusion.consistency.RefinedWeights`).
An aligned stack (:class:`ray_mff.align.AlignedPlanes`) is read so that little is resampled:
focus is measured on the planes as read (the measure warped, its scale normalised), the guide
and the colour planes are warped only over the tiles where a plane is chosen or weighted.
It is Liu et al.'s post-processing with a hand-made focus measure in place of the CNN, close in
spirit to GFDF (Qiu et al., "Guided filter-based multi-focus image fusion through focus region
detection", Signal Processing: Image Communication 2019).
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

from ray_mff.fusion.consistency import RefinedWeights, decision_guide, min_region_area, relabel_small_regions
from ray_mff.fusion.decision import check_stack, fuse_with_weights, keep_full_weights, one_hot, select_planes
from ray_mff.fusion.focus_measure import FOCUS_MEASURES
from ray_mff.fusion.luminance import luminance
from ray_mff.fusion.result import FusionResult
from ray_mff.planes import mapped


#: how each focus measure scales with a plane's magnification s: as s^-p (derivative order x the
#: power it is raised to: the Laplacian squared, 2 x 2; spatial frequency, the root of squared
#: first differences, 1). An aligned stack measures focus on its planes as read and multiplies by
#: s^p (ray_mff.align.AlignedPlanes.focus_maps).
FOCUS_SCALE_POWER = {"laplacian_energy": 4.0, "sum_modified_laplacian": 4.0, "spatial_frequency": 1.0}


def focus_index_map(
    lums: Sequence[np.ndarray],
    focus_measure: Callable[[np.ndarray, int], np.ndarray],
    window: int,
    ambiguity_ratio: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel sharpest source and the evidence for it.

    Returns (index, evidence): index (H, W) uint16 of the source with the largest focus measure;
    evidence (H, W) float32 log(best / second-best focus measure), >= 0.

    Pixels where the best focus measure does not exceed ``ambiguity_ratio`` x the second best
    (flat or saturated areas, where every source looks alike, including exact ties) carry no
    decision of their own: they take the index of the nearest decided pixel. Left alone, a
    large flat area would default to one arbitrary source (ties) or to noise, and could join a
    genuinely focused region of that source into one large region that consistency verification
    then keeps, swallowing small textured areas inside it.
    Keeps running best/second maxima instead of an (H, W, N) stack of focus maps.
    """
    return index_from_focus_maps((focus_measure(lum, window) for lum in lums), ambiguity_ratio)


def index_from_focus_maps(focus_maps: Iterable[np.ndarray], ambiguity_ratio: float = 1.0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`focus_index_map` from the N focus maps themselves ((H, W) float32 each, consumed once)."""
    maps = iter(focus_maps)
    best = np.array(next(maps), dtype=np.float32)
    second = np.zeros_like(best)
    index = np.zeros(best.shape, dtype=np.uint16)
    for k, fm in enumerate(maps, start=1):
        better = fm > best
        index[better] = k
        np.copyto(second, np.where(better, best, np.maximum(second, fm)))
        np.maximum(best, fm, out=best)
    ambiguous = best <= np.float32(ambiguity_ratio) * second
    if ambiguous.any() and not ambiguous.all():
        # Voronoi labelling: every ambiguous (non-zero) pixel gets the label of its nearest decided
        # (zero) pixel; decided pixels carry their own label, through which we look up their index.
        _, labels = cv2.distanceTransformWithLabels(
            ambiguous.view(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
        )
        decided = ~ambiguous
        lut = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
        lut[labels[decided]] = index[decided]
        index = lut[labels]
    tiny = np.float32(1e-12)  # flat, noise-free areas have a focus measure of exactly 0
    evidence = np.log((best + tiny) / (second + tiny))
    return index, evidence


def fuse_guided(
    images: Sequence[np.ndarray],
    *,
    window: int = 7,
    focus_measure: str = "laplacian_energy",
    ambiguity_ratio: float = 1.5,
    keep_ratio: float | None = 4.0,
    area_ratio: float = 0.01,
    radius: int = 8,
    eps: float = 0.1,
    refine: bool = True,
) -> FusionResult:
    """Fuse N >= 2 registered images with a focus-measure decision map and consistency verification.

    images:        N arrays (H, W) or (H, W, C), one dtype (uint8, uint16 or float32 in [0, 1]).
    window:        focus-measure window side (pixels). 7 is best on the Lytro pairs (mean Q_G
                   0.762; 5 and 9-15 within 0.0006); larger windows smear the decision boundary.
    focus_measure: a key of ``FOCUS_MEASURES`` ("laplacian_energy", "sum_modified_laplacian",
                   "spatial_frequency"); all three score within 0.0004 Q_G of each other on Lytro.
    ambiguity_ratio: pixels whose best focus measure is at most this multiple of the runner-up
                   take the nearest decided pixel's index (``focus_index_map``).
    keep_ratio:    small regions whose mean best/second-best focus ratio (geometric mean) is at
                   least this are kept by the small-region removal; None = Liu et al.'s pure area
                   rule. Rescues small in-focus objects (a highlight, a badge) that a flat area of
                   the wrong source would otherwise swallow; no effect on Lytro Q_G.
    area_ratio, radius, eps, refine: consistency verification knobs (``verify_index_map``),
                   defaults as in Liu et al. 2017 (0.01, 8, 0.1, guided refinement on).

    Returns FusionResult(fused same shape/dtype, weights (H, W, N) float32, method "guided"); a
    stack whose weights exceed ``FULL_WEIGHTS_MAX_BYTES`` (64 MiB: e.g. 10 planes of 2048 x 2048)
    carries ``weights=None`` and its ``index_map`` instead, so memory does not grow with N.

    Example:
        >>> from ray_mff.synthetic import render_focus_stack
        >>> import skimage.data
        >>> stack, truth, depth = render_focus_stack(skimage.data.camera(), 3, seed=0)
        >>> fuse_guided(stack).fused.shape
        (512, 512)
    """
    check_stack(images)
    if focus_measure not in FOCUS_MEASURES:
        raise ValueError(f"unknown focus measure {focus_measure!r}; choose from {sorted(FOCUS_MEASURES)}")
    t0 = time.perf_counter()
    n = len(images)
    if callable(getattr(images, "focus_maps", None)):
        # an aligned stack (ray_mff.align.AlignedPlanes) warps what each step uses: focus measured
        # on the planes as read, the measure resampled; the guide's luminance by region; the
        # colour planes only where their weight is non-zero (fuse_with_weights)
        lums = images.luminance_view()
        maps = images.focus_maps(FOCUS_MEASURES[focus_measure], window, FOCUS_SCALE_POWER[focus_measure])
        index, evidence = index_from_focus_maps(maps, ambiguity_ratio)
    else:
        lums = mapped(images, luminance)  # lazy for a PlaneSequence: one luminance at a time
        index, evidence = focus_index_map(lums, FOCUS_MEASURES[focus_measure], window, ambiguity_ratio)
    index = relabel_small_regions(index, n, min_region_area(index.shape, area_ratio),
                                  evidence=evidence if keep_ratio else None,
                                  keep_evidence=float(np.log(keep_ratio)) if keep_ratio else 0.0)
    del evidence
    t1 = time.perf_counter()
    if refine:
        weights = RefinedWeights(index, n, decision_guide(index, lums), radius, eps)
    else:
        weights = None
    t2 = time.perf_counter()
    keep = keep_full_weights(index.shape, n)
    if weights is None:
        fused = select_planes(images, index)
        full = one_hot(index, n) if keep else None
        chosen = index.astype(np.uint16)
    else:
        tracker = _ArgmaxTracker(weights)
        fused = fuse_with_weights(images, tracker)
        full = np.zeros(index.shape + (n,), np.float32) if keep else None
        chosen = None if keep else tracker.index
        if keep:
            for k in range(n):
                wk = weights.weight(k)
                if wk is not None:
                    full[..., k] = wk
    t3 = time.perf_counter()
    stats = {
        "focus_measure": focus_measure,
        "window": int(window),
        "ambiguity_ratio": float(ambiguity_ratio),
        "keep_ratio": keep_ratio,
        "area_ratio": float(area_ratio),
        "radius": int(radius),
        "eps": float(eps),
        "refine": bool(refine),
        "time_focus_s": t1 - t0,
        "time_consistency_s": t2 - t1,
        "time_blend_s": t3 - t2,
    }
    return FusionResult(fused=fused, weights=full, method="guided", stats=stats, stored_index_map=chosen)


class _ArgmaxTracker:
    """A weight source passing ``weights.weight(k)`` through while keeping their running argmax
    (first maximum on ties, as ``np.argmax``): the index map of a result without full weights."""

    def __init__(self, weights: RefinedWeights):
        self.weights, self.best, self.index = weights, None, None

    def weight(self, k: int) -> np.ndarray | None:
        wk = self.weights.weight(k)
        if self.best is None:
            self.best = np.zeros(self.weights.idx.shape, np.float32) if wk is None else wk.copy()
            self.index = np.zeros(self.best.shape, np.uint16)
        elif wk is not None:
            better = wk > self.best
            self.index[better] = k
            np.maximum(self.best, wk, out=self.best)
        return wk
