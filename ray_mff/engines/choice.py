"""Engine choice: what this process can run (:func:`probe_environment`) and which engine a request
means here (:func:`select_engine`). Pure logic, apart from the factory that builds the engine
(:mod:`ray_mff.engines.factory`), so the driver can check a request before starting any actor.

``auto`` picks, in order, and says why each better option was not taken:

1. **TensorRT** when ``tensorrt`` imports and torch sees a CUDA device (fastest: fused fp16 kernels);
2. **torch on CUDA** when torch sees a CUDA device (the same eager graphs as the CPU reference, in
   fp16/fp32 with cuDNN autotune: the GPU engine that runs wherever a CUDA torch is installed);
3. **ONNX Runtime with its CUDA provider** when onnxruntime-gpu is installed but torch is a CPU-only
   build (torch cannot see the GPU, ONNX Runtime may);
4. **ONNX Runtime on CPU** otherwise; torch on CPU if ONNX Runtime does not import.

A named engine that cannot run here raises :class:`~ray_mff.errors.EngineUnavailableError` whose
message is one line naming what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ray_mff.engines.base import ENGINE_CHOICES
from ray_mff.errors import EngineUnavailableError

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass
class EngineEnvironment:
    """What this process can run, with the reason for each missing piece (None = present)."""

    tensorrt_version: str | None = None
    tensorrt_missing: str | None = "the 'tensorrt' Python package is not installed (pip install 'ray-mff[gpu]')"
    cuda_device: str | None = None
    cuda_missing: str | None = "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    ort_providers: list[str] = field(default_factory=list)
    ort_missing: str | None = None
    #: set when onnxruntime-gpu is installed but its CUDA provider is gone (see :func:`ort_gpu_conflict`)
    ort_conflict: str | None = None


def ort_gpu_conflict() -> str | None:
    """A one-line warning when the ``onnxruntime-gpu`` distribution is installed but the imported
    ``onnxruntime`` has no CUDA provider: both ``onnxruntime`` and ``onnxruntime-gpu`` install the
    same ``onnxruntime`` package folder, and whichever was installed last wins, so installing the
    CPU wheel after the GPU one silently removes CUDA. None when there is no such conflict."""
    from importlib import metadata

    try:
        metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        return None
    try:
        import onnxruntime as ort

        if CUDA_PROVIDER in ort.get_available_providers():
            return None
    except Exception:  # noqa: BLE001 - a broken import is reported by probe_environment
        return None
    cpu = ""
    try:
        cpu = f" and onnxruntime {metadata.version('onnxruntime')}"
    except metadata.PackageNotFoundError:
        pass
    return (f"onnxruntime-gpu {metadata.version('onnxruntime-gpu')}{cpu} are both installed and the CPU build "
            "won, so ONNX Runtime has no CUDAExecutionProvider: pip uninstall -y onnxruntime onnxruntime-gpu && "
            "pip install onnxruntime-gpu")


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
    env.ort_conflict = ort_gpu_conflict()
    return env


@dataclass
class EngineChoice:
    """The engine to build: ``kind`` in torch/onnx/tensorrt, the torch ``device``, ONNX Runtime
    ``providers``, and the reasons better options were skipped (for the log)."""

    kind: str
    providers: list[str] | None = None
    fallbacks: list[str] = field(default_factory=list)
    device: str = "cpu"
    #: why this engine (auto only), e.g. "TensorRT 10.9.0 imports and torch sees NVIDIA A10G"
    why: str = ""

    def explain(self) -> str:
        if self.kind == "onnx":
            what = f"onnxruntime ({', '.join(self.providers or ['CPU'])})"
        elif self.kind == "torch":
            what = f"torch on {self.device}"
        else:
            what = self.kind
        return what + "".join("; " + r for r in ([self.why] if self.why else []) + self.fallbacks)


def select_engine(requested: str, env: EngineEnvironment, device: str | None = None) -> EngineChoice:
    """Pure selection logic: ``requested`` (auto/torch/onnx/tensorrt) + environment -> choice.

    device: ``None`` (a CUDA device when one is visible), ``"cpu"`` (CPU engines only) or
    ``"cuda"``/``"cuda:N"`` (a GPU engine or an error).
    Raises EngineUnavailableError (one line) when a named engine cannot run here.
    """
    if requested not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {requested!r}")
    want_cpu = device is not None and str(device).startswith("cpu")
    want_cuda = device is not None and str(device).startswith("cuda")
    cuda_ok = env.cuda_device is not None and not want_cpu
    cuda_dev = str(device) if want_cuda and ":" in str(device) else "cuda:0"
    if want_cuda and env.cuda_device is None:
        raise EngineUnavailableError(requested if requested != "auto" else "cuda", f"device {device}: {env.cuda_missing}")
    ort_cuda = CUDA_PROVIDER in env.ort_providers
    # a CPU-only torch cannot tell whether a GPU is there; onnxruntime-gpu can use it regardless, and
    # its session reports (and the engine logs) a fall back to CPU if there is none
    ort_cuda_ok = ort_cuda and not want_cpu and (cuda_ok or "CPU-only" in (env.cuda_missing or ""))
    no_ort_cuda = env.ort_conflict or "this onnxruntime has no CUDAExecutionProvider (install ray-mff[gpu])"
    if requested == "torch":
        return EngineChoice("torch", device=cuda_dev if cuda_ok else "cpu")
    if requested == "tensorrt":
        if env.tensorrt_missing:
            raise EngineUnavailableError("tensorrt", env.tensorrt_missing)
        if not cuda_ok:
            raise EngineUnavailableError("tensorrt", f"TensorRT {env.tensorrt_version} imports but "
                                         f"{env.cuda_missing if not want_cpu else 'device cpu was asked for'}")
        return EngineChoice("tensorrt", device=cuda_dev)
    if requested == "onnx":
        if env.ort_missing:
            raise EngineUnavailableError("onnxruntime", env.ort_missing)
        if want_cuda and not ort_cuda:
            raise EngineUnavailableError("onnxruntime", f"device {device}: {no_ort_cuda}")
        providers = [CUDA_PROVIDER, CPU_PROVIDER] if ort_cuda_ok else [CPU_PROVIDER]
        return EngineChoice("onnx", providers, device=cuda_dev if ort_cuda_ok else "cpu")
    # auto
    fallbacks = []
    if want_cpu:
        fallbacks.append("device cpu asked for")
    elif env.tensorrt_missing:
        fallbacks.append(f"not TensorRT: {env.tensorrt_missing}")
    elif not cuda_ok:
        fallbacks.append(f"not TensorRT: {env.cuda_missing}")
    else:
        return EngineChoice("tensorrt", device=cuda_dev,
                            why=f"TensorRT {env.tensorrt_version} imports and torch sees {env.cuda_device}")
    if cuda_ok:
        return EngineChoice("torch", fallbacks=fallbacks, device=cuda_dev, why=f"torch sees {env.cuda_device}")
    if not want_cpu:
        fallbacks.append(f"not torch on CUDA: {env.cuda_missing}")
    if env.ort_missing:
        fallbacks.append(f"not ONNX Runtime: {env.ort_missing}")
        return EngineChoice("torch", fallbacks=fallbacks)
    if ort_cuda_ok:
        return EngineChoice("onnx", [CUDA_PROVIDER, CPU_PROVIDER], fallbacks, device=cuda_dev)
    if not want_cpu:
        fallbacks.append("not ONNX Runtime CUDA: " + (no_ort_cuda if not ort_cuda else str(env.cuda_missing)))
    return EngineChoice("onnx", [CPU_PROVIDER], fallbacks)


def require_tensorrt() -> None:
    """Raise EngineUnavailableError (one line) unless TensorRT and a CUDA device are usable here."""
    select_engine("tensorrt", probe_environment())


def require_engine(engine: str, device: str | None = None) -> EngineChoice:
    """What ``engine`` means in this process, or EngineUnavailableError (one line): the check a
    driver runs before it starts actors."""
    return select_engine(engine, probe_environment(), device)
