"""The result of fusing one stack: the fused image plus the per-source decision weights."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class FusionResult:
    """One fused stack.

    fused:   the all-in-focus image, same dtype and layout as the sources: (H, W) or (H, W, C).
    weights: (H, W, N) float32 per-source decision weights summing to 1 per pixel, or None for
             methods that fuse in a transform domain (DWT) and have no spatial decision.
    method:  the method / model name that produced it.
    stats:   free-form facts for the manifest and logs (engine, precision, calibration, timings).
    stored_index_map: (H, W) uint16 source index, for results of deep stacks that stream their
             planes and so carry no (H, W, N) weights (``weights`` is then None).
    """

    fused: np.ndarray
    weights: np.ndarray | None
    method: str
    stats: dict = field(default_factory=dict)
    stored_index_map: np.ndarray | None = field(default=None, repr=False)

    @property
    def index_map(self) -> np.ndarray | None:
        """(H, W) uint16 index of the source chosen at each pixel (a depth map for focus stacks)."""
        if self.weights is None:
            return self.stored_index_map
        return np.argmax(self.weights, axis=-1).astype(np.uint16)

    @property
    def decision_map(self) -> np.ndarray | None:
        """(H, W) float32 weight of the first source; for pairs, the classic decision map D."""
        if self.weights is None:
            return None
        return self.weights[..., 0]
