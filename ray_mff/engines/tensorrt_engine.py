"""TensorRT engine: deserialized encoder/decider plans run with ``execute_async_v3`` on torch CUDA tensors.

Runtime only; plans are built (and cached) by :mod:`ray_mff.engines.tensorrt_build`. I/O uses
torch CUDA tensors so no extra CUDA binding (pycuda, cuda-python) is needed: per call, each input
gets ``context.set_input_shape(name, shape)`` and ``context.set_tensor_address(name,
tensor.data_ptr())``; each output is allocated at the shape TensorRT then reports
(``context.get_tensor_shape``), and the call is enqueued on the current torch stream.

Features stay on the GPU between ``encode`` and ``decide`` (engine-native features, see
:mod:`ray_mff.engines.base`); decision maps come back as numpy float32. Inputs are padded to
the model's stride and outputs cropped back, like the ONNX Runtime engine.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ray_mff.engines.base import check_precision, crop_to

# TensorRT DataType member name -> torch dtype name
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


class TensorRTEngine:
    """Runs two serialized TensorRT plans (``encoder``, ``decider``) on CUDA device ``device``.

    Args:
        encoder, decider: serialized plans (bytes) or paths of ``.plan`` files.
        precision: the precision the plans were built at (for reporting).
        stride: pad inputs to multiples of this.
    """

    def __init__(self, encoder: bytes | str | os.PathLike, decider: bytes | str | os.PathLike, *,
                 precision: str = "fp32", stride: int = 1, device: int = 0, model_name: str | None = None):
        import tensorrt as trt
        import torch

        self.precision = check_precision(precision)
        self.stride = int(stride)
        self.model_name = model_name
        self._torch = torch
        self._trt = trt
        self._device = torch.device("cuda", device)
        self.device = f"cuda:{device}"
        self.name = "tensorrt"
        self.gpu = torch.cuda.get_device_name(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._graphs = {}
        for graph, plan in (("encoder", encoder), ("decider", decider)):
            data = plan if isinstance(plan, (bytes, bytearray)) else Path(plan).read_bytes()
            with torch.cuda.device(self._device):
                engine = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise RuntimeError(f"TensorRT could not deserialize the {graph} plan (built for another "
                                       "TensorRT version or GPU?)")
                context = engine.create_execution_context()
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            dtypes = {n: getattr(torch, _TORCH_DTYPES[engine.get_tensor_dtype(n).name]) for n in names}
            self._graphs[graph] = (engine, context, inputs, outputs, dtypes)
        enc_engine, _, enc_inputs = self._graphs["encoder"][:3]
        #: the largest batch the encoder's optimisation profile accepts (ModelFuser stays within it)
        self.max_batch = int(enc_engine.get_tensor_profile_shape(enc_inputs[0], 0)[2][0])

    def _as_input(self, x, dtype):
        torch = self._torch
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.to(device=self._device, dtype=dtype, non_blocking=True).contiguous()

    def _pad(self, t):
        if self.stride <= 1:
            return t
        h, w = t.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph == 0 and pw == 0:
            return t
        return self._torch.nn.functional.pad(t, (0, pw, 0, ph), mode="replicate")

    def _run(self, graph: str, feeds: dict):
        """Set shapes and addresses, allocate outputs for these shapes, execute_async_v3, wait."""
        engine, context, inputs, outputs, dtypes = self._graphs[graph]
        torch = self._torch
        held = {}
        for name in inputs:
            t = self._as_input(feeds[name], dtypes[name])
            held[name] = t  # keep alive until the stream is done
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"TensorRT {graph}: input {name} shape {tuple(t.shape)} is outside the engine's "
                                 "optimisation profile (tile larger images: tile_size <= the profile's max)")
            context.set_tensor_address(name, t.data_ptr())
        results = {}
        for name in outputs:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=dtypes[name], device=self._device)
            results[name] = out
            context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self._device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT {graph}: execute_async_v3 failed")
        stream.synchronize()
        return results

    def encode(self, y):
        """(B, 1, H, W) float32 (numpy or tensor) -> (B, C, H', W') float32 CUDA tensor."""
        y = self._pad(self._as_input(y, self._torch.float32))
        return self._run("encoder", {"y": y})["feats"]

    def decide(self, feats_a, feats_b, y_a, y_b) -> np.ndarray:
        """Features (CUDA tensors from ``encode``) and luminances (B, 1, H, W) -> D (B, 1, H, W) numpy."""
        h, w = y_a.shape[-2:]
        f32 = self._torch.float32
        out = self._run("decider", {"feats_a": feats_a, "feats_b": feats_b,
                                    "y_a": self._pad(self._as_input(y_a, f32)),
                                    "y_b": self._pad(self._as_input(y_b, f32))})["decision"]
        return crop_to(out, h, w).float().cpu().numpy()

    def describe(self) -> dict:
        return {"engine": self.name, "precision": self.precision, "device": self.device, "gpu": self.gpu,
                "tensorrt": getattr(self._trt, "__version__", "?"), "model": self.model_name}

    def __repr__(self) -> str:
        return f"TensorRTEngine({self.model_name or ''}, {self.precision}, {self.gpu})"
