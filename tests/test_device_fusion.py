"""Device-correct fusion: every fuser path keeps an engine's features on its device.

GPU engines (TensorRT, torch on CUDA, ONNX Runtime with IOBinding) return features as CUDA tensors,
which numpy refuses to convert. No GPU is here, so the stand-in engine below returns features as a
torch tensor subclass that refuses numpy conversion the same way (``__array__`` and ``numpy()``
raise), and its ``decide`` checks that the features it gets back are still such tensors. Every path
of :class:`~ray_mff.fusion.model_fuser.ModelFuser` (pairs; calibrated N >= 3 with and without the
batched reference, several chunks; serial; tiled; direct-fusion models; every seed model) runs
through it and must give the same result as the CPU torch engine.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_mff.engines.base import crop_to, pad_to_multiple
from ray_mff.engines.torch_engine import TorchEngine
from ray_mff.fusion.model_fuser import ModelFuser
from ray_mff.models import get_model


class DeviceTensor(torch.Tensor):
    """A tensor numpy cannot read, like a CUDA tensor (``TypeError: can't convert cuda:0 ...``)."""

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert a device tensor to numpy (stand-in for cuda:0)")

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a device tensor to numpy (stand-in for cuda:0)")

    def tolist(self):
        raise TypeError("can't convert a device tensor to a list (stand-in for cuda:0)")


class DeviceStandIn:
    """Engine protocol on CPU torch whose features are :class:`DeviceTensor` s (a GPU engine's shape)."""

    name = "device-stand-in"
    precision = "fp32"
    device = "cuda:0"  # what a GPU engine reports: ModelFuser then batches the reference by default
    max_batch = 4  # like TensorRT's profile

    def __init__(self, model):
        self.model = model.eval()
        self.stride = int(getattr(model, "stride", 1))
        self.model_name = model.registry_name
        self.output = getattr(model, "output", "decision")
        self.postprocess = getattr(model, "postprocess", None)
        self.decide_calls = 0
        self.encode_calls = 0

    @staticmethod
    def _host(x) -> torch.Tensor:
        assert not isinstance(x, DeviceTensor), "a luminance input should be host data here"
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def encode(self, y):
        self.encode_calls += 1
        assert len(y) <= self.max_batch, f"encode batch {len(y)} over the profile's {self.max_batch}"
        with torch.inference_mode():
            f = self.model.encode(self._host(pad_to_multiple(np.asarray(y, np.float32), self.stride)))
        return f.as_subclass(DeviceTensor)

    def decide(self, fa, fb, ya, yb):
        for f in (fa, fb):
            assert isinstance(f, DeviceTensor), f"features left the device: got {type(f).__name__}"
        self.decide_calls += 1
        h, w = ya.shape[-2:]
        with torch.inference_mode():
            d = self.model.decide(fa.as_subclass(torch.Tensor), fb.as_subclass(torch.Tensor),
                                  self._host(pad_to_multiple(np.asarray(ya, np.float32), self.stride)),
                                  self._host(pad_to_multiple(np.asarray(yb, np.float32), self.stride)))
        return crop_to(d.numpy(), h, w)  # decision maps come back to the host (the engine protocol)

    def describe(self):
        return {"engine": self.name, "precision": self.precision, "device": self.device}


def test_the_stand_in_refuses_numpy_like_a_cuda_tensor():
    t = torch.zeros(2, 3, 4, 4).as_subclass(DeviceTensor)
    assert isinstance(t[0:1], DeviceTensor)  # batch slicing keeps it on the "device"
    for call in (np.asarray, lambda x: np.repeat(x, 2, axis=0), lambda x: x.numpy(),
                 lambda x: np.concatenate([x, x])):
        with pytest.raises(TypeError):
            call(t)


def _stack(n: int, h: int = 48, w: int = 56, seed: int = 0) -> list[np.ndarray]:
    """n colour images, image k sharp in the k-th vertical band (blurred elsewhere)."""
    import cv2

    rng = np.random.default_rng(seed)
    sharp = cv2.GaussianBlur(rng.random((h, w, 3), dtype=np.float32), (0, 0), 1.0)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 2.5)
    band = np.minimum(np.arange(w) * n // w, n - 1)[None, :, None]
    return [np.clip(np.rint(np.where(band == k, sharp, blurred) * 255 / sharp.max()), 0, 255).astype(np.uint8)
            for k in range(n)]


@pytest.fixture(scope="module")
def models():
    return {name: get_model(name) for name in ("cascade", "cnn", "ssim", "mscnn")}


def _assert_same(device_res, cpu_res):
    assert device_res.stats["calibration"] == cpu_res.stats["calibration"]
    np.testing.assert_allclose(device_res.weights, cpu_res.weights, atol=1e-5)
    assert np.abs(device_res.fused.astype(int) - cpu_res.fused.astype(int)).max() <= 1


# (model, N, fuser options): pairs, calibrated with/without the batched reference and with several
# chunks (N = 5, batch 2), serial, the focus-map model (cnn, consistency) and direct-fusion models
PATHS = [
    ("cascade", 2, {}),
    ("cascade", 3, {"batch_reference": True}),
    ("cascade", 3, {"batch_reference": False}),
    ("cascade", 5, {"batch_reference": True, "batch": 2}),
    ("cascade", 5, {"batch_reference": False, "batch": 1}),
    ("cascade", 4, {"calibration": False}),
    ("cascade", 3, {"mode": "softmax"}),
    ("cnn", 2, {}),
    ("cnn", 3, {}),
    ("cnn", 3, {"calibration": False}),
    ("ssim", 2, {}),
    ("ssim", 3, {}),
    ("mscnn", 2, {}),
    ("mscnn", 3, {}),
]


@pytest.mark.parametrize("name,n,options", PATHS, ids=[f"{m}-N{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
                                                      for m, n, o in PATHS])
def test_every_fuser_path_keeps_features_on_the_device(models, name, n, options):
    images = _stack(n)
    engine = DeviceStandIn(models[name])
    res = ModelFuser(engine, **options).fuse(images)
    assert engine.decide_calls >= 1
    ref_options = dict(options)
    ref_options.setdefault("batch_reference", engine.device != "cpu")  # the same engine calls on both sides
    _assert_same(res, ModelFuser(TorchEngine(models[name]), **ref_options).fuse(images))


def test_tiled_fusion_keeps_features_on_the_device(models):
    from ray_mff.tiling import TiledFuser

    images = _stack(3, h=200, w=40)
    engine = DeviceStandIn(models["cnn"])
    tiled = TiledFuser(ModelFuser(engine), tile_size=128, margin=16, feather=8, untiled_max_side=128).fuse(images)
    assert tiled.stats["tiles"] > 1
    ref = TiledFuser(ModelFuser(TorchEngine(models["cnn"]), batch_reference=True), tile_size=128, margin=16,
                     feather=8, untiled_max_side=128).fuse(images)
    _assert_same(tiled, ref)


def _calls(engine) -> tuple[int, int]:
    return engine.encode_calls, engine.decide_calls


@pytest.mark.parametrize("name", ["cascade", "cnn", "ssim"])
def test_fuse_batch_shares_engine_calls_and_matches_fuse(models, name):
    """Three same-shape pairs go two to an engine call (the stand-in's max_batch 4 = 2 pairs), the
    triple and the odd-shaped pair as in ``fuse``; every result is ``fuse``'s (torch on CPU: the
    weights of a batch-4 convolution differ from batch 2's by < 1e-6, so within _assert_same's bounds)."""
    stacks = [_stack(2, seed=s) for s in range(3)] + [_stack(3, seed=3), _stack(2, h=40, w=32, seed=4)]
    engine = DeviceStandIn(models[name])
    fuser = ModelFuser(engine)
    assert fuser.batch_stacks and fuser.pairs_per_call(48, 56) == 2  # the GPU default, within max_batch
    one_by_one = [fuser.fuse(images) for images in stacks]
    per_stack = _calls(engine)
    engine.encode_calls = engine.decide_calls = 0
    batched = fuser.fuse_batch(stacks)
    assert _calls(engine) == (per_stack[0] - 1, per_stack[1] - 1)  # pairs 0 and 1 shared one call each
    for got, want in zip(batched, one_by_one):
        assert got.method == want.method
        _assert_same(got, want)
    _assert_same(batched[0], ModelFuser(TorchEngine(models[name])).fuse(stacks[0]))


def test_fuse_batch_stays_within_the_pixel_budget_and_is_per_stack_on_cpu(models):
    engine = DeviceStandIn(models["cascade"])
    padded = (-(-48 // engine.stride) * engine.stride) * (-(-56 // engine.stride) * engine.stride)
    assert ModelFuser(engine, stack_batch_pixels=4 * padded).pairs_per_call(48, 56) == 2
    assert ModelFuser(engine, stack_batch_pixels=4 * padded - 1).pairs_per_call(48, 56) == 1
    assert ModelFuser(engine, stack_batch_pixels=1).pairs_per_call(48, 56) == 1
    cpu = ModelFuser(TorchEngine(models["cascade"]))
    assert not cpu.batch_stacks and cpu.pairs_per_call(48, 56) == 1  # CPU engines: one stack per call
    stacks = [_stack(2, seed=s) for s in range(2)]
    for got, want in zip(cpu.fuse_batch(stacks), [cpu.fuse(s) for s in stacks]):
        np.testing.assert_array_equal(got.fused, want.fused)


def test_tiled_fuse_batch_batches_only_untiled_stacks(models):
    from ray_mff.methods import get_fuser
    from ray_mff.tiling import TiledFuser

    engine = DeviceStandIn(models["cascade"])
    tiled = TiledFuser(ModelFuser(engine), tile_size=128, margin=16, feather=8, untiled_max_side=128)
    stacks = [_stack(2, seed=0), _stack(2, h=200, w=40, seed=1), _stack(2, seed=2)]
    want = [tiled.fuse(images) for images in stacks]
    got = tiled.fuse_batch(stacks)
    assert got[1].stats["tiles"] > 1 and "tiles" not in got[0].stats
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.fused, w.fused)
    # a wrapped fuser without fuse_batch: the tiled fuser has none either (callers fuse one by one)
    assert getattr(get_fuser("guided", tile_size=1024), "fuse_batch", None) is None
    assert getattr(TiledFuser(object()), "fuse_batch", None) is None


def test_onnxruntime_iobinding_keeps_features_in_torch_tensors(models, tmp_path):
    """The IOBinding path of the ONNX Runtime engine (what runs on CUDA) bound to CPU torch tensors:
    features are tensors, never numpy, and every fuser path gives the plain session's result."""
    from ray_mff.engines.onnx_engine import OnnxEngine
    from ray_mff.export import export_model

    paths = export_model(models["cascade"], tmp_path, "fp32", name="cascade", verify=False)
    bound = OnnxEngine(paths["encoder"], paths["decider"], threads=1, iobinding=True)
    plain = OnnxEngine(paths["encoder"], paths["decider"], threads=1)
    y = np.random.default_rng(0).random((2, 1, 40, 50), dtype=np.float32)
    f = bound.encode(y)
    assert isinstance(f, torch.Tensor) and tuple(f.shape) == tuple(plain.encode(y).shape)
    for n, options in ((2, {}), (3, {"batch_reference": True}), (4, {"calibration": False})):
        images = _stack(n)
        _assert_same(ModelFuser(bound, **options).fuse(images), ModelFuser(plain, **options).fuse(images))
    pairs = [_stack(2, seed=s) for s in range(3)]  # fuse_batch: 3 pairs in one encode and one decide call
    batched = ModelFuser(bound, batch_stacks=True).fuse_batch(pairs)
    for got, images in zip(batched, pairs):
        _assert_same(got, ModelFuser(plain).fuse(images))


# -- stack-native models (the default): StackFuser keeps features on the device --------------------


class StackDeviceStandIn:
    """Stack-engine protocol on CPU torch whose features are :class:`DeviceTensor` s, as
    :class:`~ray_mff.engines.stack_engine.StackTorchEngine` returns them on CUDA."""

    name, precision, device = "stack-device-stand-in", "fp32", "cuda:0"

    def __init__(self, model):
        self.model = model.eval()
        self.stride = int(model.stride)
        self.model_name = model.registry_name
        self.decide_calls = 0

    def encode(self, y):
        with torch.inference_mode():
            return self.model.encode(DeviceStandIn._host(y)).as_subclass(DeviceTensor)

    def decide_stack(self, feats, y, fused=True):
        assert isinstance(feats, DeviceTensor), f"features left the device: got {type(feats).__name__}"
        self.decide_calls += 1
        with torch.inference_mode():
            f, yy = feats.as_subclass(torch.Tensor)[None], DeviceStandIn._host(y)[None]
            if not fused:
                logit, w = self.model.decide_weights(f, yy)
                return logit[0].numpy(), w[0].numpy(), None
            logit, w, out = self.model.decide_stack(f, yy)
        return logit[0].numpy(), w[0].numpy(), out.numpy()


@pytest.mark.parametrize("n, options", [(2, {}), (4, {}), (7, {"chunk": 3}), (7, {"chunk": 3, "correction": True}),
                                        (5, {"calibration": False, "correction": True})])
def test_stack_fuser_keeps_features_on_the_device(n, options):
    from ray_mff.engines.stack_engine import StackTorchEngine
    from ray_mff.fusion.stack_fuser import StackFuser

    torch.manual_seed(0)
    net = get_model("stacknet_s", weights=None)
    stack = _stack(n)
    device = StackDeviceStandIn(net)
    on_device = StackFuser(device, **options).fuse(stack)
    on_cpu = StackFuser(StackTorchEngine(net), **options).fuse(stack)
    assert device.decide_calls >= 1
    assert np.array_equal(on_device.fused, on_cpu.fused) and np.allclose(on_device.weights, on_cpu.weights)
