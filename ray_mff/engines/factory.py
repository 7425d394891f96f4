"""Engine factory: :func:`make_engine` builds the engine that :mod:`ray_mff.engines.choice` picked.

ONNX graphs are exported on first use into the cache (:func:`ray_mff.export.cached_onnx`) and
TensorRT plans built on first use into theirs (:func:`ray_mff.engines.tensorrt_build.cached_engine`).
"""
from __future__ import annotations

import logging

from ray_mff.engines.base import check_precision, describe_engine
from ray_mff.engines.choice import EngineChoice, EngineEnvironment, probe_environment, select_engine
from ray_mff.errors import EngineUnavailableError

log = logging.getLogger("ray_mff.engines")


def _torch_engine(model, precision: str, device: str, compile_mode: str | None):
    from ray_mff.engines.torch_engine import TorchEngine

    return TorchEngine(model, device=device, precision=precision, compile_mode=compile_mode)


def _onnx_engine(model, name: str, precision: str, providers, threads):
    from ray_mff.engines.onnx_engine import OnnxEngine
    from ray_mff.export import cached_onnx

    paths = cached_onnx(model, precision, name=name)
    return OnnxEngine(paths["encoder"], paths["decider"], precision=precision, stride=int(getattr(model, "stride", 1)),
                      providers=providers, threads=threads, model_name=name,
                      feature_channels=int(paths["feature_channels"]),
                      feature_downsample=int(paths.get("feature_downsample", 1)))


def _tensorrt_engine(model, name: str, precision: str, max_tile: int, device: str, max_batch: int = 4):
    import tensorrt as trt

    from ray_mff.engines.tensorrt_build import ShapeProfile, cached_engine, select_build_mode
    from ray_mff.engines.tensorrt_engine import TensorRTEngine
    from ray_mff.export import cached_onnx

    # TensorRT 10 lowers the fp32 graph with BuilderFlag.FP16; TensorRT 11 needs the fp16 graph
    paths = cached_onnx(model, select_build_mode(trt, precision).onnx_precision, name=name)
    profile = ShapeProfile(max_hw=(max_tile, max_tile), opt_batch=min(2, max_batch), max_batch=max_batch)
    plans = {g: cached_engine(paths[g], precision=precision, profile=profile,
                              feature_channels=int(paths["feature_channels"]),
                              feature_downsample=int(paths.get("feature_downsample", 1))) for g in ("encoder", "decider")}
    index = int(device.split(":")[1]) if ":" in device else 0
    return TensorRTEngine(plans["encoder"], plans["decider"], precision=precision,
                          stride=int(getattr(model, "stride", 1)), model_name=name, device=index)


def make_engine(model_name: str, *, engine: str = "auto", precision: str = "fp32", weights="default",
                model=None, threads: int | None = None, max_tile: int = 2048, env: EngineEnvironment | None = None,
                device: str | None = None, compile_mode: str | None = None, max_batch: int = 4):
    """Build the engine that runs ``model_name`` (weights resolved by :func:`ray_mff.models.get_model`).

    engine:    ``auto`` | ``torch`` | ``onnx`` | ``tensorrt`` (see :mod:`ray_mff.engines.choice`).
    precision: ``fp32`` | ``fp16``.
    device:    None (a CUDA device when one is visible), ``"cpu"`` or ``"cuda[:N]"``.
    model:     an already built ``nn.Module`` to run instead of ``get_model(model_name, weights)``
               (tests use one random-init model for every engine).
    max_tile:  largest image side a TensorRT engine's optimisation profile accepts (bigger images
               are tiled by :class:`ray_mff.tiling.TiledFuser`).
    max_batch: the largest batch (images per encode call) a TensorRT profile accepts.
    compile_mode: torch on CUDA only: ``None`` (eager), ``"default"`` or ``"reduce-overhead"``
               (``torch.compile``; the latter replays CUDA graphs). Also ``$RAY_MFF_TORCH_COMPILE``.

    In ``auto`` mode a failing TensorRT build falls back to torch on CUDA (or ONNX Runtime), and a
    failing export to torch, each with a warning; a named engine raises instead.
    """
    check_precision(precision)
    choice = select_engine(engine, env or probe_environment(), device)
    if model is None:
        from ray_mff.models import get_model

        model = get_model(model_name, weights=weights)
    model = model.eval()
    built = None
    if choice.kind == "tensorrt":
        try:
            built = _tensorrt_engine(model, model_name, precision, max_tile, choice.device, max_batch)
        except Exception as err:  # noqa: BLE001
            if engine != "auto":
                raise
            choice = EngineChoice("torch", None, choice.fallbacks + [f"TensorRT engine build failed: {err}"],
                                  device=choice.device)
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
        built = _torch_engine(model, precision, choice.device, compile_mode)
    # how to read decide's output (ray_mff.engines.base): decision map, focus map or fused luminance
    built.output = getattr(model, "output", "decision")
    built.postprocess = getattr(model, "postprocess", None)
    desc = describe_engine(built)
    reasons = ([choice.why] if choice.why else []) + choice.fallbacks
    extra = f" ({'; '.join(reasons)})" if reasons else ""
    providers = f" providers={','.join(desc['providers'])}" if desc.get("providers") else ""
    log.info(
        "engine %s: %s %s on %s%s%s", engine, desc["engine"], desc["precision"], desc["device"], providers, extra)
    return built
