"""Decision calibration: N-1 pairwise decision maps of a reference image -> one choice over N sources.

A pair network answers "is A sharper than B here?" with D = P(A in focus). For a stack of N
images we encode every image once and run the decision path of one *reference* image r against
each other image k, giving D_k = P(r sharper than k). To turn these N-1 answers into one per-pixel
choice over all N images we read the decision logit as a difference of per-image focus scores,
as in a Bradley-Terry model (the network is exactly antisymmetric, D(A, B) = 1 - D(B, A), so the
reading is consistent):

    logit(D_k) = f_r - f_k   =>   s_k = f_k - f_r = logit(1 - D_k),   s_r = 0.

So s_k is image k's focus score relative to the reference, and argmax_k s_k is the sharpest image
whatever the reference. A near-binary network saturates: every image much sharper than r gets the
same clipped score (|s| <= L, i.e. D clipped to [1e-4, 1 - 1e-4]). The tie is broken by a
local focus measure m_k of each image's luminance (log energy of the Laplacian over a 31 px window),
added with a small weight ``beta``:

    score_k = clip(s_k, -L, L) + beta * log(1 + m_k / m0)

and the choice is ``argmax_k score_k`` (``mode="argmax"``: one-hot weights, no blur from mixing
differently focused images) or ``softmax(score / temperature)`` (``mode="softmax"``: soft weights).
Both are computed in one streaming pass (:class:`DecisionCalibrator`), so a 65-image stack never
holds more than one decision map and the running best in memory.

A hard argmax is discontinuous where two images score the same: a rounding difference of 1e-7
(e.g. the same pixel computed in another tile, or by another engine) can switch the chosen source
and change the fused value by tens of grey levels. So the argmax is made continuous near ties:
where the best two scores are closer than ``tie_margin`` (0.25, about 1.5 % of the score range),
their weights move linearly from 50/50 at an exact tie to one-hot at the margin,

    w_best = 1/2 + (s_1 - s_2) / (2 tie_margin),   w_second = 1 - w_best.

Only near-tied pixels are affected, and they blend two images the network rates as equally sharp.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ray_mff.fusion.focus_measure import laplacian_energy

#: D is clipped to [EPS, 1 - EPS] before the logit: L = logit(1 - EPS) ~ 9.2
EPS = 1e-4
#: scale of the focus measure inside the log (the energy of the Laplacian of a [0, 1] image)
M0 = 1e-4
#: score gap below which the argmax blends the best two images (see the module docstring). N-source
#: Q_G calibrated minus serial (shipped cascade, beta 0.5) for margins 0.05 / 0.25 / 0.5 / 1 / 2:
#: lytro-04 triple -0.0055 / -0.0046 / -0.0037 / -0.0027 / -0.0012; a 9-image 800x600 subset of
#: stack_v4 +0.0011 / -0.0015 / -0.0062 / -0.0154 / -0.0286; the other triples within 0.0025 of
#: their 0.05 values. A wider blend smooths the non-transitive pairwise decisions along a triple's
#: boundaries, but blurs many-image stacks, whose neighbouring focus slices score alike; 0.25 (a
#: 56/44 % pairwise preference) is the widest that keeps both within 0.005.
TIE_MARGIN = 0.25
#: weight of the tie-break measure. With the cascade shipped before 2026-11-22, N-source Q_G
#: calibrated minus serial on a 9-image 800x600 subset of stack_v4: -0.0505 (0), -0.0067 (0.1),
#: -0.0037 (0.25), -0.0021 (0.5), -0.0004 (1.0); the Lytro triples move by at most 0.0004 over
#: 0.1-1.0. 0.5 keeps the network's decision first (it only reorders images the network scores
#: within about 1 logit of each other).
BETA = 0.5


def relative_scores(d: np.ndarray, eps: float = EPS) -> np.ndarray:
    """D_k = P(reference sharper than k) (H, W) -> s_k = logit(1 - D_k), clipped to +-logit(1 - eps)."""
    dd = np.clip(np.asarray(d, dtype=np.float32), eps, 1.0 - eps)
    s = np.subtract(np.float32(1.0), dd)
    np.divide(s, dd, out=s)  # (1 - D) / D, then its log: logit(1 - D)
    return np.log(s, out=s)


def tie_break_measure(lum: np.ndarray, window: int = 31) -> np.ndarray:
    """log(1 + EOL / m0) of a (H, W) float32 luminance: the tie-breaking focus measure.

    The wide window (31 px) keeps the choice among tied images coherent over flat or noisy areas,
    where a small window would switch between equally blurred sources pixel by pixel and create
    false edges (on a 9-image subset of stack_v4 the N-source Q_G rises from 0.303 with 7 px to
    0.307 with 31 px; serial pair-by-pair fusion gives 0.310, no tie-break 0.279).
    """
    return np.log1p(laplacian_energy(lum, window) / M0).astype(np.float32)


class DecisionCalibrator:
    """Streaming form of :func:`calibrate_decisions` (one decision map at a time).

    >>> cal = DecisionCalibrator(n=3, reference=1, shape=(4, 4))
    >>> cal.add_reference()
    >>> cal.add(0, np.full((4, 4), 0.9, np.float32))   # reference beats image 0
    >>> cal.add(2, np.full((4, 4), 0.1, np.float32))   # image 2 beats the reference
    >>> int(cal.index_map()[0, 0])
    2
    """

    def __init__(self, n: int, reference: int, shape: tuple[int, int], *, mode: str = "argmax",
                 temperature: float = 1.0, beta: float = BETA, eps: float = EPS, tie_margin: float = TIE_MARGIN):
        if mode not in ("argmax", "softmax"):
            raise ValueError(f"mode must be 'argmax' or 'softmax', got {mode!r}")
        if not 0 <= reference < n:
            raise ValueError(f"reference {reference} outside [0, {n})")
        self.n, self.reference, self.shape = n, reference, tuple(shape)
        self.mode, self.temperature, self.beta, self.eps = mode, float(temperature), float(beta), eps
        self.tie_margin = float(tie_margin)
        self.best = np.full(self.shape, -np.inf, np.float32)
        self.index = np.zeros(self.shape, np.uint16)
        # runner-up score and index, for the continuous argmax near ties
        self.second = np.full(self.shape, -np.inf, np.float32)
        self.second_index = np.zeros(self.shape, np.uint16)
        self.scores = np.zeros(self.shape + (n,), np.float32) if mode == "softmax" else None
        self._seen: set[int] = set()

    def _add_score(self, k: int, score: np.ndarray) -> None:
        if k in self._seen:
            raise ValueError(f"image {k} added twice")
        self._seen.add(k)
        # branch-free updates (masked copies cost ~1.6 ms each on a 520 x 520 map, these ~0.1 ms):
        # uint16 arithmetic wraps, so a + m * (b - a) is b where m is True and a elsewhere
        k16 = np.uint16(k)
        better = score > self.best
        cand = np.minimum(self.best, score)  # the runner-up candidate: the old best where k wins, else k
        cand_index = k16 + better * (self.index - k16)
        moved = better | (cand > self.second)
        self.second_index += moved * (cand_index - self.second_index)
        np.maximum(self.second, cand, out=self.second)
        self.index += better * (k16 - self.index)
        np.maximum(self.best, score, out=self.best)
        if self.scores is not None:
            self.scores[..., k] = score

    def add_reference(self, measure: np.ndarray | None = None) -> None:
        """The reference itself: relative score 0 (+ beta * its tie-break measure)."""
        score = np.zeros(self.shape, np.float32)
        if measure is not None:
            score += self.beta * measure
        self._add_score(self.reference, score)

    def add(self, k: int, decision: np.ndarray, measure: np.ndarray | None = None) -> None:
        """decision: (H, W) D = P(reference sharper than image k); measure: (H, W) tie-break of image k."""
        if k == self.reference:
            raise ValueError("use add_reference() for the reference image")
        score = relative_scores(decision, self.eps)
        if measure is not None:
            score += self.beta * measure
        self._add_score(k, score)

    def index_map(self) -> np.ndarray:
        """(H, W) uint16 index of the chosen source."""
        self._check()
        return self.index

    def weights(self) -> np.ndarray:
        """(H, W, N) float32 weights summing to 1: argmax (one-hot, continuous near ties) or softmax."""
        self._check()
        if self.mode == "argmax":
            out = np.zeros(self.shape + (self.n,), np.float32)
            if self.tie_margin > 0:
                gap = self.best - self.second  # +inf where only one image was added (N = 1)
                w_best = np.minimum(1.0, 0.5 + gap / (2.0 * self.tie_margin)).astype(np.float32)
            else:
                w_best = np.ones(self.shape, np.float32)
            np.put_along_axis(out, self.second_index[..., None].astype(np.intp), (1.0 - w_best)[..., None], axis=2)
            np.put_along_axis(out, self.index[..., None].astype(np.intp), w_best[..., None], axis=2)
            return out
        z = (self.scores - self.best[..., None]) / self.temperature
        np.exp(z, out=z)
        z /= z.sum(axis=2, keepdims=True)
        return z

    def weight(self, k: int) -> np.ndarray | None:
        """(H, W) float32 weight of source k, equal to ``weights()[..., k]`` (argmax mode), or None
        where it is 0 everywhere: a weight source for :func:`ray_mff.fusion.decision.fuse_with_weights`
        that never builds the (H, W, N) array, so a deep stack fuses in one plane's memory."""
        self._check()
        if self.mode != "argmax":
            return self.weights()[..., k]
        if self.tie_margin > 0:
            w_best = np.minimum(1.0, 0.5 + (self.best - self.second) / (2.0 * self.tie_margin)).astype(np.float32)
        else:
            w_best = np.ones(self.shape, np.float32)
        # as weights(): the runner-up's share is written first, the best's over it
        out = np.where(self.index == k, w_best, np.where(self.second_index == k, 1.0 - w_best, 0.0)).astype(np.float32)
        return out if out.any() else None

    def _check(self) -> None:
        if len(self._seen) != self.n:
            missing = sorted(set(range(self.n)) - self._seen)
            raise ValueError(f"calibration still misses images {missing}")


def calibrate_decisions(pair_maps: Sequence[np.ndarray] | np.ndarray, reference: int, n: int, *,
                        measures: Sequence[np.ndarray] | np.ndarray | None = None, mode: str = "argmax",
                        temperature: float = 1.0, beta: float = BETA) -> np.ndarray:
    """N-1 decision maps of ``reference`` vs each other image -> (H, W, N) float32 weights.

    pair_maps: N-1 maps (H, W) (or an (H, W, N-1) array), in the order of the other images
               (0, 1, ..., reference-1, reference+1, ..., N-1); map k holds D = P(reference sharper
               than that image), the ``decide(reference, other)`` output.
    measures:  optional N tie-break focus measures (H, W) (:func:`tie_break_measure`), one per image.
    mode:      ``"argmax"`` (one-hot weights) or ``"softmax"`` (soft weights, ``temperature``).
    See the module docstring for the rule.
    """
    maps = [pair_maps[..., i] for i in range(pair_maps.shape[-1])] if isinstance(pair_maps, np.ndarray) \
        and pair_maps.ndim == 3 else list(pair_maps)
    if len(maps) != n - 1:
        raise ValueError(f"{len(maps)} decision maps for a stack of {n} images (need {n - 1})")
    if measures is not None:
        measures = [measures[..., i] for i in range(n)] if isinstance(measures, np.ndarray) and measures.ndim == 3 \
            else list(measures)
    others = [k for k in range(n) if k != reference]
    cal = DecisionCalibrator(n, reference, maps[0].shape, mode=mode, temperature=temperature, beta=beta)
    cal.add_reference(None if measures is None else measures[reference])
    for k, d in zip(others, maps):
        cal.add(k, d, None if measures is None else measures[k])
    return cal.weights()
