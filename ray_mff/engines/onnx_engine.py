"""ONNX Runtime engine: the exported encoder/decider graphs in two inference sessions.

CPU provider by default; the CUDA provider when ONNX Runtime was built with it (onnxruntime-gpu)
and a device is visible. ONNX Runtime silently falls back to CPU when a provider cannot load
(missing CUDA libraries), so the engine reports the providers the sessions *actually* use
(``InferenceSession.get_providers()``), never the ones it asked for.

Inputs and outputs are float32 numpy arrays for both precisions (fp16 graphs cast inside, see
:mod:`ray_mff.export`). Inputs are padded to the model's stride multiple here and outputs are
cropped back (:func:`ray_mff.engines.base.pad_to_multiple`).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ray_mff.engines.base import check_precision, crop_to, pad_to_multiple

log = logging.getLogger("ray_mff.engines")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def default_threads() -> int:
    """Intra-op threads: ``RAY_MFF_THREADS``, else ``OMP_NUM_THREADS`` (Ray sets it to an actor's
    ``num_cpus``), else the CPUs this process may run on."""
    for var in ("RAY_MFF_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [CUDA, CPU] if CUDA in available else [CPU]


def session_options(threads: int | None = None):
    """Session options tuned for these small conv nets on a few CPU cores.

    - ``intra_op_num_threads`` = the CPUs we are entitled to (not the machine's core count: on a
      shared node or in a Ray actor more threads only contend);
    - one inter-op thread (the graphs are chains; parallel branches are tiny);
    - *all* graph optimisations, including the NCHWc layout transform: with ``cascade``'s 88-channel
      dense block it pays for its reorders (1024 x 1024, 2 threads: two encodes 2.31-2.44 s vs
      2.57-2.62 s with *extended*, a decide 0.067-0.072 s vs 0.090 s, same peak memory; the
      previous, narrower network was faster with *extended*);
    - no memory arena (see below).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No CPU memory arena: the arena keeps every size it ever served, so three 2 x 1600 x 1200-ish
    # encodes of slightly different sizes peaked at 12.2 GB resident with it (16.2 GB with the
    # kSameAsRequested extend strategy) and 4.2 GB without. The arena is faster (it saves the page
    # faults of fresh buffers: 0.34 s vs 0.50 s for a 2 x 528 x 528 encode), but tiles and stacks of
    # varying sizes would make a worker's memory unbounded (the memory pattern planner still reuses
    # buffers within a run).
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = True
    so.log_severity_level = 3  # errors only: fp16 graphs warn about constant folding on CPU
    return so


def _exported_stride(encoder: Path) -> int:
    """The model stride recorded by :func:`ray_mff.export.export_model` beside the graphs (1 if absent)."""
    meta = encoder.with_name("meta.json")
    if not meta.is_file():
        return 1
    return int(json.loads(meta.read_text()).get("stride", 1))


#: sessions kept per graph, one per input shape, least recently used dropped first
SESSIONS_PER_SHAPE_CACHE = 4


class _SessionPerShape:
    """One ONNX Runtime session per input shape of a graph.

    ONNX Runtime plans its memory pattern on a session's first run, and a session stays fast only
    at that run's shape: an encoder first run on 2 x 128 x 128 then took 1.23 s per 2 x 528 x 528
    run, against 0.64 s for a session whose first run was 528 x 528 (and disabling the memory
    pattern made every run slow). Sessions cost 15-20 ms to create and hold little memory without
    the arena, so each shape gets its own: a run of same-size images or tiles uses one or two.
    """

    def __init__(self, path: Path, opts, providers: list[str], first):
        self.path, self.opts, self.providers = str(path), opts, providers
        self._fresh = first  # created by the engine to learn its providers; not run yet
        self._by_shape: OrderedDict = OrderedDict()
        self.output = first.get_outputs()[0].name

    def run(self, feeds: dict, shape: tuple) -> np.ndarray:
        sess = self._by_shape.get(shape)
        if sess is None:
            import onnxruntime as ort

            if self._fresh is not None:
                sess, self._fresh = self._fresh, None
            else:
                sess = ort.InferenceSession(self.path, self.opts, providers=self.providers)
            self._by_shape[shape] = sess
            if len(self._by_shape) > SESSIONS_PER_SHAPE_CACHE:
                self._by_shape.popitem(last=False)
        else:
            self._by_shape.move_to_end(shape)
        return sess.run([self.output], feeds)[0]


class OnnxEngine:
    """Runs ``encoder.onnx`` and ``decider.onnx`` (see :mod:`ray_mff.export`) with ONNX Runtime.

    Args:
        encoder, decider: paths of the two graphs.
        precision: what the graphs compute in (``"fp32"``/``"fp16"``), for reporting.
        stride: pad inputs to multiples of this (the model's ``stride``); default: the ``stride``
            in the export's ``meta.json`` beside ``encoder`` (1 without one).
        providers: ONNX Runtime providers to ask for (default :func:`default_providers`).
        threads: intra-op threads (default :func:`default_threads`).

    Example::

        >>> paths = cached_onnx(get_model("cascade"))                       # doctest: +SKIP
        >>> eng = OnnxEngine(paths["encoder"], paths["decider"])            # doctest: +SKIP
        >>> f = eng.encode(y)                       # (2, 1, H, W) -> (2, C, H, W)  # doctest: +SKIP
        >>> d = eng.decide(f[:1], f[1:], y[:1], y[1:])   # (1, 1, H, W)     # doctest: +SKIP
    """

    def __init__(self, encoder: str | os.PathLike, decider: str | os.PathLike, *, precision: str = "fp32",
                 stride: int | None = None, providers: list[str] | None = None, threads: int | None = None,
                 model_name: str | None = None):
        import onnxruntime as ort

        self.precision = check_precision(precision)
        self.stride = int(stride) if stride is not None else _exported_stride(Path(encoder))
        self.model_name = model_name
        self.paths = (Path(encoder), Path(decider))
        asked = list(providers) if providers else default_providers()
        opts = session_options(threads)
        self.threads = opts.intra_op_num_threads
        self._enc = ort.InferenceSession(str(encoder), opts, providers=asked)
        self._dec = ort.InferenceSession(str(decider), opts, providers=asked)
        # what the sessions really run on: ORT drops providers it cannot load without raising
        self.providers = list(self._enc.get_providers())
        if CUDA in asked and CUDA not in self.providers:
            log.warning("onnxruntime: CUDAExecutionProvider was requested but could not be loaded; running on %s",
                        ", ".join(self.providers))
        on_cuda = self.providers[0] == CUDA
        self.device = "cuda:0" if on_cuda else "cpu"
        self.name = "onnxruntime-cuda" if on_cuda else "onnxruntime-cpu"
        self._enc = _SessionPerShape(self.paths[0], opts, self.providers, self._enc)
        self._dec = _SessionPerShape(self.paths[1], opts, self.providers, self._dec)

    def encode(self, y: np.ndarray) -> np.ndarray:
        """(B, 1, H, W) float32 luminance -> (B, C, H', W') float32 features (H', W' padded to stride)."""
        y = np.ascontiguousarray(pad_to_multiple(np.asarray(y, dtype=np.float32), self.stride))
        return self._enc.run({"y": y}, y.shape)

    def decide(self, feats_a: np.ndarray, feats_b: np.ndarray, y_a: np.ndarray, y_b: np.ndarray) -> np.ndarray:
        """Features (B, C, H', W') and luminances (B, 1, H, W) -> D (B, 1, H, W) float32 in [0, 1]."""
        h, w = y_a.shape[-2:]
        feeds = {
            "feats_a": np.ascontiguousarray(feats_a, dtype=np.float32),
            "feats_b": np.ascontiguousarray(feats_b, dtype=np.float32),
            "y_a": np.ascontiguousarray(pad_to_multiple(np.asarray(y_a, dtype=np.float32), self.stride)),
            "y_b": np.ascontiguousarray(pad_to_multiple(np.asarray(y_b, dtype=np.float32), self.stride)),
        }
        return crop_to(self._dec.run(feeds, feeds["y_a"].shape), h, w)

    def describe(self) -> dict:
        return {"engine": self.name, "precision": self.precision, "device": self.device,
                "providers": list(self.providers), "threads": self.threads,
                "model": self.model_name, "graphs": [str(p) for p in self.paths]}

    def __repr__(self) -> str:
        return f"OnnxEngine({self.model_name or ''}, {self.precision}, providers={self.providers})"
