"""Fusion engines: one small protocol (:mod:`ray_mff.engines.base`), several back ends.

An engine runs a decision model's two sub-graphs on numpy arrays:
``encode(y (B,1,H,W) float32) -> features`` and ``decide(fa, fb, ya, yb) -> D (B,1,H,W)``,
and reports ``name``, ``precision``, ``device`` and ``describe()``.

- ``torch``    (:mod:`.torch_engine`): eager PyTorch, the numerical reference;
- ``onnx``     (:mod:`.onnx_engine`): ONNX Runtime, CPU provider (CUDA provider when present);
- ``tensorrt`` (:mod:`.tensorrt_engine`, built by :mod:`.tensorrt_build`): NVIDIA GPUs.

``make_engine(engine="auto")`` picks, in order: TensorRT when ``tensorrt`` imports and a CUDA
device is visible; else ONNX Runtime with its CUDA provider when that build is installed and a
device is visible; else ONNX Runtime on CPU. It logs the choice and why each better option was
not taken. Asking for an engine by name that cannot run here raises
:class:`~ray_mff.errors.EngineUnavailableError` whose message is one line naming what is missing.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

from ray_mff.engines.base import ENGINE_CHOICES, Engine, check_precision, describe_engine
from ray_mff.errors import EngineUnavailableError

__all__ = ["make_engine", "select_engine", "probe_environment", "EngineEnvironment", "EngineChoice",
           "require_tensorrt", "Engine", "describe_engine", "ENGINE_CHOICES"]

log = logging.getLogger("ray_mff.engines")


@dataclass
class EngineEnvironment:
    """What this process can run, with the reason for each missing piece (None = present)."""

    tensorrt_version: str | None = None
    tensorrt_missing: str | None = "the 'tensorrt' Python package is not installed (pip install 'ray-mff[tensorrt]')"
    cuda_device: str | None = None
    cuda_missing: str | None = "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    ort_providers: list[str] = field(default_factory=list)
    ort_missing: str | None = None


def probe_environment() -> EngineEnvironment:
    """Import ``tensorrt``/``onnxruntime`` and ask torch for a CUDA device; never raises."""
    env = EngineEnvironment()
    try:
        import tensorrt as trt  # noqa: F401

        env.tensorrt_version = getattr(trt, "__version__", "unknown")
        env.tensorrt_missing = None
    except ImportError as err:
        if getattr(err, "name", None) not in (None, "tensorrt"):  # installed but broken (libnvinfer missing...)
            env.tensorrt_missing = f"'tensorrt' is installed but does not import: {err}"
    except Exception as err:  # noqa: BLE001 - a broken install must not stop the fallback
        env.tensorrt_missing = f"'tensorrt' is installed but does not import: {err}"
    try:
        import torch

        if torch.cuda.is_available():
            env.cuda_device = torch.cuda.get_device_name(0)
            env.cuda_missing = None
        elif torch.version.cuda is None:
            env.cuda_missing = "torch is a CPU-only build (torch.version.cuda is None), so no CUDA device is usable"
    except Exception as err:  # noqa: BLE001
        env.cuda_missing = f"torch cannot query CUDA: {err}"
    try:
        import onnxruntime as ort

        env.ort_providers = list(ort.get_available_providers())
    except Exception as err:  # noqa: BLE001
        env.ort_missing = f"onnxruntime does not import: {err}"
    return env


@dataclass
class EngineChoice:
    """The engine to build: ``kind`` in torch/onnx/tensorrt, ONNX Runtime ``providers``, and the
    reasons better options were skipped (for the log)."""

    kind: str
    providers: list[str] | None = None
    fallbacks: list[str] = field(default_factory=list)

    def explain(self) -> str:
        what = self.kind if self.kind != "onnx" else f"onnxruntime ({', '.join(self.providers or ['CPU'])})"
        return what + ("" if not self.fallbacks else "; " + "; ".join(self.fallbacks))


def select_engine(requested: str, env: EngineEnvironment) -> EngineChoice:
    """Pure selection logic: ``requested`` (auto/torch/onnx/tensorrt) + environment -> choice.

    Raises EngineUnavailableError (one line) when a named engine cannot run here.
    """
    if requested not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {requested!r}")
    cuda_ok = env.cuda_device is not None
    ort_cuda = "CUDAExecutionProvider" in env.ort_providers
    # a CPU-only torch cannot tell whether a GPU is there; onnxruntime-gpu can use it regardless, and
    # its session reports (and the engine logs) a fall back to CPU if there is none
    ort_cuda_ok = ort_cuda and (cuda_ok or "CPU-only" in (env.cuda_missing or ""))
    if requested == "torch":
        return EngineChoice("torch")
    if requested == "tensorrt":
        if env.tensorrt_missing:
            raise EngineUnavailableError("tensorrt", env.tensorrt_missing)
        if not cuda_ok:
            raise EngineUnavailableError("tensorrt", f"TensorRT {env.tensorrt_version} imports but {env.cuda_missing}")
        return EngineChoice("tensorrt")
    if requested == "onnx":
        if env.ort_missing:
            raise EngineUnavailableError("onnxruntime", env.ort_missing)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_cuda_ok else ["CPUExecutionProvider"]
        return EngineChoice("onnx", providers)
    # auto
    fallbacks = []
    if env.tensorrt_missing:
        fallbacks.append(f"not TensorRT: {env.tensorrt_missing}")
    elif not cuda_ok:
        fallbacks.append(f"not TensorRT: {env.cuda_missing}")
    else:
        return EngineChoice("tensorrt")
    if env.ort_missing:
        fallbacks.append(f"not ONNX Runtime: {env.ort_missing}")
        return EngineChoice("torch", fallbacks=fallbacks)
    if ort_cuda_ok:
        return EngineChoice("onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"], fallbacks)
    fallbacks.append("not ONNX Runtime CUDA: " + (
        "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)" if not ort_cuda else env.cuda_missing))
    return EngineChoice("onnx", ["CPUExecutionProvider"], fallbacks)


def require_tensorrt() -> None:
    """Raise EngineUnavailableError (one line) unless TensorRT and a CUDA device are usable here."""
    select_engine("tensorrt", probe_environment())


def _torch_engine(model, precision: str):
    from ray_mff.engines.torch_engine import TorchEngine

    params = inspect.signature(TorchEngine).parameters
    if "precision" in params:
        return TorchEngine(model, precision=precision)
    if precision != "fp32":
        raise EngineUnavailableError("torch", f"the torch engine runs fp32 only (asked for {precision})")
    return TorchEngine(model)


def _onnx_engine(model, name: str, precision: str, providers, threads):
    from ray_mff.engines.onnx_engine import OnnxEngine
    from ray_mff.export import cached_onnx

    paths = cached_onnx(model, precision, name=name)
    return OnnxEngine(paths["encoder"], paths["decider"], precision=precision, stride=int(getattr(model, "stride", 1)),
                      providers=providers, threads=threads, model_name=name)


def _tensorrt_engine(model, name: str, precision: str, max_tile: int):
    import tensorrt as trt

    from ray_mff.engines.tensorrt_build import ShapeProfile, cached_engine, select_build_mode
    from ray_mff.engines.tensorrt_engine import TensorRTEngine
    from ray_mff.export import cached_onnx

    # TensorRT 10 lowers the fp32 graph with BuilderFlag.FP16; TensorRT 11 needs the fp16 graph
    paths = cached_onnx(model, select_build_mode(trt, precision).onnx_precision, name=name)
    profile = ShapeProfile(max_hw=(max_tile, max_tile))
    plans = {g: cached_engine(paths[g], precision=precision, profile=profile,
                              feature_channels=int(paths["feature_channels"]),
                              feature_downsample=int(paths.get("feature_downsample", 1))) for g in ("encoder", "decider")}
    return TensorRTEngine(plans["encoder"], plans["decider"], precision=precision,
                          stride=int(getattr(model, "stride", 1)), model_name=name)


def make_engine(model_name: str, *, engine: str = "auto", precision: str = "fp32", weights="default",
                model=None, threads: int | None = None, max_tile: int = 2048, env: EngineEnvironment | None = None):
    """Build the engine that runs ``model_name`` (weights resolved by :func:`ray_mff.models.get_model`).

    engine:    ``auto`` | ``torch`` | ``onnx`` | ``tensorrt`` (see the module docstring for ``auto``).
    precision: ``fp32`` | ``fp16``.
    model:     an already built ``nn.Module`` to run instead of ``get_model(model_name, weights)``
               (tests use one random-init model for every engine).
    max_tile:  largest image side a TensorRT engine's optimisation profile accepts (bigger images
               are tiled by :class:`ray_mff.tiling.TiledFuser`).

    ONNX graphs are exported on first use into the cache (:func:`ray_mff.export.cached_onnx`).
    In ``auto`` mode a failing TensorRT build falls back to ONNX Runtime, and a failing export
    to torch, each with a warning; a named engine raises instead.
    """
    check_precision(precision)
    choice = select_engine(engine, env or probe_environment())
    if model is None:
        from ray_mff.models import get_model

        model = get_model(model_name, weights=weights)
    model = model.eval()
    built = None
    if choice.kind == "tensorrt":
        try:
            built = _tensorrt_engine(model, model_name, precision, max_tile)
        except Exception as err:  # noqa: BLE001
            if engine != "auto":
                raise
            choice = EngineChoice("onnx", None, choice.fallbacks + [f"TensorRT engine build failed: {err}"])
    if built is None and choice.kind == "onnx":
        try:
            built = _onnx_engine(model, model_name, precision, choice.providers, threads)
        except EngineUnavailableError:
            raise
        except Exception as err:  # noqa: BLE001
            if engine != "auto":
                raise
            choice = EngineChoice("torch", None, choice.fallbacks + [f"ONNX export/session failed: {err}"])
    if built is None:
        built = _torch_engine(model, precision)
    # how to read decide's output (ray_mff.engines.base): decision map, focus map or fused luminance
    built.output = getattr(model, "output", "decision")
    built.postprocess = getattr(model, "postprocess", None)
    desc = describe_engine(built)
    extra = f" ({'; '.join(choice.fallbacks)})" if choice.fallbacks else ""
    providers = f" providers={','.join(desc['providers'])}" if desc.get("providers") else ""
    log.info(
        "engine %s: %s %s on %s%s%s", engine, desc["engine"], desc["precision"], desc["device"], providers, extra)
    return built
