"""Engines for stack-native models (:class:`ray_mff.models.stacknet.StackNet`): torch and ONNX Runtime.

A stack-native model splits into two graphs, like the pair models of :mod:`ray_mff.engines.base`,
but its second graph sees the whole stack (or a chunk of it) at once:

- ``encode(y)``: luminances ``(M, 1, H, W)`` float32 in [0, 1], H and W multiples of ``stride``
  -> features ``(M, C, H/4, W/4)``, once per image (any batch of images);
- ``decide_stack(feats, y)``: the features and luminances of the N images of one stack,
  ``(N, C, H/4, W/4)`` and ``(N, 1, H, W)`` -> ``(logits (N, 1, H, W), weights (N, 1, H, W),
  fused (1, 1, H, W))``: per-image focus logits, their softmax over N and the fused luminance.

N is a dynamic axis of the exported joint graph, so one ONNX file serves pairs, triples and
chunks of long stacks. Outputs are numpy float32 for both engines.

Not yet here (issue 13, left for the engine owner): TensorRT, fp16, one session per shape and
memory-arena policy of :class:`ray_mff.engines.onnx_engine.OnnxEngine`, and ``make_engine`` /
``ray-mff export`` integration; these engines are built by :func:`make_stack_engine`.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

ENCODER_FILE, JOINT_FILE = "encoder.onnx", "joint.onnx"
OPSET = 17


class StackTorchEngine:
    """Eager torch, the numerical reference. model: a stack-native module (``encode``, ``decide_stack``)."""

    precision = "fp32"

    def __init__(self, model, device: str = "cpu"):
        import torch

        self.torch = torch
        self.model = model.eval().to(device)
        self.device = device
        self.name = "torch"
        self.stride = int(getattr(model, "stride", 1))
        self.model_name = getattr(model, "registry_name", None)

    def encode(self, y: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.model.encode(self.torch.from_numpy(np.ascontiguousarray(y)).to(self.device)).cpu().numpy()

    def decide_stack(self, feats: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = self.torch
        with t.no_grad():
            f = t.from_numpy(np.ascontiguousarray(feats)).to(self.device)[None]
            yy = t.from_numpy(np.ascontiguousarray(y)).to(self.device)[None]
            logit, w, fused = self.model.decide_stack(f, yy)
        return logit[0].cpu().numpy(), w[0].cpu().numpy(), fused.cpu().numpy()

    def describe(self) -> dict:
        return {"engine": "torch", "precision": "fp32", "device": self.device}


def _joint_graph(model):
    from torch import nn

    class JointGraph(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, feats, y):  # (N, C, h, w), (N, 1, H, W): one stack
            logit, w, fused = self.net.decide_stack(feats.unsqueeze(0), y.unsqueeze(0))
            return logit.squeeze(0), w.squeeze(0), fused

    class EncoderGraph(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, y):
            return self.net.encode(y)

    return EncoderGraph(model), JointGraph(model)


def export_stack_model(model, out_dir: str | os.PathLike, opset: int = OPSET) -> tuple[Path, Path]:
    """Write ``encoder.onnx`` and ``joint.onnx`` (dynamic batch / stack size and image size) and
    ``meta.json`` (stride, channels) into ``out_dir``; returns the two graph paths."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    enc, joint = _joint_graph(model)
    s = max(1, int(getattr(model, "stride", 1)))
    y = torch.rand(3, 1, -(-67 // s) * s, -(-45 // s) * s)  # unequal sizes: nothing specialised to a constant
    with torch.no_grad():
        feats = model.encode(y)
    img = {0: "n", 2: "height", 3: "width"}
    fea = {0: "n", 2: "feat_height", 3: "feat_width"}
    tmp_enc, tmp_joint = out / f".{ENCODER_FILE}.tmp", out / f".{JOINT_FILE}.tmp"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice (as ray_mff.export)
        torch.onnx.export(enc, (y,), str(tmp_enc), dynamo=False, opset_version=opset, input_names=["y"],
                          output_names=["feats"], dynamic_axes={"y": img, "feats": fea})
        torch.onnx.export(joint, (feats, y), str(tmp_joint), dynamo=False, opset_version=opset,
                          input_names=["feats", "y"], output_names=["logits", "weights", "fused"],
                          dynamic_axes={"feats": fea, "y": img, "logits": img, "weights": img,
                                        "fused": {2: "height", 3: "width"}})
    os.replace(tmp_enc, out / ENCODER_FILE)
    os.replace(tmp_joint, out / JOINT_FILE)
    (out / "meta.json").write_text(json.dumps({"stride": s, "channels": int(feats.shape[1]),
                                               "model": getattr(model, "registry_name", None)}))
    return out / ENCODER_FILE, out / JOINT_FILE


def cached_stack_onnx(model, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Export once per model identity (code + config + weights: :func:`ray_mff.export.state_sha`)
    into ``<cache>/<name>-stack-<sha>/``, under a file lock so concurrent workers export once."""
    from ray_mff.cache import cache_root, file_lock
    from ray_mff.export import state_sha

    sha = state_sha(model)[:16]
    folder = Path(root or cache_root()) / f"{getattr(model, 'registry_name', 'model')}-stack-{sha}"
    with file_lock(folder.with_name(folder.name + ".lock")):
        if not ((folder / ENCODER_FILE).is_file() and (folder / JOINT_FILE).is_file()):
            export_stack_model(model, folder)
    return folder / ENCODER_FILE, folder / JOINT_FILE


#: calls of at most this many input pixels (images x H x W) run in sessions with ONNX Runtime's
#: memory arena, larger ones without (the arena keeps a call's peak working set for the next).
#: 520 x 520, 2 threads, loaded machine: a pair 76 + 95 ms (encode + joint) with the arena,
#: 72-95 + 151-190 ms without; a 4-image stack 153-170 + 233-248 ms with, 241-272 + 581-598 without.
ARENA_PIXELS = 1 << 22


class StackOnnxEngine:
    """ONNX Runtime (CPU provider) on the two exported graphs, with the session options of
    :func:`ray_mff.engines.onnx_engine.session_options`; two sessions per graph, with and without
    the memory arena (:data:`ARENA_PIXELS`)."""

    precision = "fp32"

    def __init__(self, encoder: str | os.PathLike, joint: str | os.PathLike, *, threads: int | None = None):
        import onnxruntime as ort

        from ray_mff.engines.onnx_engine import session_options

        def sessions(path):
            return {arena: ort.InferenceSession(str(path), session_options(threads, arena=arena),
                                                providers=["CPUExecutionProvider"]) for arena in (True, False)}

        self._encoder, self._joint = sessions(encoder), sessions(joint)
        self._arena_pixels = ARENA_PIXELS
        self.encoder = self._encoder[False]
        meta = Path(encoder).with_name("meta.json")
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        self.stride = int(info.get("stride", 1))
        self.model_name = info.get("model")
        self.name, self.device = "onnxruntime-cpu", "cpu"

    def encode(self, y: np.ndarray) -> np.ndarray:
        session = self._encoder[y.size <= self._arena_pixels]
        return session.run(None, {"y": np.ascontiguousarray(y, dtype=np.float32)})[0]

    def decide_stack(self, feats: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        session = self._joint[y.size <= self._arena_pixels]
        logit, w, fused = session.run(None, {"feats": np.ascontiguousarray(feats, dtype=np.float32),
                                             "y": np.ascontiguousarray(y, dtype=np.float32)})
        return logit, w, fused

    @contextlib.contextmanager
    def without_arena(self):
        """No memory kept between calls while tiling (as :meth:`OnnxEngine.without_arena`)."""
        before, self._arena_pixels = self._arena_pixels, 0
        try:
            yield self
        finally:
            self._arena_pixels = before

    def describe(self) -> dict:
        return {"engine": "onnxruntime", "providers": self.encoder.get_providers(), "precision": "fp32",
                "device": "cpu"}


def make_stack_engine(model="stacknet", *, engine: str = "auto", weights="default", threads: int | None = None):
    """A stack engine for a registered stack-native model (name, or a built module).

    engine: ``"torch"``, ``"onnx"`` or ``"auto"`` (ONNX Runtime when it imports, else torch).
    weights: as :func:`ray_mff.models.get_model` (``"default"``, a path, or None for random init).
    """
    from ray_mff.models import get_model

    net = get_model(model, weights=weights) if isinstance(model, str) else model.eval()
    if engine == "auto":
        try:
            import onnxruntime  # noqa: F401

            engine = "onnx"
        except ImportError:
            engine = "torch"
    if engine == "torch":
        return StackTorchEngine(net)
    if engine == "onnx":
        return StackOnnxEngine(*cached_stack_onnx(net), threads=threads)
    from ray_mff.errors import EngineUnavailableError

    raise EngineUnavailableError(f"stack-native models run on the 'torch' and 'onnx' engines only (not yet {engine!r})")
