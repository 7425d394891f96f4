"""PyTorch engine: the numerical reference on CPU, and a GPU engine on CUDA.

Runs a decision model's two sub-graphs (``encode`` once per image, ``decide`` once per compared
pair; see :mod:`ray_mff.engines.base`) under ``torch.inference_mode``.

- **CPU** (the reference every other engine is checked against): fp32, numpy features, exactly
  the model's eager graph.
- **CUDA**: features stay on the GPU as torch tensors between ``encode`` and ``decide`` (only
  decision maps come back to the host); ``fp16`` runs under ``torch.autocast`` (convolutions in
  half precision, reductions and the sigmoid in fp32, as autocast's op lists decide), ``bf16``
  likewise with bfloat16; weights and activations are channels-last (NHWC), the layout cuDNN's
  tensor-core convolutions use without transposes; ``torch.backends.cudnn.benchmark`` autotunes
  each new input shape once (same-shape batches, the staged pipeline's case, reuse it).
  ``compile_mode`` (or ``$RAY_MFF_TORCH_COMPILE``) wraps both sub-graphs in ``torch.compile``:
  ``"default"`` or ``"reduce-overhead"`` (which also replays CUDA graphs, for many small calls).

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

import contextlib
import os

import numpy as np
import torch
from torch import nn

from ray_mff.engines.base import crop_to, pad_to_multiple
from ray_mff.errors import EngineUnavailableError

#: precisions the torch engine runs at, and the autocast dtype of each
AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")


class TorchEngine:
    """A model on one torch device: numpy luminances in, numpy decision maps out.

    model:     an ``nn.Module`` with ``encode(y)`` and ``decide(fa, fb, ya, yb)`` (put in eval mode).
    device:    ``"cpu"`` or ``"cuda[:N]"``.
    precision: ``"fp32"``; on CUDA also ``"fp16"``/``"bf16"`` (autocast).
    channels_last: NHWC weights and inputs (default: on CUDA).
    compile_mode: ``None`` (eager) or a ``torch.compile`` mode (CUDA graphs: ``"reduce-overhead"``).
    """

    name = "torch"

    def __init__(self, model: nn.Module, device: str = "cpu", *, precision: str = "fp32",
                 channels_last: bool | None = None, compile_mode: str | None = None):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
        self.device = str(device)
        self._device = torch.device(self.device)
        on_cuda = self._device.type == "cuda"
        if precision != "fp32" and not on_cuda:
            raise EngineUnavailableError("torch", f"{precision} runs on CUDA only (CPU: fp32, or the onnx engine's fp16)")
        self.precision = precision
        self.channels_last = on_cuda if channels_last is None else bool(channels_last)
        compile_mode = compile_mode if compile_mode is not None else (os.environ.get("RAY_MFF_TORCH_COMPILE") or None)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        self.compile_mode = compile_mode
        self.model = model.eval().to(self._device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if on_cuda:
            # autotune the convolution algorithm per input shape once (off by default in torch)
            torch.backends.cudnn.benchmark = True
        self._encode, self._decide = self.model.encode, self.model.decide
        if compile_mode:
            self._encode = torch.compile(self.model.encode, mode=compile_mode, dynamic=None)
            self._decide = torch.compile(self.model.decide, mode=compile_mode, dynamic=None)
        self.stride = int(getattr(model, "stride", 1))
        self.model_name = getattr(model, "registry_name", type(model).__name__)
        # what decide returns and the model's own post-processing (see ray_mff.engines.base)
        self.output = getattr(model, "output", "decision")
        self.postprocess = getattr(model, "postprocess", None)
        self.gpu = torch.cuda.get_device_name(self._device) if on_cuda else None

    @property
    def on_cuda(self) -> bool:
        return self._device.type == "cuda"

    def _autocast(self):
        dtype = AUTOCAST_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=dtype)

    def _t(self, x) -> torch.Tensor:
        """numpy (host) or tensor (any device) -> float32 tensor on this engine's device."""
        if isinstance(x, torch.Tensor):
            t = x.to(self._device, non_blocking=True)
        else:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            if self.on_cuda:
                t = t.pin_memory().to(self._device, non_blocking=True)  # page-locked: an async copy
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _pad(self, y):
        if isinstance(y, torch.Tensor):
            h, w = y.shape[-2:]
            ph, pw = (-h) % self.stride, (-w) % self.stride
            return y if not (ph or pw) else torch.nn.functional.pad(y, (0, pw, 0, ph), mode="replicate")
        return pad_to_multiple(np.asarray(y, dtype=np.float32), self.stride)

    def encode(self, y):
        """(B, 1, H, W) float32 luminance in [0, 1] -> features (B, C, H', W') (H', W' padded to stride):
        numpy on CPU, a CUDA tensor (kept on the GPU for ``decide``) on CUDA."""
        with torch.inference_mode(), self._autocast():
            f = self._encode(self._t(self._pad(y)))
        return f if self.on_cuda else f.float().numpy()

    def decide(self, feats_a, feats_b, y_a, y_b) -> np.ndarray:
        """Features (B, C, H', W') and luminances (B, 1, H, W) of A and B -> D (B, 1, H, W) float32 in [0, 1]."""
        h, w = y_a.shape[-2:]
        with torch.inference_mode(), self._autocast():
            d = self._decide(self._t(feats_a), self._t(feats_b), self._t(self._pad(y_a)), self._t(self._pad(y_b)))
            return crop_to(d.float(), h, w).cpu().numpy()

    def describe(self) -> dict:
        out = {"engine": self.name, "precision": self.precision, "device": self.device, "model": self.model_name}
        if self.gpu:
            out.update(gpu=self.gpu, channels_last=self.channels_last, compile=self.compile_mode)
        return out
