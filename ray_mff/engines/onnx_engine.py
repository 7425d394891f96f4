"""ONNX Runtime engine: the exported encoder/decider graphs in two inference sessions.

CPU provider by default; the CUDA provider when ONNX Runtime was built with it (onnxruntime-gpu)
and a device is visible. ONNX Runtime silently falls back to CPU when a provider cannot load
(missing CUDA libraries), so the engine reports the providers the sessions *actually* use
(``InferenceSession.get_providers()``), never the ones it asked for, and logs a warning.

On CUDA there is **one session per graph** (the per-shape sessions below are a CPU memory-planner
workaround), with cuDNN's *heuristic* convolution algorithm choice (``cudnn_conv_algo_search =
HEURISTIC``: the default EXHAUSTIVE search benchmarks every algorithm for every new input shape),
run with **IOBinding** on torch CUDA tensors (:class:`_BoundSession`): inputs and outputs are bound
to device buffers, so features stay on the GPU between ``encode`` and ``decide`` and only the
decision map is copied back. ONNX Runtime computes on the engine's own torch CUDA stream
(``user_compute_stream``), so torch's padding and copies are ordered with it.

Inputs and outputs are float32 numpy arrays for both precisions (fp16 graphs cast inside, see
:mod:`ray_mff.export`). Inputs are padded to the model's stride multiple here and outputs are
cropped back (:func:`ray_mff.engines.base.pad_to_multiple`).
"""
from __future__ import annotations

import contextlib
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


def session_options(threads: int | None = None, *, arena: bool = False):
    """Session options tuned for these small conv nets on a few CPU cores.

    - ``intra_op_num_threads`` = the CPUs we are entitled to (not the machine's core count: on a
      shared node or in a Ray actor more threads only contend);
    - one inter-op thread (the graphs are chains; parallel branches are tiny);
    - *all* graph optimisations, including the NCHWc layout transform: with ``cascade``'s 88-channel
      dense block it pays for its reorders (1024 x 1024, 2 threads: two encodes 2.31-2.44 s vs
      2.57-2.62 s with *extended*, a decide 0.067-0.072 s vs 0.090 s, same peak memory; the
      previous, narrower network was faster with *extended*);
    - intra-op threads that sleep when idle instead of spinning: every session has its own thread
      pool, and an encoder's pool still spinning after its run took the cores from the decider
      that ran next (a 2-pair decide right after a 3 x 528 x 528 encode: 0.054-0.065 s spinning,
      0.035-0.037 s not; the encode itself was no slower);
    - ``arena``: ONNX Runtime's CPU memory arena, which keeps the memory of one run for the next
      (and no memory pattern, which with the arena only adds a second copy of the working set).
      Without it every run allocates its working set afresh and pays its page faults. Which
      sessions get one is decided by :class:`_SessionPerShape`.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_cpu_mem_arena = bool(arena)
    # without the arena the memory pattern planner still lays a run's buffers out in one block
    so.enable_mem_pattern = not arena
    so.log_severity_level = 3  # errors only: fp16 graphs warn about constant folding on CPU
    return so


def _exported_meta(encoder: Path) -> dict:
    """What :func:`ray_mff.export.export_model` recorded beside the graphs (stride, feature channels...)."""
    meta = encoder.with_name("meta.json")
    if not meta.is_file():
        return {}
    return json.loads(meta.read_text())


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


#: sessions kept per graph, one per input shape, least recently used dropped first
SESSIONS_PER_SHAPE_CACHE = 4
#: inputs of at most this many pixels per call (batch x H x W) run in a session with a memory
#: arena (``RAY_MFF_ORT_ARENA_PIXELS``; 0 turns the arena off): 786,432, e.g. a pair of 600 x 600
#: images or one 880 x 880
ARENA_MAX_PIXELS = _env_int("RAY_MFF_ORT_ARENA_PIXELS", 3 << 18)
#: of the cached sessions of a graph, at most this many keep an arena (the least recently used goes)
ARENA_SESSIONS = 2


class _SessionPerShape:
    """One ONNX Runtime session per input shape of a graph, some with a memory arena.

    *One session per shape.* ONNX Runtime plans its memory pattern on a session's first run, and
    a session stays fast only at that run's shape: an encoder first run on 2 x 128 x 128 then
    took 1.23 s per 2 x 528 x 528 run, against 0.64 s for a session whose first run was 528 x 528
    (and disabling the memory pattern made every run slow). Sessions cost 15-20 ms to create: a
    run of same-size images or tiles uses one or two.

    *Arena for small inputs only.* Without the arena every run allocates its working set afresh
    and pays its page faults. With it the memory stays with the session, and runs are 25-40 %
    faster: ``cascade``'s encoder, 2 threads, 2 x 528 x 528 in 0.47-0.49 s against 0.62-0.76 s;
    1 x 1024 x 1024 in 0.93 s against 1.23-1.30 s. The price is that memory, held while the
    session lives: 0.94 GiB resident after 2 x 528 x 528 runs (0.68 GiB peak without the arena),
    1.82 GiB after 1024 x 1024 (1.24 GiB), 3.40 GiB after 1600 x 1200 (2.19 GiB). (With the
    memory pattern as well it held 1.54, 2.97 and 5.30 GiB at the same speed, so arena sessions
    run without it; shrinking the arena after each run, ONNX Runtime's
    ``memory.enable_memory_arena_shrinkage``, gave back all of the speed.) So only inputs of at
    most :data:`ARENA_MAX_PIXELS` per call get an arena, in at most :data:`ARENA_SESSIONS`
    sessions per graph: a worker holds at most about 2.8 GiB of arenas for ``cascade`` (two
    encoder sessions of 0.79 MP), and larger images keep the memory bound of one call. Tiled fusion
    (:mod:`ray_mff.tiling`) turns arenas off (``max_pixels = 0``) while it runs, so a huge
    image's memory stays that of one tile at a time, whatever the tiles' sizes.
    """

    def __init__(self, path: Path, threads: int | None, providers: list[str], output: str, max_pixels: int):
        self.path, self.threads, self.providers, self.output = str(path), threads, providers, output
        self.max_pixels = max_pixels  # inputs (B, C, H, W) with B x H x W up to this get an arena
        self._sessions: OrderedDict = OrderedDict()  # (shape, has arena) -> session

    def wants_arena(self, shape: tuple) -> bool:
        b, _, h, w = shape
        return 0 < b * h * w <= self.max_pixels

    def drop_arenas(self) -> None:
        """Close the sessions that hold an arena (their memory goes back to the system)."""
        for key in [k for k in self._sessions if k[1]]:
            del self._sessions[key]

    def _session(self, shape: tuple):
        key = (shape, self.wants_arena(shape))
        sess = self._sessions.get(key)
        if sess is not None:
            self._sessions.move_to_end(key)
            return sess
        import onnxruntime as ort

        if key[1]:  # at most ARENA_SESSIONS hold an arena: drop the least recently used first
            held = [k for k in self._sessions if k[1]]
            for k in held[: max(0, len(held) - ARENA_SESSIONS + 1)]:
                del self._sessions[k]
        sess = ort.InferenceSession(self.path, session_options(self.threads, arena=key[1]), providers=self.providers)
        self._sessions[key] = sess
        while len(self._sessions) > SESSIONS_PER_SHAPE_CACHE:
            self._sessions.popitem(last=False)
        return sess

    def shapes(self) -> list[tuple]:
        """Input shapes of the cached sessions, least recently used first."""
        return [k[0] for k in self._sessions]

    def arenas(self) -> list[tuple]:
        """Input shapes whose cached session holds a memory arena."""
        return [k[0] for k in self._sessions if k[1]]

    def run(self, feeds: dict, shape: tuple) -> np.ndarray:
        return self._session(shape).run([self.output], feeds)[0]


class _BoundSession:
    """One session run with IOBinding on torch tensors of ``device`` (CUDA on GPUs; CPU in tests).

    Inputs are bound where they are (``bind_input(name, device_type, device_id, float32, shape,
    data_ptr)``); the output is a torch tensor allocated here at ``out_shape(feeds)`` and bound
    the same way, so nothing is copied between the host and the device inside ``run``.
    """

    def __init__(self, session, output: str, device, stream=None):
        self.session, self.output, self.device, self.stream = session, output, device, stream
        self.max_pixels = 0  # no CPU arena here (see OnnxEngine.without_arena)

    def drop_arenas(self) -> None:
        pass

    def _run_options(self):
        if self.stream is None:
            return None
        import onnxruntime as ort

        opts = ort.RunOptions()
        opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return opts

    def run(self, feeds: dict, out_shape: tuple):
        import torch

        kind, index = self.device.type, self.device.index or 0
        binding = self.session.io_binding()
        held = []
        for name, t in feeds.items():
            t = t.to(self.device, torch.float32).contiguous()
            held.append(t)  # alive until the run is done
            binding.bind_input(name, kind, index, np.float32, tuple(t.shape), t.data_ptr())
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding.bind_output(self.output, kind, index, np.float32, tuple(out.shape), out.data_ptr())
        # ONNX Runtime computes on self.stream (user_compute_stream), where torch wrote the inputs;
        # no host wait at the end of the run: whoever reads the output waits on that stream
        self.session.run_with_iobinding(binding, self._run_options())
        return out


class _OneSession:
    """One session for every shape, numpy in and out (onnxruntime-gpu beside a CPU-only torch)."""

    max_pixels = 0

    def __init__(self, session, output: str):
        self.session, self.output = session, output

    def drop_arenas(self) -> None:
        pass

    def run(self, feeds: dict, shape: tuple) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]


def cuda_provider_options(device_id: int = 0, stream=None) -> dict:
    """CUDA execution provider options: heuristic cuDNN algorithm choice (no per-shape exhaustive
    benchmark), an arena that grows by what is asked, and torch's stream as the compute stream."""
    opts = {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC",
            "arena_extend_strategy": "kSameAsRequested"}
    if stream is not None:
        opts["user_compute_stream"] = str(stream.cuda_stream)
    return opts


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
                 model_name: str | None = None, feature_channels: int | None = None,
                 feature_downsample: int | None = None, device_id: int = 0, iobinding: bool | None = None):
        import onnxruntime as ort

        self.precision = check_precision(precision)
        meta = _exported_meta(Path(encoder))
        self.stride = int(stride) if stride is not None else int(meta.get("stride", 1))
        self.feature_channels = int(feature_channels or meta.get("feature_channels", 0)) or None
        self.feature_downsample = int(feature_downsample or meta.get("feature_downsample", 1))
        self.model_name = model_name
        self.paths = (Path(encoder), Path(decider))
        asked = list(providers) if providers else default_providers()
        opts = session_options(threads)
        self.threads = opts.intra_op_num_threads
        stream = None
        if CUDA in asked:
            import torch

            if torch.cuda.is_available():
                stream = torch.cuda.Stream(device=device_id)
            asked = [(CUDA, cuda_provider_options(device_id, stream)) if p == CUDA else p for p in asked]
        # these sessions load (and so check) both graphs and tell what they really run on (ORT drops
        # providers it cannot load without raising); on CPU, runs get sessions per shape
        probes = [ort.InferenceSession(str(path), opts, providers=asked) for path in self.paths]
        self.providers = list(probes[0].get_providers())
        if CUDA in [p if isinstance(p, str) else p[0] for p in asked] and CUDA not in self.providers:
            from ray_mff.engines.choice import ort_gpu_conflict

            log.warning("onnxruntime: CUDAExecutionProvider was requested but could not be loaded; running on %s%s",
                        ", ".join(self.providers), f" ({ort_gpu_conflict()})" if ort_gpu_conflict() else "")
        on_cuda = self.providers[0] == CUDA
        self.device = f"cuda:{device_id}" if on_cuda else "cpu"
        self.name = "onnxruntime-cuda" if on_cuda else "onnxruntime-cpu"
        outputs = [probe.get_outputs()[0].name for probe in probes]
        # IOBinding needs torch tensors on the session's device: default on CUDA with a CUDA torch
        self.iobinding = (on_cuda and stream is not None) if iobinding is None else bool(iobinding)
        if self.iobinding and not self.feature_channels:
            raise ValueError("IOBinding needs the encoder's feature channels (meta.json or feature_channels=)")
        self._stream = stream if on_cuda else None
        if self.iobinding:
            import torch

            dev = torch.device(self.device)
            self._enc, self._dec = (_BoundSession(p, o, dev, self._stream) for p, o in zip(probes, outputs))
        elif on_cuda:  # CPU-only torch beside onnxruntime-gpu: one session each, numpy in and out
            self._enc, self._dec = (_OneSession(p, o) for p, o in zip(probes, outputs))
        else:
            self._enc, self._dec = (_SessionPerShape(path, self.threads, self.providers, o, ARENA_MAX_PIXELS)
                                    for path, o in zip(self.paths, outputs))

    # -- IOBinding (torch tensors on the session's device) ------------------------------------------

    def _stream_ctx(self):
        import torch

        if self._stream is None:
            return contextlib.nullcontext()
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        return torch.cuda.stream(self._stream)

    def _to_device(self, x):
        import torch

        dev = torch.device(self.device)
        if isinstance(x, torch.Tensor):
            return x.to(dev, torch.float32, non_blocking=True)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if dev.type == "cuda":
            t = t.pin_memory()  # page-locked staging: the copy to the GPU is asynchronous
        t = t.to(dev, non_blocking=True)
        h, w = t.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        return torch.nn.functional.pad(t, (0, pw, 0, ph), mode="replicate") if ph or pw else t

    def _encode_bound(self, y):
        with self._stream_ctx():
            t = self._to_device(y)
            b, _, h, w = t.shape
            ds = self.feature_downsample
            return self._enc.run({"y": t}, (b, self.feature_channels, -(-h // ds), -(-w // ds)))

    def _decide_bound(self, feats_a, feats_b, y_a, y_b) -> np.ndarray:
        import torch

        h, w = y_a.shape[-2:]
        with self._stream_ctx():
            ya, yb = self._to_device(y_a), self._to_device(y_b)
            d = self._dec.run({"feats_a": self._to_device(feats_a), "feats_b": self._to_device(feats_b),
                               "y_a": ya, "y_b": yb}, tuple(ya.shape))
            d = crop_to(d, h, w)
            if d.device.type != "cuda":
                return d.numpy().copy()
            host = torch.empty(d.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(d, non_blocking=True)
        self._stream.synchronize()
        return host.numpy()

    def encode(self, y: np.ndarray):
        """(B, 1, H, W) float32 luminance -> (B, C, H', W') float32 features (H', W' padded to stride):
        numpy, or a torch tensor on the session's device with IOBinding."""
        if self.iobinding:
            return self._encode_bound(y)
        y = np.ascontiguousarray(pad_to_multiple(np.asarray(y, dtype=np.float32), self.stride))
        return self._enc.run({"y": y}, y.shape)

    def decide(self, feats_a, feats_b, y_a: np.ndarray, y_b: np.ndarray) -> np.ndarray:
        """Features (B, C, H', W') and luminances (B, 1, H, W) -> D (B, 1, H, W) float32 in [0, 1]."""
        if self.iobinding:
            return self._decide_bound(feats_a, feats_b, y_a, y_b)
        h, w = y_a.shape[-2:]
        feeds = {
            "feats_a": np.ascontiguousarray(feats_a, dtype=np.float32),
            "feats_b": np.ascontiguousarray(feats_b, dtype=np.float32),
            "y_a": np.ascontiguousarray(pad_to_multiple(np.asarray(y_a, dtype=np.float32), self.stride)),
            "y_b": np.ascontiguousarray(pad_to_multiple(np.asarray(y_b, dtype=np.float32), self.stride)),
        }
        return crop_to(self._dec.run(feeds, feeds["y_a"].shape), h, w)

    @contextlib.contextmanager
    def without_arena(self):
        """Within the block, no session keeps a memory arena (those that did are closed first):
        each call allocates its working set and gives it back, as :mod:`ray_mff.tiling` needs
        for a memory bound set by the tile size."""
        saved = [(g, g.max_pixels) for g in (self._enc, self._dec)]
        try:
            for g, _ in saved:
                g.drop_arenas()
                g.max_pixels = 0
            yield self
        finally:
            for g, value in saved:
                g.max_pixels = value

    def describe(self) -> dict:
        return {"engine": self.name, "precision": self.precision, "device": self.device,
                "providers": list(self.providers), "threads": self.threads, "iobinding": self.iobinding,
                "model": self.model_name, "graphs": [str(p) for p in self.paths]}

    def __repr__(self) -> str:
        return f"OnnxEngine({self.model_name or ''}, {self.precision}, providers={self.providers})"
