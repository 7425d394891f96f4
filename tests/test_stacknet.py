"""The stack-native network (issue 13): shapes for N = 2..8, equivariance in N, locality (a crop
equals the whole image away from its border), ONNX Runtime parity, the stack fuser's modes, the
optical training data and the one-file resumable training state. Random weights, small images:
fast on purpose."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_mff.models import build_model


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("stacknet").eval()


def test_shapes_for_every_stack_size(net):
    for n in range(2, 9):
        w, fused = net(torch.rand(1, n, 1, 21, 30))
        assert w.shape == (1, n, 1, 21, 30) and fused.shape == (1, 1, 21, 30)
        assert torch.allclose(w.sum(dim=1), torch.ones(1, 1, 21, 30), atol=1e-5)


def test_permuting_the_stack_permutes_the_weights(net):
    x = torch.rand(2, 5, 1, 40, 36)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        w1, f1 = net(x)
        w2, f2 = net(x[:, perm])
    assert torch.allclose(w1[:, perm], w2, atol=1e-6)
    assert torch.allclose(f1, f2, atol=1e-6)


def test_flops_per_pixel_in_budget(net):
    from ray_mff.models.stacknet import flops_per_pixel

    for n in (2, 4, 8):
        assert 10e3 <= flops_per_pixel(net, n, size=64) <= 15e3


def test_crop_matches_whole_image_away_from_its_border(net):
    """Locality: what tiling relies on. A crop on the stride grid sees the whole image's values
    wherever its receptive field stays inside the crop (here: 96 px from the cut)."""
    x = torch.rand(1, 2, 1, 192, 224)
    with torch.no_grad():
        w_all, f_all = net(x)
        w_crop, f_crop = net(x[..., :, :192])  # cut at column 192 (a multiple of the stride 4)
    assert torch.allclose(w_all[..., :96], w_crop[..., :96], atol=1e-5)
    assert torch.allclose(f_all[..., :96], f_crop[..., :96], atol=1e-5)


def _assert_onnx_matches_torch(net, tmp_path, seed: int):
    """ONNX Runtime within 1 grey level of torch (weights within 1e-4) for N = 2 and 4: the engine."""
    from ray_mff.engines.stack_engine import StackOnnxEngine, StackTorchEngine, export_stack_model
    from ray_mff.fusion.stack_fuser import StackFuser

    onnx, ref = StackOnnxEngine(*export_stack_model(net, tmp_path), threads=1), StackTorchEngine(net)
    rng = np.random.default_rng(seed)
    for n in (2, 4):  # one graph, any N (the export traced 3)
        stack = [(rng.random((50, 46, 3)) * 255).astype(np.uint8) for _ in range(n)]
        for correction in (True, False):  # the joint graph, and the decision graph alone
            a, b = (StackFuser(e, correction=correction).fuse(stack) for e in (ref, onnx))
            assert np.abs(a.fused.astype(int) - b.fused.astype(int)).max() <= 1
            assert np.abs(a.weights - b.weights).max() < 1e-4
    return onnx


def test_onnx_runtime_matches_torch(net, tmp_path):
    pytest.importorskip("onnxruntime")
    _assert_onnx_matches_torch(net, tmp_path, seed=0)


def test_fuser_modes_dtypes_and_calibration(net):
    from ray_mff.engines.stack_engine import StackTorchEngine
    from ray_mff.fusion.stack_fuser import StackFuser

    engine = StackTorchEngine(net)
    rng = np.random.default_rng(1)
    grey16 = [(rng.random((33, 41)) * 65535).astype(np.uint16) for _ in range(2)]
    r = StackFuser(engine).fuse(grey16)
    assert r.fused.dtype == np.uint16 and r.fused.shape == (33, 41) and r.stats["calibration"] == "pair"
    stack = [(rng.random((32, 36, 3)) * 255).astype(np.uint8) for _ in range(7)]
    joint = StackFuser(engine, calibration=False, chunk=3, correction=True).fuse(stack)
    cal = StackFuser(engine, chunk=3, correction=True).fuse(stack)
    assert joint.stats["calibration"] == "joint" and cal.stats["calibration"] == "calibrated"
    for res in (joint, cal):
        assert res.fused.shape == (32, 36, 3) and res.fused.dtype == np.uint8
        assert np.allclose(res.weights.sum(axis=-1), 1.0, atol=1e-4)
    # a chunk that holds the whole stack is the joint pass itself
    one = StackFuser(engine, chunk=8, correction=True).fuse(stack)
    assert one.stats["calibration"] == "joint" and np.array_equal(one.fused, joint.fused)
    # correction off: the decision graph alone (same weights, no correction map), the fused image
    # is the decision's blend
    plain = StackFuser(engine, calibration=False, chunk=3, correction=False).fuse(stack)
    assert np.allclose(plain.weights, joint.weights, atol=1e-6) and plain.correction is None
    plain_cal = StackFuser(engine, chunk=3, correction=False).fuse(stack)
    assert np.allclose(plain_cal.weights, cal.weights, atol=1e-6) and plain_cal.correction is None
    blend = np.einsum("hwn,nhwc->hwc", plain.weights, np.stack(stack).astype(np.float32) / 255)
    assert np.abs(plain.fused.astype(np.float32) - np.clip(np.rint(blend * 255), 0, 255)).max() <= 1
    assert not plain.stats["correction"] and joint.stats["correction"]


def test_polygon_psf_and_training_stacks():
    from ray_mff.synthetic import polygon_psf
    from ray_mff.train.synthetic_stacks import make_batch

    k = polygon_psf(5.0, blades=6, rotation=0.2)
    assert k.shape == (11, 11) and abs(float(k.sum()) - 1.0) < 1e-5
    img = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    b = make_batch([img, img], np.random.default_rng(3), patch=48, n=5)
    assert b["stack"].shape == (2, 5, 1, 48, 48) and b["truth"].shape == (2, 1, 48, 48)
    assert np.allclose(b["depth"].sum(axis=1), 1.0)
    assert b["stack"].min() >= 0.0 and b["stack"].max() <= 1.0


def test_stack_truth_loss_and_resume_file_round_trip(net, tmp_path):
    from ray_mff.train.losses import stack_truth_loss
    from ray_mff.train.resume_file import load_resume_file, save_resume_file

    net = build_model("stacknet")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    stack = torch.rand(2, 3, 1, 32, 32)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 32, 32)), 3).permute(0, 3, 1, 2).float()
    w, fused = net(stack)
    terms = stack_truth_loss(w, fused, stack, stack[:, 0], onehot)
    terms["loss"].backward()
    opt.step()
    path = save_resume_file(tmp_path / "r.safetensors", net, opt, None, {"step": 7, "best_val": 0.5})
    model, best, opt_state, state = load_resume_file(path)
    assert state["step"] == 7 and best is None
    fresh = build_model("stacknet")
    fresh.load_state_dict(model)
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(opt_state)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


class _ContextFreeEngine:
    """A stack engine whose logits depend on each image alone (l = 40 y): calibrated chunks must
    then reproduce the one-pass softmax exactly, even with logit gaps far beyond the calibrator's
    clip."""

    stride, name, precision, device = 1, "fake", "fp32", "cpu"

    def encode(self, y):
        return y

    def decide_stack(self, feats, y, fused=True):
        logit = 40.0 * y
        e = np.exp(logit - logit.max(axis=0, keepdims=True))
        w = e / e.sum(axis=0, keepdims=True)
        return logit, w, (w * y).sum(axis=0, keepdims=True) if fused else None


def test_calibrated_chunks_reproduce_the_joint_softmax():
    from ray_mff.fusion.stack_fuser import StackFuser

    rng = np.random.default_rng(2)
    stack = [rng.random((24, 20)).astype(np.float32) for _ in range(9)]
    joint = StackFuser(_ContextFreeEngine(), calibration=False).fuse(stack)
    cal = StackFuser(_ContextFreeEngine(), chunk=3).fuse(stack)
    assert np.abs(joint.weights - cal.weights).max() < 1e-4
    assert np.abs(joint.fused - cal.fused).max() < 1e-4


def test_deep_stacks_stream_without_the_full_weights(monkeypatch):
    """Past FULL_WEIGHTS_MAX_BYTES the fuser keeps no (H, W, N) weights: the streaming softmax
    gives the same fused image and the index map (first maximum on ties, as np.argmax), and
    sources whose weight is negligible in a whole cell are never read there."""
    from ray_mff.fusion import decision
    from ray_mff.fusion.stack_fuser import StackFuser

    rng = np.random.default_rng(3)
    # 12 planes, each the sharp (bright) one over its own band of rows: most cells hold one winner
    base = rng.random((256, 200)).astype(np.float32) * 0.2
    stack = []
    for k in range(12):
        img = base.copy()
        img[k * 20:(k + 1) * 20 + 4] += 0.6
        stack.append(img)
    full = StackFuser(_ContextFreeEngine(), chunk=4).fuse(stack)
    monkeypatch.setattr(decision, "FULL_WEIGHTS_MAX_BYTES", 0)
    deep = StackFuser(_ContextFreeEngine(), chunk=4).fuse(stack)
    assert full.weights is not None and deep.weights is None
    assert np.array_equal(deep.index_map, np.argmax(full.weights, axis=-1))
    exact = np.einsum("hwn,nhw->hw", full.weights, np.stack(stack))
    assert np.abs(deep.fused - exact).max() < 1e-4 and np.abs(full.fused - exact).max() < 1e-4


def test_tiled_equals_untiled_with_the_correction():
    """TiledFuser blends the fused-result correction like a weight channel (the network's own
    locality is tested above: a crop equals the whole image). The fake engine's correction is
    pointwise and non-zero, so tiled and untiled must agree to rounding."""
    from ray_mff.fusion.stack_fuser import StackFuser
    from ray_mff.tiling import TiledFuser

    class CorrectingEngine(_ContextFreeEngine):
        def decide_stack(self, feats, y, fused=True):
            logit, w, out = super().decide_stack(feats, y)
            return logit, w, out + 0.05 * np.sin(10.0 * out)

    rng = np.random.default_rng(4)
    stack = [(rng.random((300, 260, 3)) * 255).astype(np.uint8) for _ in range(3)]
    inner = StackFuser(CorrectingEngine(), correction=True)
    whole = inner.fuse(stack)
    tiled = TiledFuser(inner, tile_size=128, margin=16, feather=16, align=4, untiled_max_side=128).fuse(stack)
    assert tiled.stats["tiles"] > 1
    assert np.abs(whole.correction).max() > 0.01
    assert np.abs(whole.fused.astype(int) - tiled.fused.astype(int)).max() <= 1
    assert np.abs(whole.weights - tiled.weights).max() < 1e-4


# -- stacknet_s: the cheap variant (issue 13's speed bar) ----------------------------------------------


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    return build_model("stacknet_s").eval()


def test_variant_options_leave_the_default_config_alone(net, small):
    from ray_mff.models.stacknet import flops_per_pixel

    # weights trained before the options existed carry this config: it must rebuild the same net
    assert set(net.config()) == {"stem", "half", "half_out", "quarter", "joint", "fine", "fused", "band"}
    assert build_model("stacknet_s", **small.config()).config() == small.config()
    assert flops_per_pixel(small, 2, size=64) < 0.5 * flops_per_pixel(net, 2, size=64)


def test_variant_any_n_equivariant_and_local(small):
    for n in (2, 3, 5, 8):
        w, fused = small(torch.rand(1, n, 1, 21, 30))
        assert w.shape == (1, n, 1, 21, 30) and fused.shape == (1, 1, 21, 30)
        assert torch.allclose(w.sum(dim=1), torch.ones(1, 1, 21, 30), atol=1e-5)
    x = torch.rand(1, 4, 1, 192, 224)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        w1, f1 = small(x)
        w2, f2 = small(x[:, perm])
        w_crop, f_crop = small(x[..., :, :192])
    assert torch.allclose(w1[:, perm], w2, atol=1e-6) and torch.allclose(f1, f2, atol=1e-6)
    assert torch.allclose(w1[..., :96], w_crop[..., :96], atol=1e-5)
    assert torch.allclose(f1[..., :96], f_crop[..., :96], atol=1e-5)


def test_variant_bounds_coefficient_and_residual():
    """Bounded full-resolution coefficient a and fused-result residual: even with exploding head
    weights, noise cannot flip decisions in flat areas or paint large residuals."""
    torch.manual_seed(2)
    net = build_model("stacknet_s").eval()
    with torch.no_grad():
        for m in (net.head2, net.fused_net[-1]):
            m.weight.mul_(1e4)
            m.bias.fill_(1e3)
        y = torch.rand(1, 3, 1, 32, 40)
        feats = net.encode(y.flatten(0, 1)).unflatten(0, (1, -1))
        half = net.half_logits(feats, y)
        _, w, fused = net.decide_stack(feats, y)
    assert half[:, :, 1].abs().max() <= net.coef_bound + 1e-4
    blend = (w * y).sum(dim=1)
    assert (fused - blend).abs().max() <= net.residual_bound + 1e-4


def test_variant_onnx_within_one_grey_level_and_tiled_equals_untiled(small, tmp_path):
    pytest.importorskip("onnxruntime")
    from ray_mff.fusion.stack_fuser import StackFuser
    from ray_mff.tiling import TiledFuser

    onnx = _assert_onnx_matches_torch(small, tmp_path, seed=5)
    rng = np.random.default_rng(6)
    # the real network tiled: its receptive field fits a 112 px margin
    smooth = cv2_blur([(rng.random((300, 260)) * 255).astype(np.uint8) for _ in range(3)])
    for correction in (False, True):
        inner = StackFuser(onnx, correction=correction)
        whole = inner.fuse(smooth)
        tiled = TiledFuser(inner, tile_size=288, margin=112, feather=16, align=4, untiled_max_side=128).fuse(smooth)
        assert tiled.stats["tiles"] > 1
        assert np.abs(whole.fused.astype(int) - tiled.fused.astype(int)).max() <= 1
        assert np.abs(whole.weights - tiled.weights).max() < 1e-3


def cv2_blur(images):
    """Images with some structure (smoothed noise), so the decision is not a coin toss."""
    import cv2

    return [cv2.GaussianBlur(img, (0, 0), 1.0 + k) for k, img in enumerate(images)]
