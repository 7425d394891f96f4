"""Consistency verification of a decision map: small-region removal, then guided-filter refinement.

Follows Y. Liu, X. Chen, H. Peng, Z. Wang, "Multi-focus image fusion with a deep convolutional
neural network", Information Fusion 36 (2017), Sec. 3.3-3.4: the focus map is thresholded at 0.5
into a binary decision map; regions smaller than an area threshold (0.01 x H x W there) are
reversed, both small foreground blobs and small holes, since a focused object is rarely that small
and isolated; finally the binary map is refined by a guided filter (He et al. 2013; r = 8,
eps = 0.1) whose guide is the initial fused image, so that the decision follows its edges.

For N-image stacks the same idea is stated on an index map: every connected region of one source
index smaller than the threshold is relabelled to the majority label around it, then each one-hot
channel is guided-filtered and the N weights renormalised.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage import measure

from ray_mff.fusion.decision import one_hot
from ray_mff.fusion.guided_filter import make_guided_filter

#: weight of a vote cast by a neighbour that itself lies in a small region: such neighbours only
#: decide when a small region has no large neighbour at all (salt-and-pepper clusters).
_SMALL_NEIGHBOUR_VOTE = 1e-3
_SHIFTS_8 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def min_region_area(shape: tuple[int, ...], area_ratio: float) -> int:
    """Area threshold in pixels: ``area_ratio`` x H x W (Liu et al. 2017 use 0.01)."""
    return int(round(float(area_ratio) * shape[0] * shape[1]))


def _small_components(
    index_map: np.ndarray, min_area: int, evidence: np.ndarray | None, keep_evidence: float
) -> tuple[np.ndarray, int]:
    """Label every 8-connected region of one index with area < min_area by a unique id > 0.

    One labelling pass over the whole multi-label map (regions = 8-connected pixels of equal
    index), instead of one binary pass per source. With ``evidence``, a small region whose mean
    evidence reaches ``keep_evidence`` is not labelled.
    """
    regions = measure.label(index_map, background=-1, connectivity=2).ravel()  # ids 1..count
    area = np.bincount(regions)
    small = area < min_area
    small[0] = False  # id 0 is unused (no pixel is background)
    if evidence is not None and small.any():
        mean_evidence = np.bincount(regions, weights=evidence.ravel(), minlength=area.size) / np.maximum(area, 1)
        small &= mean_evidence < keep_evidence
    ids = np.flatnonzero(small)
    remap = np.zeros(area.size, dtype=np.int32)
    remap[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return remap[regions].reshape(index_map.shape), int(ids.size)


def relabel_small_regions(
    index_map: np.ndarray,
    n: int,
    min_area: int,
    *,
    evidence: np.ndarray | None = None,
    keep_evidence: float = np.log(4.0),
    max_iter: int = 8,
) -> np.ndarray:
    """Relabel every region of one index smaller than ``min_area`` to its surrounding majority index.

    index_map:     (H, W) integer map of source indices in [0, n).
    evidence:      optional (H, W) float focus evidence per pixel, e.g. log(best / second-best
                   focus measure) (``focus_index_map``). A small region whose mean evidence is at
                   least ``keep_evidence`` (default log 4: its focus measure is typically four
                   times the runner-up's) is kept: it is a small object in focus, not a
                   misclassified patch of a flat area. None = Liu et al.'s pure area rule.
    Returns an (H, W) int32 map. For n = 2 this is exactly Liu et al.'s reversal of small regions
    of both polarities (a small region's whole 8-neighbourhood is the other label). For n > 2 each
    small region takes the index most of its outside neighbours carry, counting neighbours in
    large regions first; the pass repeats until no small region changes (or ``max_iter``).
    """
    idx = np.asarray(index_map).astype(np.int32)
    if min_area <= 1:
        return idx
    if evidence is not None:
        evidence = np.asarray(evidence, dtype=np.float64)
        if evidence.shape != idx.shape:
            raise ValueError(f"evidence {evidence.shape} does not match index_map {idx.shape}")
    h, w = idx.shape
    for _ in range(max_iter):
        comp, count = _small_components(idx, min_area, evidence, keep_evidence)
        if count == 0:
            break
        votes = np.zeros((count + 1) * n, dtype=np.float64)
        for dy, dx in _SHIFTS_8:
            # pixel p = (y, x) and its neighbour q = (y + dy, x + dx), both inside the image
            ys, yd = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
            xs, xd = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
            c_p, c_q, l_q = comp[ys, xs], comp[yd, xd], idx[yd, xd]
            sel = (c_p > 0) & (c_q != c_p)
            if not sel.any():
                continue
            wq = np.where(c_q[sel] == 0, 1.0, _SMALL_NEIGHBOUR_VOTE)
            votes += np.bincount(c_p[sel] * n + l_q[sel], weights=wq, minlength=votes.size)
        votes = votes.reshape(count + 1, n)
        has_vote = votes.sum(axis=1) > 0
        new_label = np.argmax(votes, axis=1).astype(np.int32)
        inside = comp > 0
        cids = comp[inside]
        old = idx[inside]
        new = np.where(has_vote[cids], new_label[cids], old)
        if np.array_equal(new, old):
            break
        idx[inside] = new
    return idx


def verify_index_map(
    index_map: np.ndarray,
    n: int,
    sources_lum: Sequence[np.ndarray],
    *,
    area_ratio: float = 0.01,
    radius: int = 8,
    eps: float = 0.1,
    refine: bool = True,
    evidence: np.ndarray | None = None,
    keep_evidence: float = np.log(4.0),
) -> np.ndarray:
    """N-source consistency verification: index map -> (H, W, N) float32 weights summing to 1.

    index_map:   (H, W) integer index of the sharpest source per pixel, values in [0, n).
    sources_lum: N (H, W) float32 luminances in [0, 1] (``luminance(img)``), for the guide.
    area_ratio:  regions smaller than area_ratio x H x W are relabelled (0 disables).
    radius, eps: guided filter window radius and regulariser (Liu et al. 2017: 8 and 0.1).
    refine:      False returns the cleaned hard (one-hot) decision without guided filtering.
    evidence, keep_evidence: optional per-pixel focus evidence protecting small, clearly focused
                 regions from removal (``relabel_small_regions``); None = Liu et al.'s area rule.
    """
    idx = np.asarray(index_map)
    if len(sources_lum) != n:
        raise ValueError(f"{len(sources_lum)} luminance maps for n={n} sources")
    idx = relabel_small_regions(
        idx, n, min_region_area(idx.shape, area_ratio), evidence=evidence, keep_evidence=keep_evidence
    )
    if not refine:
        return one_hot(idx, n)
    refined = RefinedWeights(idx, n, decision_guide(idx, sources_lum), radius, eps)
    weights = np.zeros(idx.shape + (n,), dtype=np.float32)
    for k in range(n):
        wk = refined.weight(k)
        if wk is not None:
            weights[..., k] = wk
    return weights


def decision_guide(index_map: np.ndarray, sources_lum: Sequence[np.ndarray]) -> np.ndarray:
    """Guide of the refinement: luminance of the initial (hard-decision) fused image, Liu et al.
    2017 Sec. 3.4. Reads only the sources the map chooses, one at a time (``sources_lum`` may be lazy);
    a sequence offering ``read_regions`` (an aligned stack) only over the tiles where it is chosen."""
    from ray_mff.fusion.decision import nonzero_windows

    idx = np.asarray(index_map)
    guide = np.zeros(idx.shape, dtype=np.float32)
    read_regions = getattr(sources_lum, "read_regions", None)
    for k in np.flatnonzero(np.bincount(idx.ravel().astype(np.intp), minlength=len(sources_lum))):
        sel = idx == k
        if read_regions is None:
            guide[sel] = np.asarray(sources_lum[int(k)], dtype=np.float32)[sel]
            continue
        windows = nonzero_windows(sel)
        for (y0, y1, x0, x1), part in zip(windows, read_regions(int(k), windows)):
            s = sel[y0:y1, x0:x1]
            guide[y0:y1, x0:x1][s] = np.asarray(part, dtype=np.float32)[s]
    return guide


class RefinedWeights:
    """Guided-filter refinement of a hard index map, one source's weight map at a time.

    ``weight(k)`` is slice k of the (H, W, N) weights ``verify_index_map`` returns: GF(index == k)
    over the decision guide, clipped at 0 and normalised to sum 1 per pixel (pixels where all are
    0 get 1/N); None for a source of weight 0 everywhere. Only the per-pixel total is kept (one
    float32 map), so a 100-plane stack needs two maps, not 100: weights are recomputed on demand
    (one guided filter each), which costs a second filter pass instead of N maps of memory.
    The total is summed source by source in index order; ``normalize_weights``' ``sum(axis=2)``
    adds the same terms in the same order for N < 8 (numpy's pairwise summation unrolls 8-wide
    above that), so weights are bit-identical for small stacks and within float32 rounding above.
    """

    def __init__(self, index_map: np.ndarray, n: int, guide: np.ndarray, radius: int = 8, eps: float = 0.1):
        self.idx, self.n = np.asarray(index_map), int(n)
        counts = np.bincount(self.idx.ravel().astype(np.intp), minlength=self.n)
        self.present = [int(k) for k in np.flatnonzero(counts)]
        self.gf = make_guided_filter(guide, radius, eps) if len(self.present) > 1 else None
        self.total = self.empty = self._pair = None
        if len(self.present) == 2:
            # The guided filter is linear and keeps constants, so GF(1 - D) = 1 - GF(D): one pass.
            d = self.gf((self.idx == self.present[0]).astype(np.float32))
            self._pair = np.clip(d, 0.0, 1.0, out=d)
        elif len(self.present) > 2:
            total = np.zeros(self.idx.shape, np.float32)
            for k in self.present:
                total += np.maximum(self._filtered(k), 0.0)
            self.empty = total <= 1e-12
            self.total = np.where(self.empty, np.float32(1.0), total)
            if not self.empty.any():
                self.empty = None

    def _filtered(self, k: int) -> np.ndarray:
        return self.gf((self.idx == k).astype(np.float32))

    def weight(self, k: int) -> np.ndarray | None:
        if len(self.present) == 1:
            return np.ones(self.idx.shape, np.float32) if k == self.present[0] else None
        if self._pair is not None:
            if k == self.present[0]:
                return self._pair
            return 1.0 - self._pair if k == self.present[1] else None
        if k in self.present:  # sources never chosen keep weight 0 (GF of a zero map is zero)
            w = np.maximum(self._filtered(k), 0.0)
            np.divide(w, self.total, out=w)
        elif self.empty is None:
            return None
        else:
            w = np.zeros(self.idx.shape, np.float32)
        if self.empty is not None:
            w[self.empty] = 1.0 / self.n
        return w


def verify_decision_map(
    decision: np.ndarray,
    sources_lum: Sequence[np.ndarray],
    *,
    area_ratio: float = 0.01,
    radius: int = 8,
    eps: float = 0.1,
    refine: bool = True,
) -> np.ndarray:
    """Pair form (Liu et al. 2017): focus/decision map of source A -> refined (H, W) float32 weight of A.

    decision:    (H, W) float; values >= 0.5 choose source A (the first), below choose B.
    sources_lum: [lum_A, lum_B], (H, W) float32 luminances in [0, 1].
    Returns D in [0, 1]; source B's weight is 1 - D.
    """
    if len(sources_lum) != 2:
        raise ValueError(f"verify_decision_map takes a pair, got {len(sources_lum)} luminance maps")
    index_map = (np.asarray(decision) < 0.5).astype(np.int32)  # 0 -> A, 1 -> B
    w = verify_index_map(index_map, 2, sources_lum, area_ratio=area_ratio, radius=radius, eps=eps, refine=refine)
    return w[..., 0]
