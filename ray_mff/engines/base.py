"""The engine protocol: what every back end (torch, ONNX Runtime, TensorRT) offers the fuser.

A decision model splits into two sub-graphs (see :class:`ray_mff.models.cascade.CascadeNet`):

- ``encode(y)``: luminance ``(B, 1, H, W)`` float32 in [0, 1] -> features ``(B, C, H, W)``,
  run once per image of a stack (the Siamese branch);
- ``decide(feats_a, feats_b, y_a, y_b)`` -> decision map ``D`` ``(B, 1, H, W)`` float32 in [0, 1],
  the probability that source A is in focus, run once per compared pair.

Engines load once (an actor's ``__init__``) and are then called per stack or per tile. Features
are *engine-native*: numpy arrays for torch/ONNX Runtime, torch CUDA tensors for TensorRT, so
features stay on the device between the two calls. Callers treat them as opaque arrays that
support batch slicing (``feats[i:i + 1]``), repeat them only with :func:`repeat_batch` (never a
numpy call: numpy cannot read a CUDA tensor), and pass them back to the same engine's ``decide``.
Decision maps always come back as numpy float32.

Two optional attributes say how to read ``decide``'s output (defaults for decision models):
``output`` is ``"decision"`` (a decision map D, the default), ``"focus"`` (a focus map the model's
``postprocess`` turns into decisions, e.g. ``cnn``'s consistency verification) or ``"fused"`` (the
fused luminance itself: direct-fusion networks such as ``ssim`` and ``mscnn``, whose ``decide``
graph is their fusion + reconstruction); ``postprocess`` is None or a dict such as
``{"kind": "consistency", "area_ratio": 0.01, "radius": 8, "eps": 0.1}``. Engines take both from
the model (:func:`ray_mff.engines.make_engine`); :class:`ray_mff.fusion.model_fuser.ModelFuser`
acts on them.

``describe()`` is what the log and the manifest say about the engine that *actually* ran
(ONNX Runtime's providers as the session reports them, TensorRT's GPU), not what was asked for.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

#: every precision an engine may run at
PRECISIONS = ("fp32", "fp16")
#: every value ``make_engine(engine=...)`` / ``--engine`` accepts
ENGINE_CHOICES = ("auto", "torch", "onnx", "tensorrt")


@runtime_checkable
class Engine(Protocol):
    """A loaded model's two sub-graphs on one device.

    Attributes:
        name:      the back end that runs, e.g. ``"torch"``, ``"onnxruntime-cpu"``, ``"tensorrt"``.
        precision: ``"fp32"`` or ``"fp16"`` (the arithmetic inside the graph; I/O stays float32).
        device:    ``"cpu"`` or ``"cuda:0"``...
    """

    name: str
    precision: str
    device: str

    def encode(self, y: np.ndarray) -> Any:
        """(B, 1, H, W) float32 luminance -> engine-native features (B, C, H, W)."""
        ...

    def decide(self, feats_a: Any, feats_b: Any, y_a: np.ndarray, y_b: np.ndarray) -> np.ndarray:
        """Features of A and B (B, C, H, W) and luminances (B, 1, H, W) -> D (B, 1, H, W) float32."""
        ...

    def describe(self) -> dict:
        """Facts for logs and the manifest: at least ``engine``, ``precision``, ``device``."""
        ...


def describe_engine(engine: Any) -> dict:
    """``engine.describe()`` when it has one, else the three protocol attributes."""
    if hasattr(engine, "describe"):
        return dict(engine.describe())
    return {"engine": getattr(engine, "name", type(engine).__name__),
            "precision": getattr(engine, "precision", "fp32"), "device": getattr(engine, "device", "cpu")}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def pad_to_multiple(x: np.ndarray, stride: int) -> np.ndarray:
    """Pad (B, C, H, W) at the bottom/right to multiples of ``stride`` by edge replication.

    Networks with down-sampling need H, W divisible by their stride; replication (not zeros)
    keeps the focus measure of the border unchanged. ``stride <= 1`` returns ``x`` itself.
    """
    if stride <= 1:
        return x
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")


def repeat_batch(x, b: int):
    """Repeat a batch-of-one ``x`` (1, C, H, W) ``b`` times along the batch axis, on x's own device.

    Features are engine-native (numpy, or torch CUDA tensors that numpy cannot convert), so this is
    the one place that knows both: numpy arrays are repeated with ``np.repeat``; tensors are
    expanded (a view, no copy: an engine copies it into its input buffer anyway).
    """
    if b == 1:
        return x
    if isinstance(x, np.ndarray):
        return np.repeat(x, b, axis=0)
    if hasattr(x, "expand"):  # torch.Tensor on any device
        return x.expand(b, *x.shape[1:])
    raise TypeError(f"cannot repeat engine features of type {type(x).__name__} (numpy or torch expected)")


def concat_batch(parts):
    """Concatenate engine features along the batch axis on their own device: ``np.concatenate``
    for numpy, ``torch.cat`` for tensors (CUDA tensors, which numpy cannot convert)."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=0)
    import torch

    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0)
    raise TypeError(f"cannot concatenate engine features of types {sorted({type(p).__name__ for p in parts})}")


def crop_to(x, h: int, w: int):
    """Crop the last two axes of an array or tensor back to (h, w) (undoes :func:`pad_to_multiple`)."""
    if x.shape[-2] == h and x.shape[-1] == w:
        return x
    return x[..., :h, :w]
