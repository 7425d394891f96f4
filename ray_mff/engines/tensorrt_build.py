"""Build TensorRT engines from the exported ONNX graphs, and cache them by what they depend on.

TensorRT cannot be installed on the development machines, so everything that does not touch a
GPU (build-mode selection, profile shapes, cache keys) is plain Python tested with a fake ``trt``
module; the calls into TensorRT follow the Python API reference of TensorRT 10.x/11.x:

- ``trt.Builder(logger).create_network(flags)``: networks are always explicit-batch in TensorRT
  10/11 (``flags = 0``); ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` makes the ONNX graph's
  own types authoritative.
- ``trt.OnnxParser(network, logger).parse(bytes)``, errors via ``num_errors``/``get_error(i)``.
- ``config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)``; an optimisation profile
  per dynamic input: ``profile.set_shape(name, min, opt, max)``, ``config.add_optimization_profile``.
- optional timing cache: ``config.create_timing_cache(bytes)``, ``config.set_timing_cache(cache,
  ignore_mismatch=False)``, saved after the build from ``config.get_timing_cache().serialize()``.
- ``builder.build_serialized_network(network, config)`` -> serialized plan (None on failure).

**Precision.** TensorRT 10 builds fp16 from the fp32 graph with ``BuilderFlag.FP16`` (weak
typing: TensorRT may pick fp16 kernels). TensorRT 11 removed that flag (and all weak typing):
precision comes from the graph, so fp16 builds use the fp16 ONNX graph from
:mod:`ray_mff.export` (fp16 arithmetic, float32 I/O) in a strongly typed network. Detected with
``hasattr(trt.BuilderFlag, "FP16")`` and the major version, see :func:`select_build_mode`.

**Runtime memory.** Where this TensorRT has it (10.10+), plans are built with
``PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10``, so that a context's
``update_device_memory_size_for_shapes()`` sizes its scratch memory for the shapes of each call
(:mod:`ray_mff.engines.tensorrt_engine`) instead of the profile's largest.

**Cache.** A plan only runs on the TensorRT version and GPU it was built for and only accepts
shapes inside its profile, so it is cached under a key hashing the ONNX file's sha256, the
TensorRT version, the GPU name and compute capability, the profile shapes and the precision
(:func:`engine_cache_key`); any change gives a new key and a rebuild. The cache folder is local
(default ``$RAY_MFF_CACHE/tensorrt``) or any ``s3://`` URI (:mod:`ray_mff.storage`).

Beside the plans the cache keeps one **timing cache** per TensorRT version and GPU
(``timing-<trt>-<gpu>.cache``: the measured kernel timings, ``config.create_timing_cache`` /
``set_timing_cache``, serialized back after each build), so the second graph, a new profile or a
new model on the same GPU skips most of the tactic timing.

**One builder.** Every fusion actor that starts on a new node would otherwise build the same plans
at once. For a local cache a lock file (:func:`ray_mff.cache.file_lock`) lets one process build while
the others wait and then read its plan. For an ``s3://`` cache, shared by all nodes, a *create-only*
marker object (``<plan>.building``, written with S3's ``If-None-Match: *``, or ``open(..., "xb")``
on a filesystem) elects one builder per key; the others poll for the plan, and build themselves
only if the marker is older than :data:`BUILD_TIMEOUT_S` (a builder that died).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("ray_mff.engines")

#: the engine protocol's graph inputs (see ray_mff.export)
GRAPH_INPUTS = {
    "encoder": ("y",),
    "decider": ("feats_a", "feats_b", "y_a", "y_b"),
}


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max image shapes (H, W) and batch of one TensorRT optimisation profile.

    Images bigger than ``max_hw`` are tiled by :class:`ray_mff.tiling.TiledFuser` (give it a
    ``tile_size`` of at most ``min(max_hw)``). Batches are 1 (a pair's decision) to ``max_batch``
    (a stack's images encoded together).
    """

    min_hw: tuple[int, int] = (32, 32)
    opt_hw: tuple[int, int] = (1024, 1024)
    max_hw: tuple[int, int] = (2048, 2048)
    min_batch: int = 1
    opt_batch: int = 2
    max_batch: int = 4

    def __post_init__(self):
        for a, b in ((self.min_hw, self.opt_hw), (self.opt_hw, self.max_hw)):
            if a[0] > b[0] or a[1] > b[1]:
                raise ValueError(f"profile shapes must grow min <= opt <= max, got {self}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"profile batches must satisfy 1 <= min <= opt <= max, got {self}")
        if tuple(self.opt_hw) > tuple(self.max_hw):
            object.__setattr__(self, "opt_hw", tuple(self.max_hw))

    def input_shapes(self, graph: str, channels: int, downsample: int = 1) -> dict[str, tuple[tuple[int, ...], ...]]:
        """``{input name: (min, opt, max)}`` NCHW shapes for graph ``encoder`` or ``decider``.

        Feature inputs have ``channels`` channels and ``ceil(H / downsample)`` x ``ceil(W / downsample)``
        pixels (the model's ``feature_downsample``; ``cascade`` encodes at half resolution).
        """
        def feats(hw):
            return tuple(-(-int(v) // downsample) for v in hw)

        out = {}
        for name in GRAPH_INPUTS[graph]:
            if name.startswith("feats"):
                out[name] = ((self.min_batch, channels, *feats(self.min_hw)), (self.opt_batch, channels, *feats(self.opt_hw)),
                             (self.max_batch, channels, *feats(self.max_hw)))
            else:
                out[name] = ((self.min_batch, 1, *self.min_hw), (self.opt_batch, 1, *self.opt_hw),
                             (self.max_batch, 1, *self.max_hw))
        return out


@dataclass(frozen=True)
class BuildMode:
    """How to get a given precision out of a given TensorRT.

    onnx_precision: which exported graph to parse (``fp32`` or ``fp16``);
    builder_flags:  names of ``trt.BuilderFlag`` members to set (``["FP16"]`` on TensorRT 10);
    strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
    """

    precision: str
    onnx_precision: str
    builder_flags: tuple[str, ...] = ()
    strongly_typed: bool = False
    why: str = ""


def trt_major(trt) -> int:
    try:
        return int(str(getattr(trt, "__version__", "0")).split(".")[0])
    except ValueError:
        return 0


def select_build_mode(trt, precision: str) -> BuildMode:
    """Precision -> build mode for this TensorRT (see the module docstring)."""
    from ray_mff.engines.base import check_precision

    check_precision(precision)
    has_fp16_flag = hasattr(getattr(trt, "BuilderFlag", None), "FP16")
    has_strong = hasattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED")
    if precision == "fp32":
        # Strongly typed where available (TensorRT >= 10.12; always on in 11): fp32 graph -> fp32 kernels.
        return BuildMode("fp32", "fp32", (), has_strong and trt_major(trt) >= 11, "fp32 graph")
    if has_fp16_flag and trt_major(trt) < 11:
        return BuildMode("fp16", "fp32", ("FP16",), False,
                         f"TensorRT {trt.__version__}: fp32 graph with BuilderFlag.FP16 (weak typing)")
    return BuildMode("fp16", "fp16", (), has_strong,
                     f"TensorRT {getattr(trt, '__version__', '?')}: no BuilderFlag.FP16; fp16 ONNX graph in a "
                     "strongly typed network")


def network_flags(trt, mode: BuildMode) -> int:
    """``create_network`` flags: 0 (explicit batch is the only mode in TensorRT 10/11), plus
    STRONGLY_TYPED when the mode asks for it."""
    if mode.strongly_typed:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]


def current_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device`` (via torch)."""
    import torch

    return GpuInfo(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))


def engine_cache_key(*, onnx_sha256: str, trt_version: str, gpu: GpuInfo, profile: ShapeProfile,
                     precision: str, mode: BuildMode | None = None) -> str:
    """sha256 over everything a serialized plan depends on; a change of any part -> a new plan."""
    facts = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": str(trt_version),
        "gpu": gpu.name,
        "compute_capability": list(gpu.compute_capability),
        "profile": asdict(profile),
        "precision": precision,
        "mode": asdict(mode) if mode else None,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=list).encode()).hexdigest()


class TensorRTBuildError(RuntimeError):
    pass


def build_serialized_engine(trt, onnx_bytes: bytes, *, mode: BuildMode, shapes: dict, workspace_bytes: int = 2 << 30,
                            timing_cache: bytes | None = None, logger=None) -> tuple[bytes, bytes | None]:
    """ONNX bytes -> (serialized plan, serialized timing cache or None). ``trt`` is the module.

    shapes: ``{input name: (min, opt, max)}`` (see :meth:`ShapeProfile.input_shapes`).
    """
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, mode))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"the ONNX parser rejected the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for flag in mode.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if mode.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TensorRT 10 enables TF32 convolutions by default (10-bit mantissa); fp32 means fp32 here,
        # so that plans match ONNX Runtime/torch to ~1e-5 like the other engines.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for name in names:
        if name not in shapes:
            raise TensorRTBuildError(f"no profile shapes for network input {name!r}")
        lo, opt, hi = shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    resize = getattr(getattr(trt, "PreviewFeature", None), "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if resize is not None:  # scratch memory sized per call (see the module docstring)
        config.set_preview_feature(resize, True)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache)
        config.set_timing_cache(cache, False)  # ignore_mismatch=False: a foreign cache is not used
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError("build_serialized_network returned None (see the TensorRT log above)")
    new_cache = None
    if cache is not None:
        new_cache = bytes(config.get_timing_cache().serialize())
    return bytes(plan), new_cache


def engine_cache_root() -> str:
    """``$RAY_MFF_TRT_CACHE`` (a folder or s3:// prefix), else ``<$RAY_MFF_CACHE>/tensorrt``."""
    env = os.environ.get("RAY_MFF_TRT_CACHE")
    if env:
        return env
    from ray_mff.cache import cache_root

    return str(cache_root() / "tensorrt")


def _tensorrt():
    from ray_mff.engines.choice import require_tensorrt

    require_tensorrt()
    import tensorrt as trt

    return trt


def build_engine_file(onnx_path: str | os.PathLike, out: str | os.PathLike, *, precision: str,
                      profile: ShapeProfile, feature_channels: int, feature_downsample: int = 1,
                      workspace_bytes: int = 2 << 30, timing_cache: str | os.PathLike | None = None, trt=None) -> Path:
    """Build one graph (``encoder.onnx`` or ``decider.onnx``) into a plan file at ``out``.

    The graph kind is taken from the ONNX file name. With TensorRT 10 + fp16 pass the *fp32*
    graph (BuilderFlag.FP16 lowers it); with TensorRT 11 + fp16 pass the fp16 graph.
    """
    from ray_mff import storage

    trt = trt or _tensorrt()
    onnx_path = Path(onnx_path)
    graph = "encoder" if onnx_path.stem.startswith("encoder") else "decider"
    mode = select_build_mode(trt, precision)
    cache_bytes = None
    if timing_cache is not None and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    elif timing_cache is not None:
        cache_bytes = b""
    t0 = time.perf_counter()
    plan, new_cache = build_serialized_engine(trt, onnx_path.read_bytes(), mode=mode,
                                              shapes=profile.input_shapes(graph, feature_channels, feature_downsample),
                                              workspace_bytes=workspace_bytes, timing_cache=cache_bytes)
    storage.write_bytes_atomic(str(out), plan)
    if new_cache is not None and timing_cache is not None:
        storage.write_bytes_atomic(str(timing_cache), new_cache)
    log.info("built TensorRT %s %s plan (%s) in %.1f s -> %s", graph, precision, mode.why,
             time.perf_counter() - t0, out)
    return Path(out)


#: an ``s3://`` build marker older than this is a builder that died: build anyway
BUILD_TIMEOUT_S = 1800.0


def timing_cache_uri(root: str, trt_version: str, gpu: GpuInfo) -> str:
    """Where the timing cache of this TensorRT version and GPU lives in the plan cache ``root``."""
    import re

    gpu_id = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-").lower()
    return f"{root.rstrip('/')}/timing-{trt_version}-{gpu_id}-sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}.cache"


def create_only(uri: str, data: bytes) -> bool:
    """Write ``data`` at ``uri`` only if nothing is there: True if this call created it.

    S3: ``PutObject`` with ``If-None-Match: *`` (s3fs ``pipe_file(..., mode="create")``); local
    paths: ``open(path, "xb")``. Either way exactly one of several concurrent writers wins.
    """
    from ray_mff import storage

    if not storage.is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(uri, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
    fs, path = storage.resolve(uri)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:  # s3fs: 412 PreconditionFailed, someone else created it
        return False
    except Exception:  # noqa: BLE001 - another store may word a lost race differently
        fs.invalidate_cache(path)
        if fs.exists(path):
            return False
        raise


def _marker_age(uri: str) -> float:
    from ray_mff import storage

    try:
        facts = json.loads(storage.read_bytes(uri))
        return time.time() - float(facts.get("time", 0))
    except Exception:  # noqa: BLE001 - gone or unreadable: treat as stale
        return float("inf")


@contextlib.contextmanager
def one_builder(root: str, uri: str, timeout: float | None = None, poll: float = 2.0):
    """Context in which this process is the one builder of ``uri`` (a plan): a file lock for a local
    cache, a create-only marker for ``s3://``. Yields False if, while waiting, another builder
    wrote the plan (nothing to build), else True."""
    from ray_mff import storage
    from ray_mff.cache import file_lock

    timeout = BUILD_TIMEOUT_S if timeout is None else timeout
    if not storage.is_remote(root):
        with file_lock(Path(root) / f".{storage.basename(uri)}.lock", timeout=timeout):
            yield not storage.exists(uri)
        return
    marker = uri + ".building"
    facts = json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "time": time.time()}).encode()
    deadline = time.monotonic() + timeout
    while not create_only(marker, facts):
        if storage.exists(uri):
            yield False
            return
        if _marker_age(marker) > timeout or time.monotonic() > deadline:
            log.warning("TensorRT build marker %s is stale; building here", marker)
            storage.write_bytes_atomic(marker, facts)
            break
        time.sleep(poll)
    try:
        yield not storage.exists(uri)
    finally:
        storage.remove(marker)


def cached_engine(onnx_path: str | os.PathLike, *, precision: str, profile: ShapeProfile, feature_channels: int,
                  feature_downsample: int = 1, workspace_bytes: int = 2 << 30, cache: str | None = None, trt=None,
                  gpu: GpuInfo | None = None) -> bytes:
    """The serialized plan for ``onnx_path`` on this GPU, from the cache or built (and cached) now.

    ``onnx_path`` must be the graph that :func:`select_build_mode` asks for (``cached_onnx`` of
    ``mode.onnx_precision``); make_engine takes care of that. One process per key builds (see the
    module docstring), reusing and updating the timing cache kept beside the plans.
    """
    from ray_mff import storage
    from ray_mff.cache import file_sha

    trt = trt or _tensorrt()
    gpu = gpu or current_gpu()
    mode = select_build_mode(trt, precision)
    onnx_path = Path(onnx_path)
    graph = "encoder" if onnx_path.stem.startswith("encoder") else "decider"
    key = engine_cache_key(onnx_sha256=file_sha(onnx_path), trt_version=trt.__version__, gpu=gpu, profile=profile,
                           precision=precision, mode=mode)
    root = str(cache or engine_cache_root())
    uri = storage.join_uri(root, f"{graph}-{precision}-{key[:24]}.plan")
    if storage.exists(uri):
        log.info("TensorRT plan cache hit: %s", uri)
        return storage.read_bytes(uri)
    with one_builder(root, uri) as build:
        if not build:
            log.info("TensorRT plan built by another process: %s", uri)
            return storage.read_bytes(uri)
        timing_uri = timing_cache_uri(root, trt.__version__, gpu)
        timing = storage.read_bytes(timing_uri) if storage.exists(timing_uri) else b""
        plan, new_timing = build_serialized_engine(trt, onnx_path.read_bytes(), mode=mode,
                                                   shapes=profile.input_shapes(graph, feature_channels,
                                                                               feature_downsample),
                                                   workspace_bytes=workspace_bytes, timing_cache=timing)
        facts = {"onnx": str(onnx_path), "tensorrt": trt.__version__, "gpu": gpu.name,
                 "compute_capability": list(gpu.compute_capability), "profile": asdict(profile),
                 "precision": precision, "mode": asdict(mode), "key": key}
        storage.write_bytes_atomic(uri, plan)
        storage.write_bytes_atomic(uri[: -len(".plan")] + ".json", json.dumps(facts, indent=2).encode())
        if new_timing:
            storage.write_bytes_atomic(timing_uri, new_timing)
        log.info("built and cached TensorRT %s plan (%s): %s", graph, mode.why, uri)
    return plan


def build_plans(model_name: str, out_dir: str | os.PathLike, *, precision: str = "fp32", weights="default",
                profile: ShapeProfile | None = None, workspace_bytes: int = 2 << 30,
                timing_cache: str | os.PathLike | None = None, trt=None) -> dict:
    """Export ``model_name`` to the ONNX graph this TensorRT needs for ``precision`` and build both
    plans into ``out_dir`` (``encoder.plan``, ``decider.plan``, ``plans.json``). Returns the paths
    and facts. This is what ``ray-mff export --format tensorrt`` and ``trt/build_engine.py`` run."""
    from ray_mff.cache import file_sha
    from ray_mff.export import export_onnx

    trt = trt or _tensorrt()
    profile = profile or ShapeProfile()
    mode = select_build_mode(trt, precision)
    out_dir = Path(out_dir)
    onnx = export_onnx(model_name, out_dir / f"onnx-{mode.onnx_precision}", mode.onnx_precision, weights)
    plans = {}
    for graph in ("encoder", "decider"):
        plans[graph] = build_engine_file(onnx[graph], out_dir / f"{graph}.plan", precision=precision, profile=profile,
                                         feature_channels=onnx["feature_channels"],
                                         feature_downsample=onnx.get("feature_downsample", 1), workspace_bytes=workspace_bytes,
                                         timing_cache=timing_cache, trt=trt)
    gpu = current_gpu()
    facts = {"model": model_name, "precision": precision, "mode": asdict(mode), "tensorrt": trt.__version__,
             "gpu": gpu.name, "compute_capability": list(gpu.compute_capability), "profile": asdict(profile),
             "onnx": {g: {"path": str(onnx[g]), "sha256": file_sha(onnx[g])} for g in ("encoder", "decider")},
             "stride": onnx["stride"], "feature_channels": onnx["feature_channels"],
             "feature_downsample": onnx.get("feature_downsample", 1),
             "onnx_verification": onnx.get("verification")}
    (out_dir / "plans.json").write_text(json.dumps(facts, indent=2))
    return {**plans, "onnx": onnx, "facts": facts}
