"""Fusion engines: one small protocol, several back ends.

An engine runs a decision model's two sub-graphs on numpy arrays:
``encode(y (B,1,H,W) float32) -> features`` and ``decide(fa, fb, ya, yb) -> D (B,1,H,W)``,
and reports ``name``, ``precision`` and ``device``.
"""
from __future__ import annotations


def make_engine(model_name: str, *, engine: str = "auto", precision: str = "fp32", weights="default"):
    """Build the engine that runs ``model_name``. (torch eager for now; ONNX/TensorRT arrive with issue 4.)"""
    from ray_mff.engines.torch_engine import TorchEngine
    from ray_mff.models import get_model

    if engine not in ("auto", "torch"):
        raise ValueError(f"engine {engine!r} is not available yet; use 'torch'")
    return TorchEngine(get_model(model_name, weights=weights))
