"""Engines: selection rules, ONNX Runtime vs torch, TensorRT build logic with a fake ``trt``."""
from __future__ import annotations

import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_mff.engines import EngineEnvironment, make_engine, select_engine
from ray_mff.engines.base import Engine
from ray_mff.engines.torch_engine import TorchEngine
from ray_mff.errors import EngineUnavailableError
from ray_mff.models import get_model

NO_TRT = "the 'tensorrt' Python package is not installed (pip install 'ray-mff[gpu]')"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RAY_MFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_model("cascade", weights=None)


def _env(trt=False, cuda=False, ort_cuda=False):
    env = EngineEnvironment(ort_providers=["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if ort_cuda else []))
    if trt:
        env.tensorrt_version, env.tensorrt_missing = "10.9.0", None
    if cuda:
        env.cuda_device, env.cuda_missing = "NVIDIA A10G", None
    return env


# --------------------------------------------------------------------------- selection rules


def test_auto_prefers_tensorrt_with_cuda():
    c = select_engine("auto", _env(trt=True, cuda=True, ort_cuda=True))
    assert c.kind == "tensorrt" and "TensorRT 10.9.0 imports and torch sees NVIDIA A10G" in c.explain()


def test_torch_engine_precision_and_layout_options(model):
    y = np.random.default_rng(0).random((2, 1, 40, 36), dtype=np.float32)
    ref = TorchEngine(model)
    f = ref.encode(y)
    d = ref.decide(f[:1], f[1:], y[:1], y[1:])
    import copy

    nhwc = TorchEngine(copy.deepcopy(model), channels_last=True)  # the CUDA layout, here on the CPU
    fn = nhwc.encode(y)
    assert np.abs(nhwc.decide(fn[:1], fn[1:], y[:1], y[1:]) - d).max() < 1e-4
    with pytest.raises(EngineUnavailableError, match="CUDA only"):
        TorchEngine(model, precision="fp16")
    with pytest.raises(ValueError, match="compile_mode"):
        TorchEngine(model, compile_mode="fastest")


def test_auto_falls_back_to_torch_cuda_then_onnxruntime_and_says_why():
    c = select_engine("auto", _env(trt=False, cuda=True, ort_cuda=True))
    assert (c.kind, c.device) == ("torch", "cuda:0")
    assert "not TensorRT" in c.explain() and "not installed" in c.explain() and "torch on cuda:0" in c.explain()
    c = select_engine("auto", _env(trt=True, cuda=False, ort_cuda=True))
    assert c.providers == ["CPUExecutionProvider"]
    assert "no CUDA device" in c.explain() and "not torch on CUDA" in c.explain()
    c = select_engine("auto", _env())
    assert (c.kind, c.providers, c.device) == ("onnx", ["CPUExecutionProvider"], "cpu")
    assert "ray-mff[gpu]" in c.explain()
    # CPU-only torch + onnxruntime-gpu: let ONNX Runtime try CUDA (its session reports the truth)
    env = _env(ort_cuda=True)
    env.cuda_missing = "torch is a CPU-only build (torch.version.cuda is None), so no CUDA device is usable"
    assert select_engine("auto", env).providers[0] == "CUDAExecutionProvider"


def test_device_cpu_keeps_every_engine_on_the_cpu_and_device_cuda_needs_one():
    gpu = _env(trt=True, cuda=True, ort_cuda=True)
    c = select_engine("auto", gpu, device="cpu")
    assert (c.kind, c.providers, c.device) == ("onnx", ["CPUExecutionProvider"], "cpu")
    assert "device cpu" in c.explain()
    assert select_engine("torch", gpu, device="cpu").device == "cpu"
    assert select_engine("torch", gpu).device == "cuda:0"
    assert select_engine("torch", gpu, device="cuda:1").device == "cuda:1"
    assert select_engine("onnx", gpu, device="cpu").providers == ["CPUExecutionProvider"]
    with pytest.raises(EngineUnavailableError, match="device cpu"):
        select_engine("tensorrt", gpu, device="cpu")
    with pytest.raises(EngineUnavailableError, match="no CUDA device"):
        select_engine("torch", _env(), device="cuda")


def test_a_vanished_cuda_provider_is_named_not_silent():
    env = _env(cuda=True)
    env.ort_conflict = "onnxruntime-gpu 1.26.0 and onnxruntime 1.31.1 are both installed and the CPU build won"
    with pytest.raises(EngineUnavailableError, match="both installed"):
        select_engine("onnx", env, device="cuda")
    env.cuda_device, env.cuda_missing = None, "no CUDA device is visible"
    assert "both installed" in select_engine("auto", env).explain()


def test_ort_gpu_conflict_reads_the_installed_distributions(monkeypatch):
    from importlib import metadata

    from ray_mff.engines import choice

    versions = {"onnxruntime-gpu": "1.26.0", "onnxruntime": "1.31.1"}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(metadata, "version", version)
    msg = choice.ort_gpu_conflict()  # this venv's onnxruntime is the CPU build: the GPU one lost
    assert msg and "onnxruntime-gpu 1.26.0" in msg and "pip install onnxruntime-gpu" in msg
    del versions["onnxruntime-gpu"]
    assert choice.ort_gpu_conflict() is None


def test_named_tensorrt_without_tensorrt_or_cuda_raises_one_line():
    with pytest.raises(EngineUnavailableError) as e:
        select_engine("tensorrt", _env(cuda=True))
    assert str(e.value) == f"tensorrt: {NO_TRT}" and "\n" not in str(e.value)
    with pytest.raises(EngineUnavailableError, match="no CUDA device"):
        select_engine("tensorrt", _env(trt=True))
    assert select_engine("torch", _env()).kind == "torch"
    with pytest.raises(ValueError):
        select_engine("openvino", _env())


def test_make_engine_auto_here_runs_onnxruntime_cpu_and_logs_the_fallback(model, caplog):
    with caplog.at_level(logging.INFO, logger="ray_mff.engines"):
        eng = make_engine("cascade", engine="auto", model=model, env=_env())
    assert isinstance(eng, Engine)
    assert eng.name == "onnxruntime-cpu" and eng.precision == "fp32" and eng.device == "cpu"
    assert eng.describe()["providers"] == ["CPUExecutionProvider"]  # what the session reports
    text = caplog.text
    assert "onnxruntime-cpu" in text and "not TensorRT" in text


def test_make_engine_tensorrt_fails_before_loading_weights():
    # no model, no weights: the check comes first, so the message is about TensorRT only
    with pytest.raises(EngineUnavailableError, match="^tensorrt: "):
        make_engine("cascade", engine="tensorrt", weights="/nonexistent.safetensors", env=_env())


def test_cli_fuse_engine_tensorrt_without_tensorrt_is_one_line_exit_2(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    pytest.importorskip("ray_mff.fusion.model_fuser", reason="ModelFuser (issue 3) has not landed yet")
    from ray_mff import io
    from ray_mff.cli import main

    stack = tmp_path / "in" / "s1"
    stack.mkdir(parents=True)
    img = (np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)
    io.write_image(str(stack / "a.png"), img)
    io.write_image(str(stack / "b.png"), img)
    code = main(["fuse", str(tmp_path / "in"), str(tmp_path / "out"), "--method", "cascade", "--engine", "tensorrt"])
    err = [line for line in capsys.readouterr().err.splitlines() if "tensorrt" in line.lower()]
    assert code == 2
    assert err == [f"ray-mff: tensorrt: {NO_TRT}"]


# --------------------------------------------------------------------------- ONNX Runtime vs torch


def test_onnx_engine_matches_torch_fp32(model):
    eng = make_engine("cascade", engine="onnx", model=model, threads=1)
    y = np.random.default_rng(0).random((2, 1, 61, 75), dtype=np.float32)
    f = eng.encode(y)
    d = eng.decide(f[:1], f[1:], y[:1], y[1:])
    ref = TorchEngine(model)  # the reference: pads to the stride and crops back like every engine
    ft = ref.encode(y)
    dt = ref.decide(ft[:1], ft[1:], y[:1], y[1:])
    assert d.shape == (1, 1, 61, 75) and d.dtype == np.float32
    assert np.abs(f - ft).max() < 1e-4
    assert np.abs(d - dt).max() < 1e-4


def test_onnx_engine_fp16(model):
    eng = make_engine("cascade", engine="onnx", precision="fp16", model=model, threads=1)
    assert eng.precision == "fp16" and eng.describe()["precision"] == "fp16"
    y = np.random.default_rng(0).random((2, 1, 40, 52), dtype=np.float32)
    f = eng.encode(y)
    assert f.dtype == np.float32  # fp16 inside, float32 at the graph boundary
    ref = TorchEngine(model)  # the reference: pads to the stride and crops back like every engine
    ft = ref.encode(y)
    dt = ref.decide(ft[:1], ft[1:], y[:1], y[1:])
    assert np.abs(eng.decide(f[:1], f[1:], y[:1], y[1:]) - dt).max() < 2e-2


class StridedStandIn(nn.Module):
    """A stand-in decision model that only works on multiples of 4 (pool + upsample)."""

    stride = 4
    registry_name = "strided"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def encode(self, y):
        x = F.avg_pool2d(self.conv(y), 4)
        return F.interpolate(x, scale_factor=4.0, mode="nearest")

    def decide(self, fa, fb, ya, yb):
        return torch.sigmoid((fa - fb).mean(dim=1, keepdim=True) + 0 * (ya - yb))


def test_onnx_engine_pads_to_stride_and_crops_back(tmp_path):
    from ray_mff.engines.base import pad_to_multiple
    from ray_mff.engines.onnx_engine import OnnxEngine
    from ray_mff.export import export_model

    torch.manual_seed(1)
    net = StridedStandIn().eval()
    paths = export_model(net, tmp_path, "fp32")
    assert paths["verification"]["real"]["decision_max_abs"] < 1e-5
    eng = OnnxEngine(paths["encoder"], paths["decider"], stride=net.stride, threads=1)
    y = np.random.default_rng(2).random((2, 1, 30, 37), dtype=np.float32)
    f = eng.encode(y)
    assert f.shape[-2:] == (32, 40)
    d = eng.decide(f[:1], f[1:], y[:1], y[1:])
    assert d.shape == (1, 1, 30, 37)
    yp = torch.from_numpy(pad_to_multiple(y, 4))
    with torch.no_grad():
        ft = net.encode(yp)
        dt = net.decide(ft[:1], ft[1:], yp[:1], yp[1:])[..., :30, :37].numpy()
    assert np.abs(d - dt).max() < 1e-5


def test_onnx_sessions_keep_an_arena_only_for_small_inputs_and_at_most_two(model, monkeypatch):
    import ray_mff.engines.onnx_engine as oe

    eng = make_engine("cascade", engine="onnx", model=model, threads=1)
    enc = eng._enc
    monkeypatch.setattr(enc, "max_pixels", 2 * 48 * 48)  # an arena for up to two 48 x 48 images
    rng = np.random.default_rng(0)
    for b, side in [(1, 32), (2, 48), (1, 48), (1, 80)]:
        eng.encode(rng.random((b, 1, side, side), dtype=np.float32))
    # (1, 80) is too big for an arena; of the three small shapes only the two most recent keep one
    assert enc.arenas() == [(2, 1, 48, 48), (1, 1, 48, 48)]
    assert enc.shapes() == [(2, 1, 48, 48), (1, 1, 48, 48), (1, 1, 80, 80)] and oe.ARENA_SESSIONS == 2
    with eng.without_arena():
        assert enc.arenas() == [] and enc.max_pixels == 0
        f = eng.encode(rng.random((1, 1, 32, 32), dtype=np.float32))
        assert enc.arenas() == []
    assert enc.max_pixels == 2 * 48 * 48  # restored
    # same numbers with and without an arena
    y = rng.random((1, 1, 32, 32), dtype=np.float32)
    with eng.without_arena():
        f_plain = eng.encode(y)
    f_arena = eng.encode(y)  # a session of its own: the one made without an arena is not reused
    assert (1, 1, 32, 32) in enc.arenas() and f.shape == f_arena.shape
    assert np.array_equal(f_plain, f_arena)


def test_tiled_fusion_runs_onnxruntime_without_arenas(model, monkeypatch):
    from ray_mff.fusion.model_fuser import ModelFuser
    from ray_mff.tiling import TiledFuser

    eng = make_engine("cascade", engine="onnx", model=model, threads=1)
    seen = []
    encode = eng.encode

    def spy(y):
        seen.append((eng._enc.max_pixels, len(eng._enc.arenas())))
        return encode(y)

    monkeypatch.setattr(eng, "encode", spy)
    rng = np.random.default_rng(1)
    small = [rng.random((64, 64), dtype=np.float32) for _ in range(2)]
    ModelFuser(eng).fuse(small)  # untiled: leaves an arena session behind
    assert eng._enc.arenas()
    big = [rng.random((700, 300), dtype=np.float32) for _ in range(2)]
    TiledFuser(ModelFuser(eng), tile_size=512, untiled_max_side=512).fuse(big)
    assert len(seen) > 2 and all(s == (0, 0) for s in seen[1:])  # every tile: no arena, none kept
    assert eng._enc.max_pixels > 0


def _compare_lytro(shared_data, pair_ids, fp16_pairs):
    """Max |D_ort - D_torch| and max fused 8-bit difference per precision over Lytro pairs."""
    from ray_mff import io
    from ray_mff.fusion.decision import fuse_with_weights
    from ray_mff.fusion.luminance import luminance
    from ray_mff.models import default_weights_path

    weights = "default" if default_weights_path("cascade").is_file() else None
    torch.manual_seed(0)
    net = get_model("cascade", weights=weights)
    engines = {p: make_engine("cascade", engine="onnx", precision=p, model=net) for p in ("fp32", "fp16")}
    reference = TorchEngine(net)
    worst = {"fp32": [0.0, 0], "fp16": [0.0, 0]}
    for i, pid in enumerate(pair_ids):
        a_path = Path(shared_data, "lytro", f"lytro_{pid:02d}_A.png")
        a, b = io.read_image(str(a_path)), io.read_image(str(a_path).replace("_A.", "_B."))
        y = np.stack([luminance(a), luminance(b)])[:, None]
        ft = reference.encode(y)
        dt = reference.decide(ft[:1], ft[1:], y[:1], y[1:])[0, 0]
        ref = fuse_with_weights([a, b], np.stack([dt, 1 - dt], axis=-1))
        for p, eng in engines.items():
            if p == "fp16" and i >= fp16_pairs:
                continue
            f = eng.encode(y)
            d = eng.decide(f[:1], f[1:], y[:1], y[1:])[0, 0]
            fused = fuse_with_weights([a, b], np.stack([d, 1 - d], axis=-1))
            worst[p][0] = max(worst[p][0], float(np.abs(d - dt).max()))
            worst[p][1] = max(worst[p][1], int(np.abs(fused.astype(int) - ref.astype(int)).max()))
    print(f"Lytro ORT vs torch ({'shipped' if weights else 'random'} weights), pairs {pair_ids}: {worst}")
    # fp32: decisions within 1e-3, fused 8-bit within 1 grey level (issue 4 acceptance);
    # fp16 (documented tolerance): decisions within 5e-2, fused within 3 grey levels.
    assert worst["fp32"][0] <= 1e-3 and worst["fp32"][1] <= 1
    assert worst["fp16"][0] <= 5e-2 and worst["fp16"][1] <= 3


def test_lytro_onnxruntime_vs_torch_sample(shared_data):
    _compare_lytro(shared_data, [4, 11], fp16_pairs=1)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_lytro_onnxruntime_vs_torch_all_20_pairs(shared_data):
    """Acceptance on all 20 pairs (minutes on a busy 2-core machine: marked slow)."""
    _compare_lytro(shared_data, list(range(1, 21)), fp16_pairs=5)


# --------------------------------------------------------------------------- TensorRT (fake trt)


class FakeTRT:
    """Just enough of the ``tensorrt`` module to record what the build code calls."""

    def __init__(self, version="10.9.0", fp16_flag=True):
        self.__version__ = version
        self.calls = []
        flags = {"TF32": "TF32"} | ({"FP16": "FP16"} if fp16_flag else {})
        self.BuilderFlag = types.SimpleNamespace(**flags)
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.PreviewFeature = types.SimpleNamespace(RUNTIME_ACTIVATION_RESIZE_10_10="RESIZE_10_10")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=None: None})
        fake = self

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))
                self.inputs = []
                self.num_inputs = 0

            def get_input(self, i):
                return types.SimpleNamespace(name=self.inputs[i])

        class Parser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0

            def parse(self, data):
                import onnx

                names = [i.name for i in onnx.load_model_from_string(data).graph.input]
                self.network.inputs, self.network.num_inputs = names, len(names)
                return True

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, lo, opt, hi))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag))

            def add_optimization_profile(self, p):
                fake.calls.append(("add_optimization_profile",))

            def set_preview_feature(self, feature, on):
                fake.calls.append(("set_preview_feature", feature, on))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                return types.SimpleNamespace(serialize=lambda: bytes(data) + b"+timed")

            def set_timing_cache(self, cache, ignore_mismatch):
                self.timing = cache

            def get_timing_cache(self):
                return self.timing

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network",))
                return b"PLAN:" + ",".join(network.inputs).encode()

        self.Builder, self.OnnxParser = Builder, Parser


def test_build_mode_tensorrt10_uses_the_fp16_flag_and_tensorrt11_the_fp16_graph():
    from ray_mff.engines.tensorrt_build import network_flags, select_build_mode

    m10 = select_build_mode(FakeTRT("10.9.0"), "fp16")
    assert (m10.onnx_precision, m10.builder_flags, m10.strongly_typed) == ("fp32", ("FP16",), False)
    m11 = select_build_mode(FakeTRT("11.1.0", fp16_flag=False), "fp16")
    assert (m11.onnx_precision, m11.builder_flags, m11.strongly_typed) == ("fp16", (), True)
    assert network_flags(FakeTRT("11.1.0", fp16_flag=False), m11) == 1 << 1
    m32 = select_build_mode(FakeTRT("10.9.0"), "fp32")
    assert (m32.onnx_precision, m32.builder_flags) == ("fp32", ())
    assert network_flags(FakeTRT("10.9.0"), m32) == 0  # explicit batch is implicit in TRT 10/11


def test_build_calls_profile_workspace_and_flags(model, tmp_path):
    from ray_mff.engines.tensorrt_build import ShapeProfile, build_engine_file
    from ray_mff.export import export_model

    paths = export_model(model, tmp_path / "onnx", "fp32", verify=False)
    trt = FakeTRT("10.9.0")
    prof = ShapeProfile(min_hw=(32, 32), opt_hw=(512, 512), max_hw=(1024, 1024), max_batch=4)
    out = build_engine_file(paths["decider"], tmp_path / "decider.plan", precision="fp16", profile=prof,
                            feature_channels=paths["feature_channels"],
                            feature_downsample=paths["feature_downsample"], workspace_bytes=1 << 30, trt=trt)
    assert out.read_bytes() == b"PLAN:feats_a,feats_b,y_a,y_b"
    c = paths["feature_channels"]
    assert paths["feature_downsample"] == 2  # cascade encodes at half resolution
    assert ("create_network", 0) in trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 1 << 30) in trt.calls
    assert ("set_flag", "FP16") in trt.calls
    assert ("set_shape", "feats_a", (1, c, 16, 16), (2, c, 256, 256), (4, c, 512, 512)) in trt.calls
    assert ("set_shape", "y_b", (1, 1, 32, 32), (2, 1, 512, 512), (4, 1, 1024, 1024)) in trt.calls
    assert trt.calls[-1] == ("build_serialized_network",)


def test_engine_cache_key_changes_with_every_dependency():
    from ray_mff.engines.tensorrt_build import GpuInfo, ShapeProfile, engine_cache_key

    base = dict(onnx_sha256="a" * 64, trt_version="10.9.0", gpu=GpuInfo("NVIDIA A10G", (8, 6)),
                profile=ShapeProfile(), precision="fp16")
    k = engine_cache_key(**base)
    assert engine_cache_key(**base) == k
    for change in ({"onnx_sha256": "b" * 64}, {"trt_version": "10.9.1"}, {"gpu": GpuInfo("NVIDIA L4", (8, 6))},
                   {"gpu": GpuInfo("NVIDIA A10G", (8, 9))}, {"profile": ShapeProfile(max_hw=(4096, 4096))},
                   {"precision": "fp32"}):
        assert engine_cache_key(**{**base, **change}) != k, change


def test_cached_engine_builds_once_and_rebuilds_when_the_gpu_changes(model, tmp_path):
    from ray_mff.engines.tensorrt_build import GpuInfo, ShapeProfile, cached_engine
    from ray_mff.export import export_model

    paths = export_model(model, tmp_path / "onnx", "fp32", verify=False)
    trt = FakeTRT("10.9.0")
    kw = dict(precision="fp32", profile=ShapeProfile(), feature_channels=paths["feature_channels"],
              cache=str(tmp_path / "plans"), trt=trt)
    a10 = GpuInfo("NVIDIA A10G", (8, 6))
    p1 = cached_engine(paths["encoder"], gpu=a10, **kw)
    p2 = cached_engine(paths["encoder"], gpu=a10, **kw)
    assert p1 == p2 == b"PLAN:y"
    assert trt.calls.count(("build_serialized_network",)) == 1
    cached_engine(paths["encoder"], gpu=GpuInfo("NVIDIA H100", (9, 0)), **kw)
    assert trt.calls.count(("build_serialized_network",)) == 2
    assert ("clear_flag", "TF32") in trt.calls  # fp32 means fp32
    assert len(list((tmp_path / "plans").glob("encoder-fp32-*.plan"))) == 2
    assert len(list((tmp_path / "plans").glob("encoder-fp32-*.json"))) == 2


def test_tensorrt_engine_on_gpu_matches_onnxruntime(model):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU nodes only; see trt/README.md)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: TensorRT engines need an NVIDIA GPU")
    trt_eng = make_engine("cascade", engine="tensorrt", model=model, max_tile=256)
    ort_eng = make_engine("cascade", engine="onnx", model=model)
    y = np.random.default_rng(0).random((2, 1, 200, 150), dtype=np.float32)
    ft, fo = trt_eng.encode(y), ort_eng.encode(y)
    d_trt = trt_eng.decide(ft[:1], ft[1:], y[:1], y[1:])
    d_ort = ort_eng.decide(fo[:1], fo[1:], y[:1], y[1:])
    assert np.abs(d_trt - d_ort).max() < 1e-3


def test_cached_engine_keeps_a_timing_cache_beside_the_plans(model, tmp_path):
    from ray_mff.engines.tensorrt_build import GpuInfo, ShapeProfile, cached_engine, timing_cache_uri
    from ray_mff.export import export_model

    paths = export_model(model, tmp_path / "onnx", "fp32", verify=False)
    trt = FakeTRT("10.12.0")
    a10 = GpuInfo("NVIDIA A10G", (8, 6))
    kw = dict(precision="fp32", profile=ShapeProfile(), feature_channels=paths["feature_channels"],
              cache=str(tmp_path / "plans"), trt=trt, gpu=a10)
    cached_engine(paths["encoder"], **kw)
    cached_engine(paths["decider"], **kw)
    timing = [c[1] for c in trt.calls if c[0] == "create_timing_cache"]
    assert timing == [b"", b"+timed"]  # the decider's build starts from the encoder's timings
    assert Path(timing_cache_uri(str(tmp_path / "plans"), "10.12.0", a10)).read_bytes() == b"+timed+timed"
    assert ("set_preview_feature", "RESIZE_10_10", True) in trt.calls  # context memory sized per call


def test_one_builder_per_plan_local_lock_and_s3_marker(model, tmp_path, s3_bucket, s3_server, monkeypatch):
    """Threads race for the same plan: one builds, the others read its plan, for a local cache (file
    lock) and an s3:// cache (create-only marker)."""
    import threading
    import time as _time

    from ray_mff import storage
    from ray_mff.engines import tensorrt_build as tb
    from ray_mff.export import export_model

    monkeypatch.setattr(storage, "_s3_endpoint_default", s3_server)  # restored after the test
    paths = export_model(model, tmp_path / "onnx", "fp32", verify=False)
    real_build = tb.build_serialized_engine

    def slow_build(*a, **k):
        _time.sleep(0.5)
        return real_build(*a, **k)

    monkeypatch.setattr(tb, "build_serialized_engine", slow_build)
    monkeypatch.setattr(tb, "BUILD_TIMEOUT_S", 120.0)
    for cache in (str(tmp_path / "plans"), f"s3://{s3_bucket}/trt"):
        trt = FakeTRT("10.9.0")
        kw = dict(precision="fp32", profile=tb.ShapeProfile(), feature_channels=paths["feature_channels"],
                  cache=cache, trt=trt, gpu=tb.GpuInfo("NVIDIA A10G", (8, 6)))
        plans = []
        threads = [threading.Thread(target=lambda: plans.append(tb.cached_engine(paths["encoder"], **kw)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert plans == [b"PLAN:y"] * 3, cache
        assert trt.calls.count(("build_serialized_network",)) == 1, cache
        assert not [u for u in storage.list_files(cache) if u.uri.endswith(".building")]
    # create-only: exactly one writer wins on S3 (If-None-Match: *) and locally (open "xb")
    for where in (f"s3://{s3_bucket}/m/x", str(tmp_path / "m" / "x")):
        assert tb.create_only(where, b"1") is True
        assert tb.create_only(where, b"2") is False
        assert storage.read_bytes(where) == b"1"


# --------------------------------------------------------------------------- TensorRT runtime (fakes)


class FakeRuntimeTRT(FakeTRT):
    """FakeTRT plus the runtime: engines from ``b"PLAN:<inputs>"`` plans and recording contexts."""

    def __init__(self, version="10.12.0", user_managed=True):
        super().__init__(version)
        import ctypes

        fake = self
        self.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        if user_managed:
            self.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, USER_MANAGED=2)

        class Context:
            def __init__(self, engine, strategy):
                self.engine, self.strategy, self.shapes, self.addresses = engine, strategy, {}, {}

            def set_input_shape(self, name, shape):
                self.shapes[name] = tuple(shape)
                return shape[0] <= 8

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr

            def update_device_memory_size_for_shapes(self):
                b, _, h, w = self.shapes[self.engine.inputs[-1]]
                return b * h * w * 16  # grows with the shapes of this call

            def set_device_memory(self, ptr, size):
                fake.calls.append(("set_device_memory", self.engine.graph, size))

            def get_tensor_shape(self, name):
                if name == "feats":
                    b, _, h, w = self.shapes["y"]
                    return (b, 4, h // 2, w // 2)
                return self.shapes["y_a"]

            def execute_async_v3(self, stream):
                fake.calls.append(("execute_async_v3", self.engine.graph, stream))
                for name in self.engine.outputs:  # deterministic output: zeros
                    ctypes.memset(self.addresses[name], 0, 4 * int(np.prod(self.get_tensor_shape(name))))
                return True

        class CudaEngine:
            def __init__(self, data):
                self.inputs = data.decode().split(":")[1].split(",")
                self.graph = "encoder" if self.inputs == ["y"] else "decider"
                self.outputs = ["feats"] if self.graph == "encoder" else ["decision"]
                self.num_io_tensors = len(self.inputs) + 1

            def get_tensor_name(self, i):
                return (self.inputs + self.outputs)[i]

            def get_tensor_mode(self, name):
                return "INPUT" if name in self.inputs else "OUTPUT"

            def get_tensor_dtype(self, name):
                return types.SimpleNamespace(name="FLOAT")

            def get_tensor_profile_shape(self, name, profile):
                return [(1, 1, 32, 32), (2, 1, 64, 64), (8, 1, 256, 256)]

            def create_execution_context(self, strategy=0):
                fake.calls.append(("create_execution_context", self.graph, strategy))
                return Context(self, strategy)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return CudaEngine(bytes(data))

        self.Runtime = Runtime


class _Pinnable(torch.Tensor):
    def pin_memory(self):  # host memory is host memory here
        return self


class FakeCudaTorch:
    """Real torch on the CPU behind a stand-in ``torch.cuda`` (streams that count host waits)."""

    def __init__(self):
        import contextlib

        fake = self
        self.host_waits = 0

        class Stream:
            cuda_stream = 0xBEEF

            def __init__(self, device=None):
                self.device = device

            def synchronize(self):
                fake.host_waits += 1

            def wait_stream(self, other):
                pass

        self.cuda = types.SimpleNamespace(Stream=Stream, stream=lambda s: contextlib.nullcontext(),
                                          device=lambda d: contextlib.nullcontext(),
                                          current_stream=lambda d=None: Stream(), get_device_name=lambda d=0: "Fake GPU")

    def device(self, kind, index=None):
        return torch.device("cpu")

    def empty(self, *args, pin_memory=False, **kw):
        return torch.empty(*args, **kw)

    def from_numpy(self, x):
        return torch.from_numpy(x).as_subclass(_Pinnable)

    def __getattr__(self, name):
        return getattr(torch, name)


def test_tensorrt_engine_own_stream_context_memory_per_call_and_one_host_wait():
    from ray_mff.engines.tensorrt_engine import TensorRTEngine
    from ray_mff.fusion.model_fuser import ModelFuser

    trt, fake_torch = FakeRuntimeTRT(), FakeCudaTorch()
    eng = TensorRTEngine(b"PLAN:y", b"PLAN:feats_a,feats_b,y_a,y_b", stride=16, trt=trt, torch=fake_torch)
    assert eng.max_batch == 8
    assert [c[2] for c in trt.calls if c[0] == "create_execution_context"] == [2, 2]  # USER_MANAGED
    y = np.random.default_rng(0).random((2, 1, 40, 50), dtype=np.float32)
    f = eng.encode(y)
    assert isinstance(f, torch.Tensor) and tuple(f.shape) == (2, 4, 24, 32)  # padded to 48 x 64, half size
    assert fake_torch.host_waits == 0  # encode enqueues and returns: features stay on the device
    d = eng.decide(f[:1], f[1:], y[:1], y[1:])
    assert isinstance(d, np.ndarray) and d.shape == (1, 1, 40, 50) and fake_torch.host_waits == 1
    assert {c[2] for c in trt.calls if c[0] == "execute_async_v3"} == {0xBEEF}  # the engine's own stream
    memory = [c for c in trt.calls if c[0] == "set_device_memory"]
    assert memory == [("set_device_memory", "encoder", 2 * 48 * 64 * 16), ("set_device_memory", "decider", 48 * 64 * 16)]
    eng.encode(np.zeros((4, 1, 200, 200), np.float32))  # bigger shapes: more context memory
    assert trt.calls[-2][:2] == ("set_device_memory", "encoder") and trt.calls[-2][2] == 4 * 208 * 208 * 16
    # the calibrated path repeats the reference's features on the device (a view, made contiguous here)
    res = ModelFuser(eng, batch_reference=True).fuse([np.zeros((40, 50), np.uint8)] * 3)
    assert res.stats["calibration"] == "calibrated" and res.fused.shape == (40, 50)


def test_tensorrt_engine_without_user_managed_memory_uses_a_default_context():
    from ray_mff.engines.tensorrt_engine import TensorRTEngine

    trt = FakeRuntimeTRT(user_managed=False)
    eng = TensorRTEngine(b"PLAN:y", b"PLAN:feats_a,feats_b,y_a,y_b", trt=trt, torch=FakeCudaTorch())
    f = eng.encode(np.zeros((2, 1, 32, 32), np.float32))
    eng.decide(f[:1], f[1:], np.zeros((1, 1, 32, 32), np.float32), np.zeros((1, 1, 32, 32), np.float32))
    assert not [c for c in trt.calls if c[0] == "set_device_memory"]
