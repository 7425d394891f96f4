"""Fusion engines: one small protocol (:mod:`ray_mff.engines.base`), several back ends.

An engine runs a decision model's two sub-graphs: ``encode(y (B,1,H,W) float32) -> features``
(engine-native: numpy on CPU, torch CUDA tensors on GPUs) and ``decide(fa, fb, ya, yb) -> D
(B,1,H,W)`` numpy, and reports ``name``, ``precision``, ``device`` and ``describe()``.

- ``torch``    (:mod:`.torch_engine`): PyTorch, the numerical reference on CPU and a GPU engine on
  CUDA (fp16 autocast, channels-last, cuDNN autotune, optional ``torch.compile``);
- ``onnx``     (:mod:`.onnx_engine`): ONNX Runtime, CPU provider (CUDA provider with IOBinding
  when onnxruntime-gpu is installed);
- ``tensorrt`` (:mod:`.tensorrt_engine`, built by :mod:`.tensorrt_build`): NVIDIA GPUs.

Which engine ``auto`` means here: :mod:`.choice`; building it: :mod:`.factory`.
"""
from __future__ import annotations

from ray_mff.engines.base import ENGINE_CHOICES, Engine, describe_engine
from ray_mff.engines.choice import (EngineChoice, EngineEnvironment, probe_environment, require_engine,
                                    require_tensorrt, select_engine)
from ray_mff.engines.factory import make_engine

__all__ = ["make_engine", "select_engine", "probe_environment", "EngineEnvironment", "EngineChoice",
           "require_tensorrt", "require_engine", "Engine", "describe_engine", "ENGINE_CHOICES"]
