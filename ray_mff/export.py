"""Export a registered model to ONNX and verify it against torch (``ray-mff export``, see :mod:`ray_mff.cli`).

A decision model exports as two single-file ONNX graphs, matching the engine protocol
(:mod:`ray_mff.engines.base`):

- ``encoder.onnx``: ``y (B, 1, H, W) -> feats (B, C, H, W)``
- ``decider.onnx``: ``feats_a, feats_b (B, C, H, W), y_a, y_b (B, 1, H, W) -> decision (B, 1, H, W)``

Batch, height and width are dynamic axes. Inputs are padded to the model's ``stride`` multiple
and outputs cropped back *by the engine wrapper* (:func:`ray_mff.engines.base.pad_to_multiple`),
not inside the graph: shape arithmetic in the graph would cost a TensorRT optimisation-profile
headache (the shipped ``cascade`` has ``stride = 16``: with sides on that grid every upsampling in
it is by an exact factor, and the graph needs no crop). Opset 17, no external data
(the models are a few hundred kB).

fp16 graphs are the fp32 graph converted by ``onnxruntime.transformers.float16`` with
``keep_io_types=True``: arithmetic inside is float16, the graph inputs and outputs stay float32
with casts at the boundary, so callers (and the engine wrappers) feed and read float32 for both
precisions. That is also what TensorRT 11 wants: its strongly typed networks take their
precision from the graph (see :mod:`ray_mff.engines.tensorrt_build`).

Every export is verified against torch eager on random luminances and on a real defocus pair
(an image with complementary halves blurred), and the max abs differences are printed and
stored in ``meta.json`` next to the graphs.

Tolerances (ONNX Runtime CPU vs torch eager, tested in ``tests/test_export.py`` and
``tests/test_engines.py``):

- fp32: features and decisions within 1e-4 on the verification inputs; on the Lytro pairs
  decision maps within 1e-3 and fused 8-bit images within 1 grey level;
- fp16: features within 1e-2 and decisions within 2e-2 on the verification inputs; on Lytro
  decision maps within 5e-2 and fused 8-bit images within 3 grey levels. Decision maps are
  near-binary, so fp16 moves them only in the soft band along focus boundaries.

Exports of a given model state are cached (:func:`cached_onnx`) in
``$RAY_MFF_CACHE/onnx/<model>-<state sha>-<precision>/`` (default ``~/.cache/ray-mff``); a lock
file and an atomic directory rename make concurrent Ray actors on one node export once and
never read a half-written graph (the cache folder and lock: :mod:`ray_mff.cache`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ray_mff.cache import cache_root, file_lock, file_sha

log = logging.getLogger("ray_mff.export")

OPSET = 17
ENCODER_FILE = "encoder.onnx"
DECIDER_FILE = "decider.onnx"
META_FILE = "meta.json"
ENCODER_INPUTS = ("y",)
ENCODER_OUTPUTS = ("feats",)
DECIDER_INPUTS = ("feats_a", "feats_b", "y_a", "y_b")
DECIDER_OUTPUTS = ("decision",)


# --------------------------------------------------------------------------- graphs


def _graph_modules(model):
    """Two thin ``nn.Module`` views of ``model.encode`` and ``model.decide`` for ``torch.onnx.export``."""
    from torch import nn

    class EncoderGraph(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, y):
            return self.net.encode(y)

    class DeciderGraph(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, feats_a, feats_b, y_a, y_b):
            return self.net.decide(feats_a, feats_b, y_a, y_b)

    return EncoderGraph(model).eval(), DeciderGraph(model).eval()


def state_sha(model) -> str:
    """sha256 of a model's source module, config and state dict (names, shapes, bytes): the identity
    of an export."""
    import inspect

    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    try:  # the code too: a changed forward with the same weights is a different graph
        h.update(inspect.getsource(inspect.getmodule(type(model))).encode())
    except (OSError, TypeError):
        pass
    if hasattr(model, "config"):
        h.update(json.dumps(model.config(), sort_keys=True, default=str).encode())
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _export_fp32(model, out_dir: Path, opset: int) -> tuple[Path, Path]:
    import torch

    enc, dec = _graph_modules(model)
    # batch 2 and unequal sizes (odd when stride is 1) so no dimension is specialised to a
    # constant; multiples of the stride, the only sizes the engines feed.
    s = max(1, int(getattr(model, "stride", 1)))
    y = torch.rand(2, 1, -(-67 // s) * s, -(-45 // s) * s)
    with torch.no_grad():
        feats = model.encode(y)
    axes = {0: "batch", 2: "height", 3: "width"}
    # features may be smaller than the image (cascade: half resolution): their own axis names, or
    # ONNX would declare them equal to the image's
    same_size = tuple(feats.shape[-2:]) == tuple(y.shape[-2:])
    feat_axes = axes if same_size else {0: "batch", 2: "feat_height", 3: "feat_width"}
    dyn = {"y": axes, "y_a": axes, "y_b": axes, "decision": axes,
           "feats": feat_axes, "feats_a": feat_axes, "feats_b": feat_axes}
    encoder, decider = out_dir / ENCODER_FILE, out_dir / DECIDER_FILE
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of dynamo (which needs onnxscript, not a
        # dependency here); it exports these plain conv nets exactly.
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, (y,), str(encoder), dynamo=False, opset_version=opset,
                          input_names=list(ENCODER_INPUTS), output_names=list(ENCODER_OUTPUTS),
                          dynamic_axes={n: dyn[n] for n in ENCODER_INPUTS + ENCODER_OUTPUTS})
        torch.onnx.export(dec, (feats[:1], feats[1:], y[:1], y[1:]), str(decider), dynamo=False,
                          opset_version=opset, input_names=list(DECIDER_INPUTS),
                          output_names=list(DECIDER_OUTPUTS),
                          dynamic_axes={n: dyn[n] for n in DECIDER_INPUTS + DECIDER_OUTPUTS})
    _pin_channels(encoder, int(feats.shape[1]))
    _pin_channels(decider, 1)
    return encoder, decider


def _pin_channels(path: Path, channels: int) -> None:
    """Write the (static) channel count into a graph's output shape where the exporter's shape
    inference left a symbolic name (it does after a scalar parameter multiplies the output)."""
    import onnx

    graph = onnx.load(str(path))
    dim = graph.graph.output[0].type.tensor_type.shape.dim[1]
    if not dim.HasField("dim_value"):
        dim.dim_value = channels
        onnx.save(graph, str(path))


def convert_to_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """fp32 ONNX graph -> fp16 arithmetic with float32 graph inputs/outputs (casts at the boundary)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "value out of fp16 range, clamped" notes for tiny epsilons
        half = convert_float_to_float16(model, keep_io_types=True)
    _toposort(half.graph)  # the converter appends its boundary casts at the end of the node list
    onnx.checker.check_model(half)
    onnx.save(half, str(dst))
    return Path(dst)


def _toposort(graph) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("ONNX graph has a cycle or an undefined input")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def export_model(model, out_dir: str | os.PathLike, precision: str = "fp32", *, name: str | None = None,
                 opset: int = OPSET, verify: bool = True) -> dict:
    """Export ``model`` (an ``nn.Module`` with ``encode``/``decide``) into ``out_dir``.

    Returns ``{"encoder": Path, "decider": Path, "meta": Path, **meta}`` where meta carries the
    model name, state sha, precision, stride, feature channels, opset and (if ``verify``) the
    max abs differences against torch from :func:`verify_export`.
    """
    import onnx

    from ray_mff.engines.base import check_precision

    check_precision(precision)
    if opset < 17:
        raise ValueError("opset must be >= 17")
    model = model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if precision == "fp32":
        encoder, decider = _export_fp32(model, out_dir, opset)
    else:
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            e32, d32 = _export_fp32(model, Path(tmp), opset)
            encoder = convert_to_fp16(e32, out_dir / ENCODER_FILE)
            decider = convert_to_fp16(d32, out_dir / DECIDER_FILE)
    for path in (encoder, decider):
        onnx.checker.check_model(str(path))
    import torch

    with torch.no_grad():
        s = max(1, int(getattr(model, "stride", 1)))
        probe = model.encode(torch.zeros(1, 1, 16 * s, 16 * s))
    channels = int(probe.shape[1])
    downsample = max(1, (16 * s) // int(probe.shape[-1]))  # features per input pixel (cascade: 2)
    meta = {
        "model": name or getattr(model, "registry_name", type(model).__name__),
        "state_sha256": state_sha(model),
        "precision": precision,
        "io_dtype": "float32",
        "stride": int(getattr(model, "stride", 1)),
        "feature_channels": channels,
        "feature_downsample": downsample,
        "opset": opset,
        "encoder_sha256": file_sha(encoder),
        "decider_sha256": file_sha(decider),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "export_seconds": round(time.perf_counter() - t0, 3),
    }
    if verify:
        meta["verification"] = verify_export(model, {"encoder": encoder, "decider": decider}, precision=precision)
    meta_path = out_dir / META_FILE
    meta_path.write_text(json.dumps(meta, indent=2))
    return {"encoder": encoder, "decider": decider, "meta": meta_path, **meta}


# --------------------------------------------------------------------------- verification


def defocus_pair(size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A real-content defocus pair: a natural photograph (scikit-image's bundled ``astronaut``)
    with the left half blurred in A and the right half in B (Gaussian, sigma 3). Luminances (H, W)."""
    import cv2
    from skimage import data

    from ray_mff.fusion.luminance import luminance

    img = luminance(data.astronaut())
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    blur = cv2.GaussianBlur(img, (0, 0), 3.0)
    a, b = img.copy(), img.copy()
    a[:, : size // 2] = blur[:, : size // 2]
    b[:, size // 2:] = blur[:, size // 2:]
    return a, b


def verify_export(model, paths: dict, *, precision: str = "fp32", pairs=None, threads: int | None = None) -> dict:
    """Max abs difference between torch eager and ONNX Runtime (CPU) for features and decisions.

    pairs: list of (y_a, y_b) luminance pairs (H, W) float32; default one random pair of odd size
    and one real defocus pair (:func:`defocus_pair`). Returns ``{"random": {...}, "real": {...}}``
    with ``features_max_abs``, ``decision_max_abs`` per input kind.
    """
    from ray_mff.engines.onnx_engine import OnnxEngine
    from ray_mff.engines.torch_engine import TorchEngine

    reference = TorchEngine(model)  # pads to the stride and crops back, as the ONNX engine does
    engine = OnnxEngine(paths["encoder"], paths["decider"], precision=precision,
                        stride=int(getattr(model, "stride", 1)), providers=["CPUExecutionProvider"], threads=threads)
    rng = np.random.default_rng(0)
    if pairs is None:
        pairs = {"random": (rng.random((97, 131), dtype=np.float32), rng.random((97, 131), dtype=np.float32)),
                 "real": defocus_pair()}
    elif not isinstance(pairs, dict):
        pairs = {f"pair{i}": p for i, p in enumerate(pairs)}
    out = {}
    for kind, (ya, yb) in pairs.items():
        y = np.stack([ya, yb])[:, None].astype(np.float32)
        ft = reference.encode(y)
        dt = reference.decide(ft[:1], ft[1:], y[:1], y[1:])
        fo = engine.encode(y)
        do = engine.decide(fo[:1], fo[1:], y[:1], y[1:])
        out[kind] = {"features_max_abs": float(np.abs(fo - ft).max()),
                     "decision_max_abs": float(np.abs(do - dt).max()),
                     "shape": list(y.shape[-2:])}
    return out


# --------------------------------------------------------------------------- cache


def _read_meta(folder: Path) -> dict | None:
    meta = folder / META_FILE
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None


def cached_onnx(model, precision: str = "fp32", *, name: str | None = None, root: str | os.PathLike | None = None,
                verify: bool = False) -> dict:
    """The ONNX export of ``model`` at ``precision``, exported on first use into the cache.

    Layout: ``<root>/onnx/<model>-<state sha[:16]>-<precision>/{encoder,decider}.onnx, meta.json``.
    The export goes to a temporary sibling folder that is renamed into place (atomic on one
    filesystem), under a lock file, so concurrent actors never race or see partial files; if the
    lock is not honoured (some network filesystems) the losing rename just discards its copy.
    """
    name = name or getattr(model, "registry_name", type(model).__name__)
    root = Path(root) if root is not None else cache_root()
    key = f"{name}-{state_sha(model)[:16]}-{precision}"
    final = root / "onnx" / key

    def done() -> dict | None:
        meta = _read_meta(final)
        if meta and (final / ENCODER_FILE).is_file() and (final / DECIDER_FILE).is_file():
            return {"encoder": final / ENCODER_FILE, "decider": final / DECIDER_FILE, "meta": final / META_FILE, **meta}
        return None

    hit = done()
    if hit:
        return hit
    with file_lock(root / "onnx" / f".{key}.lock"):
        hit = done()
        if hit:
            return hit
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root / "onnx"))
        try:
            export_model(model, tmp, precision, name=name, verify=verify)
            if final.exists():  # a broken leftover (no meta): replace it
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if done() is None:
                    raise
            log.info("exported %s (%s) to ONNX in %s", name, precision, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    hit = done()
    if hit is None:
        raise RuntimeError(f"{final}: ONNX export did not produce the expected files")
    return hit


# --------------------------------------------------------------------------- by name


def export_onnx(model_name: str, out_dir: str | os.PathLike, precision: str = "fp32", weights="default", *,
                opset: int = OPSET, verify: bool = True) -> dict:
    """Export registered model ``model_name`` with ``weights`` to ``out_dir``; see :func:`export_model`.

    Returns ``{"encoder": path, "decider": path, "meta": path, ...meta}``.
    """
    from ray_mff.models import get_model

    model = get_model(model_name, weights=None if weights in (None, "none") else weights)
    return export_model(model, out_dir, precision, name=model_name, opset=opset, verify=verify)
