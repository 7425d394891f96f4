"""TensorRT engine: deserialized encoder/decider plans run with ``execute_async_v3`` on torch CUDA tensors.

Runtime only; plans are built (and cached) by :mod:`ray_mff.engines.tensorrt_build`. I/O uses
torch CUDA tensors, so no extra CUDA binding (pycuda, cuda-python) is needed. Following the
TensorRT 10/11 Python API:

- **Its own CUDA stream** (a ``torch.cuda.Stream``): every copy, pad and ``execute_async_v3
  (stream.cuda_stream)`` of the engine is enqueued on it, and the host waits only when a decision
  map is read back (``decide``), never after ``encode``: features stay on the GPU, ordered by the
  stream. Work that the caller enqueued on its current stream is waited for first (``wait_stream``).
- **Pinned staging**: numpy inputs are copied into page-locked host memory and from there to the
  GPU asynchronously; decision maps come back through a pinned buffer too.
- **Context memory sized per call**: contexts are created with
  ``ExecutionContextAllocationStrategy.USER_MANAGED``; after the input shapes are set,
  ``context.update_device_memory_size_for_shapes()`` says how much scratch memory these shapes
  need (plans are built with ``PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10`` where available,
  so that is less for small inputs than for the profile's largest), and one scratch buffer,
  grown on demand and shared by the two contexts (they run one after the other on one stream),
  is given with ``context.set_device_memory(ptr, size)``. A default context (``STATIC``) would
  reserve the largest profile's memory (batch 4 at 2048 x 2048) for every pair.
- Per call, each input gets ``context.set_input_shape`` and ``context.set_tensor_address``;
  outputs are allocated at ``context.get_tensor_shape``.

Inputs are padded to the model's stride and outputs cropped back, like the ONNX Runtime engine.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ray_mff.engines.base import check_precision, crop_to

# TensorRT DataType member name -> torch dtype name
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def create_context(trt, engine):
    """(context, user_managed): a context whose device memory the caller supplies per call, where
    this TensorRT has that strategy (10.x), else a default one."""
    strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    if strategy is not None:
        context = engine.create_execution_context(strategy)
        if context is not None:
            return context, True
    return engine.create_execution_context(), False


class TensorRTEngine:
    """Runs two serialized TensorRT plans (``encoder``, ``decider``) on CUDA device ``device``.

    Args:
        encoder, decider: serialized plans (bytes) or paths of ``.plan`` files.
        precision: the precision the plans were built at (for reporting).
        stride: pad inputs to multiples of this.
    """

    def __init__(self, encoder: bytes | str | os.PathLike, decider: bytes | str | os.PathLike, *,
                 precision: str = "fp32", stride: int = 1, device: int = 0, model_name: str | None = None,
                 trt=None, torch=None):
        if trt is None:
            import tensorrt as trt
        if torch is None:
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
        self._stream = torch.cuda.Stream(device=self._device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._graphs = {}
        self._scratch = None  # shared context memory (uint8 CUDA tensor), grown on demand
        self._context_memory = {}  # graph -> (ptr, size) last given to its context
        for graph, plan in (("encoder", encoder), ("decider", decider)):
            data = plan if isinstance(plan, (bytes, bytearray)) else Path(plan).read_bytes()
            with torch.cuda.device(self._device):
                engine = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise RuntimeError(f"TensorRT could not deserialize the {graph} plan (built for another "
                                       "TensorRT version or GPU?)")
                context, user_managed = create_context(trt, engine)
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            dtypes = {n: getattr(torch, _TORCH_DTYPES[engine.get_tensor_dtype(n).name]) for n in names}
            self._graphs[graph] = (engine, context, inputs, outputs, dtypes, user_managed)
        enc_engine, _, enc_inputs = self._graphs["encoder"][:3]
        #: the largest batch the encoder's optimisation profile accepts (ModelFuser stays within it)
        self.max_batch = int(enc_engine.get_tensor_profile_shape(enc_inputs[0], 0)[2][0])

    # -- staging ------------------------------------------------------------------------------------

    def _as_input(self, x, dtype):
        """numpy (host) or tensor -> contiguous tensor on the GPU, enqueued on the engine's stream."""
        torch = self._torch
        if isinstance(x, torch.Tensor):
            t = x
        else:
            t = torch.from_numpy(np.ascontiguousarray(x)).pin_memory()  # page-locked: asynchronous copy
        return t.to(device=self._device, dtype=dtype, non_blocking=True).contiguous()

    def _pad(self, t):
        if self.stride <= 1:
            return t
        h, w = t.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph == 0 and pw == 0:
            return t
        return self._torch.nn.functional.pad(t, (0, pw, 0, ph), mode="replicate")

    def _context_memory_for_shapes(self, graph: str, context) -> None:
        """Give ``context`` scratch memory for its current input shapes (USER_MANAGED contexts)."""
        need = int(context.update_device_memory_size_for_shapes())
        if need <= 0:
            return
        if self._scratch is None or self._scratch.numel() < need:
            # allocated on the engine's stream: the old buffer is reused only by later work on it
            self._scratch = self._torch.empty(need, dtype=self._torch.uint8, device=self._device)
        ptr = self._scratch.data_ptr()
        if self._context_memory.get(graph) != (ptr, need):
            context.set_device_memory(ptr, need)
            self._context_memory[graph] = (ptr, need)

    def _run(self, graph: str, feeds: dict):
        """Set shapes, addresses and context memory, allocate outputs, execute_async_v3 on the
        engine's stream. Must be called inside ``torch.cuda.stream(self._stream)``; does not wait."""
        engine, context, inputs, outputs, dtypes, user_managed = self._graphs[graph]
        torch = self._torch
        held = []
        for name in inputs:
            t = self._as_input(feeds[name], dtypes[name])
            held.append(t)  # alive until enqueued; the caching allocator keeps it for the stream
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"TensorRT {graph}: input {name} shape {tuple(t.shape)} is outside the engine's "
                                 "optimisation profile (tile larger images: tile_size <= the profile's max)")
            context.set_tensor_address(name, t.data_ptr())
        if user_managed:
            self._context_memory_for_shapes(graph, context)
        results = {}
        for name in outputs:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=dtypes[name], device=self._device)
            results[name] = out
            context.set_tensor_address(name, out.data_ptr())
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT {graph}: execute_async_v3 failed")
        return results

    def _on_stream(self):
        # the caller's pending work (e.g. tensors it just wrote) comes first
        self._stream.wait_stream(self._torch.cuda.current_stream(self._device))
        return self._torch.cuda.stream(self._stream)

    def encode(self, y):
        """(B, 1, H, W) float32 (numpy or tensor) -> (B, C, H', W') float32 CUDA tensor (not waited for)."""
        with self._on_stream():
            y = self._pad(self._as_input(y, self._torch.float32))
            return self._run("encoder", {"y": y})["feats"]

    def decide(self, feats_a, feats_b, y_a, y_b) -> np.ndarray:
        """Features (CUDA tensors from ``encode``) and luminances (B, 1, H, W) -> D (B, 1, H, W) numpy."""
        h, w = y_a.shape[-2:]
        torch = self._torch
        f32 = torch.float32
        with self._on_stream():
            out = self._run("decider", {"feats_a": feats_a, "feats_b": feats_b,
                                        "y_a": self._pad(self._as_input(y_a, f32)),
                                        "y_b": self._pad(self._as_input(y_b, f32))})["decision"]
            d = crop_to(out, h, w).float()
            host = torch.empty(tuple(d.shape), dtype=f32, pin_memory=True)
            host.copy_(d, non_blocking=True)
        self._stream.synchronize()  # the one host wait per stack: the decision map is needed on the host
        return host.numpy()

    def describe(self) -> dict:
        return {"engine": self.name, "precision": self.precision, "device": self.device, "gpu": self.gpu,
                "tensorrt": getattr(self._trt, "__version__", "?"), "model": self.model_name}

    def __repr__(self) -> str:
        return f"TensorRTEngine({self.model_name or ''}, {self.precision}, {self.gpu})"
