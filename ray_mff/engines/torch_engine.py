"""Eager PyTorch engine: the numerical reference every other engine is checked against.

Runs a decision model's two sub-graphs (``encode`` once per image, ``decide`` once per compared
pair; see :mod:`ray_mff.engines.base`) on numpy arrays under ``torch.inference_mode``.

Example:
    >>> import numpy as np
    >>> from ray_mff.models import get_model
    >>> eng = TorchEngine(get_model("cascade", weights=None))
    >>> y = np.random.rand(2, 1, 33, 41).astype(np.float32)
    >>> f = eng.encode(y)
    >>> eng.decide(f[:1], f[1:], y[:1], y[1:]).shape
    (1, 1, 33, 41)
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ray_mff.engines.base import crop_to, pad_to_multiple


class TorchEngine:
    """A model on one torch device with numpy in / numpy out.

    model:  an ``nn.Module`` with ``encode(y)`` and ``decide(fa, fb, ya, yb)`` (put in eval mode).
    device: ``"cpu"`` or ``"cuda:0"``...
    """

    name = "torch"
    precision = "fp32"

    def __init__(self, model: nn.Module, device: str = "cpu"):
        self.device = str(device)
        self.model = model.eval().to(self.device)
        self.stride = int(getattr(model, "stride", 1))
        self.model_name = getattr(model, "registry_name", type(model).__name__)
        # what decide returns and the model's own post-processing (see ray_mff.engines.base)
        self.output = getattr(model, "output", "decision")
        self.postprocess = getattr(model, "postprocess", None)

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def encode(self, y: np.ndarray) -> np.ndarray:
        """(B, 1, H, W) float32 luminance in [0, 1] -> (B, C, H', W') float32 features (H', W' padded to stride)."""
        with torch.inference_mode():
            return self.model.encode(self._t(pad_to_multiple(y, self.stride))).float().cpu().numpy()

    def decide(self, feats_a: np.ndarray, feats_b: np.ndarray, y_a: np.ndarray, y_b: np.ndarray) -> np.ndarray:
        """Features (B, C, H', W') and luminances (B, 1, H, W) of A and B -> D (B, 1, H, W) float32 in [0, 1]."""
        h, w = y_a.shape[-2:]
        ya, yb = (self._t(pad_to_multiple(y, self.stride)) for y in (y_a, y_b))
        with torch.inference_mode():
            d = self.model.decide(self._t(feats_a), self._t(feats_b), ya, yb)
            return crop_to(d.float().cpu().numpy(), h, w)

    def describe(self) -> dict:
        return {"engine": self.name, "precision": self.precision, "device": self.device, "model": self.model_name}
