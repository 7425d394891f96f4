"""Engines for stack-native models (:class:`ray_mff.models.stacknet.StackNet`): torch and ONNX Runtime.

A stack-native model splits into two graphs, like the pair models of :mod:`ray_mff.engines.base`,
but its second graph sees the whole stack (or a chunk of it) at once:

- ``encode(y)``: luminances ``(M, 1, H, W)`` float32 in [0, 1], H and W multiples of ``stride``
  -> features ``(M, C, H/4, W/4)``, once per image (any batch of images);
- ``decide_stack(feats, y)``: the features and luminances of the N images of one stack,
  ``(N, C, H/4, W/4)`` and ``(N, 1, H, W)`` -> ``(logits (N, 1, H, W), weights (N, 1, H, W),
  fused (1, 1, H, W))``: per-image focus logits, their softmax over N and the fused luminance;
  ``decide_stack(feats, y, fused=False)`` -> ``(logits, weights, None)`` from the decision alone
  (``decide.onnx``: the graph without the fused-result branch, about 60 % of the joint's cost).

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

ENCODER_FILE, JOINT_FILE, DECIDE_FILE = "encoder.onnx", "joint.onnx", "decide.onnx"
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

    def _on_device(self, x):
        if isinstance(x, self.torch.Tensor):
            return x.to(self.device)
        return self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def encode(self, y: np.ndarray):
        """Features stay on the engine's device: numpy on CPU, a torch tensor on CUDA (handed back
        to :meth:`decide_stack` as they are; the fuser concatenates them with
        :func:`ray_mff.engines.base.concat_batch`)."""
        with self.torch.inference_mode():
            f = self.model.encode(self._on_device(y))
        return f.numpy() if self.device == "cpu" else f

    def decide_stack(self, feats, y: np.ndarray, fused: bool = True):
        """Logits, weights (and the fused luminance) come back to the host as numpy."""
        with self.torch.inference_mode():
            f, yy = self._on_device(feats)[None], self._on_device(y)[None]
            if not fused:
                logit, w = self.model.decide_weights(f, yy)
                return logit[0].cpu().numpy(), w[0].cpu().numpy(), None
            logit, w, out = self.model.decide_stack(f, yy)
        return logit[0].cpu().numpy(), w[0].cpu().numpy(), out.cpu().numpy()

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

    class DecideGraph(JointGraph):
        def forward(self, feats, y):  # the decision alone: no fused-result branch
            logit, w = self.net.decide_weights(feats.unsqueeze(0), y.unsqueeze(0))
            return logit.squeeze(0), w.squeeze(0)

    class EncoderGraph(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, y):
            return self.net.encode(y)

    return EncoderGraph(model), JointGraph(model), DecideGraph(model)


def export_stack_model(model, out_dir: str | os.PathLike, opset: int = OPSET) -> tuple[Path, Path]:
    """Write ``encoder.onnx``, ``joint.onnx`` and ``decide.onnx`` (dynamic batch / stack size and
    image size) and ``meta.json`` (stride, channels) into ``out_dir``; returns the encoder's and
    the joint graph's paths (``decide.onnx`` lies beside them)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    enc, joint, decide = _joint_graph(model)
    s = max(1, int(getattr(model, "stride", 1)))
    y = torch.rand(3, 1, -(-67 // s) * s, -(-45 // s) * s)  # unequal sizes: nothing specialised to a constant
    with torch.no_grad():
        feats = model.encode(y)
    img = {0: "n", 2: "height", 3: "width"}
    fea = {0: "n", 2: "feat_height", 3: "feat_width"}
    tmp_enc, tmp_joint, tmp_decide = (out / f".{name}.tmp" for name in (ENCODER_FILE, JOINT_FILE, DECIDE_FILE))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice (as ray_mff.export)
        torch.onnx.export(enc, (y,), str(tmp_enc), dynamo=False, opset_version=opset, input_names=["y"],
                          output_names=["feats"], dynamic_axes={"y": img, "feats": fea})
        torch.onnx.export(joint, (feats, y), str(tmp_joint), dynamo=False, opset_version=opset,
                          input_names=["feats", "y"], output_names=["logits", "weights", "fused"],
                          dynamic_axes={"feats": fea, "y": img, "logits": img, "weights": img,
                                        "fused": {2: "height", 3: "width"}})
        torch.onnx.export(decide, (feats, y), str(tmp_decide), dynamo=False, opset_version=opset,
                          input_names=["feats", "y"], output_names=["logits", "weights"],
                          dynamic_axes={"feats": fea, "y": img, "logits": img, "weights": img})
    os.replace(tmp_decide, out / DECIDE_FILE)
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
        if not all((folder / name).is_file() for name in (ENCODER_FILE, JOINT_FILE, DECIDE_FILE)):
            export_stack_model(model, folder)
    return folder / ENCODER_FILE, folder / JOINT_FILE


#: calls of at most this many input pixels (images x H x W) run in sessions with ONNX Runtime's
#: memory arena, larger ones without (the arena keeps a call's peak working set for the next).
#: 520 x 520, 2 threads, loaded machine: a pair 76 + 95 ms (encode + joint) with the arena,
#: 72-95 + 151-190 ms without; a 4-image stack 153-170 + 233-248 ms with, 241-272 + 581-598 without.
#: A chunk of 4 stack_v4 images (1600 x 1200, 7.7 M pixels), stacknet_s, 2026-12-01: joint graph
#: 0.34 s with the arena, 0.65 s without; the decision graph 0.21 s / 0.36 s. So the limit covers
#: :data:`ray_mff.fusion.stack_fuser.CHUNK_PIXELS`: a calibrated long stack runs every chunk in it
#: (the arena then holds about one chunk's working set, a few hundred MB, between stacks).
ARENA_PIXELS = 1 << 24


class StackOnnxEngine:
    """ONNX Runtime (CPU provider) on the exported graphs, with the session options of
    :func:`ray_mff.engines.onnx_engine.session_options`; two sessions per graph, with and without
    the memory arena (:data:`ARENA_PIXELS`), each made on first use. ``decide.onnx`` is looked
    for beside ``joint``; without it ``fused=False`` runs the joint graph and drops its third output."""

    precision = "fp32"

    def __init__(self, encoder: str | os.PathLike, joint: str | os.PathLike, *, threads: int | None = None):
        from ray_mff.engines.onnx_engine import session_options

        self._options = session_options
        self._threads = threads
        decide = Path(joint).with_name(DECIDE_FILE)
        self._paths = {"encoder": Path(encoder), "joint": Path(joint), "decide": decide if decide.is_file() else None}
        self._sessions: dict[tuple[str, bool], object] = {}
        self._arena_pixels = ARENA_PIXELS
        self.encoder = self._session("encoder", False)
        meta = Path(encoder).with_name("meta.json")
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        self.stride = int(info.get("stride", 1))
        self.model_name = info.get("model")
        self.name, self.device = "onnxruntime-cpu", "cpu"

    def _session(self, graph: str, arena: bool):
        key = (graph, arena)
        if key not in self._sessions:
            import onnxruntime as ort

            self._sessions[key] = ort.InferenceSession(str(self._paths[graph]),
                                                       self._options(self._threads, arena=arena),
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def encode(self, y: np.ndarray) -> np.ndarray:
        session = self._session("encoder", y.size <= self._arena_pixels)
        return session.run(None, {"y": np.ascontiguousarray(y, dtype=np.float32)})[0]

    def decide_stack(self, feats: np.ndarray, y: np.ndarray, fused: bool = True):
        graph = "joint" if fused or self._paths["decide"] is None else "decide"
        session = self._session(graph, y.size <= self._arena_pixels)
        out = session.run(None, {"feats": np.ascontiguousarray(feats, dtype=np.float32),
                                 "y": np.ascontiguousarray(y, dtype=np.float32)})
        return out[0], out[1], (out[2] if fused else None)

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

    engine: ``"torch"``, ``"onnx"`` or ``"auto"``: torch on CUDA when a GPU is visible (TensorRT
    plans for stack-native models are not built yet), else ONNX Runtime on CPU when it imports,
    else torch on CPU.
    weights: as :func:`ray_mff.models.get_model` (``"default"``, a path, or None for random init).
    """
    import logging

    import torch

    from ray_mff.models import get_model

    net = get_model(model, weights=weights) if isinstance(model, str) else model.eval()
    device = "cpu"
    if engine == "auto":
        if torch.cuda.is_available():
            engine, device, why = "torch", "cuda", "a CUDA device is visible"
        else:
            try:
                import onnxruntime  # noqa: F401

                engine, why = "onnx", "no CUDA device; ONNX Runtime on CPU"
            except ImportError:
                engine, why = "torch", "no CUDA device and no ONNX Runtime"
        logging.getLogger("ray_mff.engines").info("stack engine: %s on %s (%s)", engine, device, why)
    elif engine == "torch" and torch.cuda.is_available():
        device = "cuda"
    if engine == "torch":
        return StackTorchEngine(net, device=device)
    if engine == "onnx":
        return StackOnnxEngine(*cached_stack_onnx(net), threads=threads)
    from ray_mff.errors import EngineUnavailableError

    raise EngineUnavailableError(f"stack-native models run on the 'torch' and 'onnx' engines only (not yet {engine!r})")
