"""The model registry, CascadeNet, the torch engine, decision calibration and the model fuser."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_mff.engines.torch_engine import TorchEngine
from ray_mff.fusion.calibration import DecisionCalibrator, calibrate_decisions
from ray_mff.fusion.model_fuser import ModelFuser
from ray_mff.models import get_model, list_models, load_weights, read_metadata, save_weights
from ray_mff.models.cascade import CascadeNet
from ray_mff.train.losses import dice_loss, fusion_loss, q_g_soft


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return CascadeNet(stem=4, growth=4, layers=2, features=6, width=6, context_width=6, context_dilations=(1, 2)).eval()


# --------------------------------------------------------------------------- network and registry


@pytest.mark.parametrize("hw", [(37, 53), (16, 16), (9, 70)])
def test_cascade_shapes_any_size(small_net, hw):
    ya, yb = torch.rand(2, 1, *hw), torch.rand(2, 1, *hw)
    padded = [-(-n // small_net.stride) * small_net.stride for n in hw]  # what the engines feed encode
    with torch.no_grad():
        d, f = small_net(ya, yb)
        feats = small_net.encode(torch.rand(2, 1, *padded))
    assert d.shape == f.shape == (2, 1, *hw)
    assert feats.shape == (2, 6, padded[0] // 2, padded[1] // 2)  # activities at half resolution
    assert float(d.min()) >= 0.0 and float(d.max()) <= 1.0
    assert small_net.stride == 16


def test_cascade_decision_is_antisymmetric(small_net):
    ya, yb = torch.rand(1, 1, 24, 31), torch.rand(1, 1, 24, 31)
    with torch.no_grad():
        d_ab, _ = small_net(ya, yb)
        d_ba, _ = small_net(yb, ya)
    assert torch.allclose(d_ab, 1 - d_ba, atol=1e-5)


def test_cascade_is_local_so_a_crop_sees_what_the_whole_image_sees():
    """No global operation (the channel attention pools local cells) and no grid stretch (upsampling
    by exact factors): a crop starting on the 32-px grid, of any length, reproduces the whole
    image's decisions wherever the crop's cut edges are farther than the receptive field (~120 px).
    This is what lets tiled fusion of large images match untiled fusion (ray_mff.tiling)."""
    torch.manual_seed(1)
    net = CascadeNet().eval()  # the shipped architecture, random weights
    ya, yb = torch.rand(1, 1, 300, 419), torch.rand(1, 1, 300, 419)
    y0, x0 = 32, 160  # crop origin on the grid; it runs to the bottom/right image edges (odd length 259)
    with torch.no_grad():
        whole, _ = net(ya, yb)
        crop, _ = net(ya[..., y0:, x0:], yb[..., y0:, x0:])
    # only pixels >= 128 px from the crop's cut (top/left) edges are guaranteed to match
    inner = (slice(128, None), slice(128, None))
    diff = (crop[0, 0][inner] - whole[0, 0, y0:, x0:][inner]).abs().max()
    assert float(diff) < 1e-5
    # near the cut edges the context differs (the test could fail for a reason)
    assert float((crop[0, 0] - whole[0, 0, y0:, x0:]).abs().max()) > 1e-4


def test_encode_decide_split_equals_forward(small_net):
    ya, yb = torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        d, fused = small_net(ya, yb)
        d2 = small_net.decide(small_net.encode(ya), small_net.encode(yb), ya, yb)
    assert torch.allclose(d, d2, atol=1e-6)
    assert torch.allclose(fused, d * ya + (1 - d) * yb, atol=1e-6)


def test_registry_round_trip_via_safetensors(small_net, tmp_path):
    assert "cascade" in list_models()
    path = save_weights(small_net, tmp_path / "w.safetensors", {"steps": 3, "note": "test"})
    meta = read_metadata(path)
    assert meta["model"] == "cascade" and meta["steps"] == "3" and meta["note"] == "test"
    loaded = get_model("cascade", weights=path)  # architecture rebuilt from the metadata config
    assert not loaded.training
    assert loaded.config() == small_net.config()
    for k, v in small_net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert isinstance(load_weights(path), CascadeNet)
    assert not get_model("cascade", weights=None).training
    with pytest.raises(KeyError):
        get_model("no-such-model", weights=None)
    with pytest.raises(FileNotFoundError):
        get_model("cascade", weights=tmp_path / "missing.safetensors")


def test_shipped_weights_load_when_present():
    from ray_mff.models import default_weights_path

    if not default_weights_path("cascade").is_file():
        pytest.skip("no shipped cascade weights yet")
    net = get_model("cascade")
    assert sum(p.numel() for p in net.parameters()) > 0


# --------------------------------------------------------------------------- losses


def test_dice_loss_sanity():
    m = (torch.rand(2, 1, 16, 16) > 0.5).float()
    assert float(dice_loss(m, m)) < 1e-3
    assert float(dice_loss(1 - m, m)) > 0.95
    assert 0.3 < float(dice_loss(torch.full_like(m, 0.5), m)) < 0.7
    assert abs(float(dice_loss(m, m)) - float(dice_loss(1 - m, 1 - m))) < 1e-6  # swap-invariant


def test_q_g_soft_prefers_the_right_decision():
    rng = np.random.default_rng(0)
    sharp = torch.from_numpy(rng.random((1, 1, 48, 48), dtype=np.float32))
    blur = torch.nn.functional.avg_pool2d(sharp, 5, stride=1, padding=2, count_include_pad=False)
    mask = torch.zeros(1, 1, 48, 48)
    mask[..., :, :24] = 1
    a = mask * sharp + (1 - mask) * blur
    b = mask * blur + (1 - mask) * sharp
    good = q_g_soft(a, b, sharp)
    bad = q_g_soft(a, b, blur)
    assert float(good) > float(bad) + 0.1
    assert 0.0 <= float(bad) and float(good) <= 1.0
    t = fusion_loss(mask, mask, a, b)
    assert set(t) == {"loss", "dice", "qg_loss"} and float(t["dice"]) < 1e-3
    # differentiable w.r.t. the decision map
    d = torch.full_like(mask, 0.5, requires_grad=True)
    fusion_loss(d, mask, a, b)["loss"].backward()
    assert d.grad is not None and torch.isfinite(d.grad).all()


# --------------------------------------------------------------------------- calibration and fuser


def test_calibration_picks_the_sharpest_source():
    # reference = 1. Left third: image 0 sharpest; middle: the reference; right: image 2.
    h, w = 6, 9
    d_ref_vs_0 = np.ones((h, w), np.float32)
    d_ref_vs_0[:, :3] = 0.0  # image 0 beats the reference on the left
    d_ref_vs_2 = np.ones((h, w), np.float32)
    d_ref_vs_2[:, 6:] = 0.0  # image 2 beats it on the right
    wts = calibrate_decisions([d_ref_vs_0, d_ref_vs_2], reference=1, n=3)
    idx = wts.argmax(-1)
    assert wts.shape == (h, w, 3) and np.allclose(wts.sum(-1), 1)
    assert (idx[:, :3] == 0).all() and (idx[:, 3:6] == 1).all() and (idx[:, 6:] == 2).all()
    soft = calibrate_decisions(np.stack([d_ref_vs_0, d_ref_vs_2], -1), 1, 3, mode="softmax")
    assert np.allclose(soft.sum(-1), 1, atol=1e-5) and (soft.argmax(-1) == idx).all()


def test_calibration_argmax_is_continuous_near_ties():
    # images 0 and 2 score almost the same against the reference: a 1e-6 change in a decision
    # (a rounding difference between tiles or engines) must not flip the whole weight to the other
    def weights(delta):
        d0 = np.full((2, 2), 0.2, np.float32)
        d2 = np.full((2, 2), 0.2 + delta, np.float32)
        return calibrate_decisions([d0, d2], reference=1, n=3)

    a, b = weights(1e-6), weights(-1e-6)
    assert np.allclose(a.sum(-1), 1) and np.abs(a - b).max() < 1e-3
    assert np.allclose(a[..., 0], 0.5, atol=1e-3) and np.allclose(a[..., 1], 0.0)
    clear = weights(-0.1)  # image 2 clearly sharper: one-hot again
    assert np.array_equal(clear[0, 0], np.array([0.0, 0.0, 1.0], np.float32))


def test_calibration_breaks_saturated_ties_with_the_focus_measure():
    # both 0 and 2 saturate against the reference; the tie-break measure says 2 is sharper
    d = [np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)]
    m = [np.full((4, 4), 1.0, np.float32), np.zeros((4, 4), np.float32), np.full((4, 4), 5.0, np.float32)]
    assert (calibrate_decisions(d, 1, 3, measures=m).argmax(-1) == 2).all()
    cal = DecisionCalibrator(3, 1, (4, 4))
    cal.add_reference()
    with pytest.raises(ValueError):
        cal.weights()  # images 0 and 2 missing


def test_calibrator_tracks_the_best_and_the_runner_up_with_ties():
    rng = np.random.default_rng(3)
    for n in (2, 3, 7):
        scores = np.round(rng.normal(size=(n, 9, 11)), 1).astype(np.float32)  # coarse: many exact ties
        cal = DecisionCalibrator(n, 0, (9, 11))
        for k in rng.permutation(n):  # any insertion order
            cal._add_score(int(k), scores[k].copy())
        ordered = np.sort(scores, axis=0)
        assert np.array_equal(cal.best, ordered[-1]) and np.array_equal(cal.second, ordered[-2])
        idx, second = cal.index.astype(int), cal.second_index.astype(int)
        assert (idx != second).all()
        assert np.array_equal(np.take_along_axis(scores, idx[None], 0)[0], cal.best)
        assert np.array_equal(np.take_along_axis(scores, second[None], 0)[0], cal.second)


def _synthetic_stack(n: int, size: int = 48, seed: int = 0):
    """n images, each sharp in one vertical band and box-blurred elsewhere; uint8 RGB."""
    import cv2

    rng = np.random.default_rng(seed)
    sharp = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    blur = cv2.blur(sharp, (9, 9))
    bands = np.array_split(np.arange(size), n)
    imgs = []
    for k in range(n):
        img = blur.copy()
        img[:, bands[k]] = sharp[:, bands[k]]
        imgs.append(img)
    return imgs, bands


class _OracleEngine:
    """Engine stand-in whose decision compares local gradient energy: a perfect focus oracle."""

    name, precision, device, stride = "oracle", "fp32", "cpu", 4

    def encode(self, y):
        import cv2

        assert y.shape[-2] % 4 == 0 and y.shape[-1] % 4 == 0  # the fuser pads to the stride
        out = []
        for img in y[:, 0]:
            lap = cv2.Laplacian(img, cv2.CV_32F)
            out.append(cv2.blur(lap * lap, (5, 5)))
        return np.stack(out)[:, None]

    def decide(self, fa, fb, ya, yb):
        return (fa > fb).astype(np.float32) + 0.5 * (fa == fb)


@pytest.mark.parametrize("calibration", [True, False])
def test_model_fuser_stack_modes(calibration):
    imgs, bands = _synthetic_stack(3, size=45)  # 45: not a multiple of the stride, padded and cropped
    res = ModelFuser(_OracleEngine(), calibration=calibration).fuse(imgs)
    assert res.fused.shape == imgs[0].shape and res.fused.dtype == np.uint8
    assert res.weights.shape == (45, 45, 3) and np.allclose(res.weights.sum(-1), 1, atol=1e-5)
    assert res.stats["calibration"] == ("calibrated" if calibration else "serial")
    assert res.stats["engine"] == "oracle" and res.stats["precision"] == "fp32"
    assert res.stats["reference"] == (1 if calibration else None)
    idx = res.index_map
    for k, band in enumerate(bands):
        inner = band[3:-3]  # away from band edges, where the window straddles two bands
        assert (idx[8:-8, inner] == k).mean() > 0.95


class _RecordingEngine(_OracleEngine):
    """The oracle, recording the batch of every encode call and the device it claims."""

    def __init__(self, device="cpu"):
        self.device, self.encoded = device, []

    def encode(self, y):
        self.encoded.append(len(y))
        return super().encode(y)


@pytest.mark.parametrize("device, calls", [("cpu", [1, 2, 2]), ("cuda:0", [3, 2])])
def test_calibration_encodes_each_image_once_and_serial_re_encodes(device, calls):
    imgs, _ = _synthetic_stack(5, size=32)
    eng = _RecordingEngine(device)
    cal = ModelFuser(eng).fuse(imgs)
    # 5 images, each encoded once: the reference alone on CPU, with the first chunk on a GPU
    assert eng.encoded == calls and sum(calls) == 5
    eng.encoded.clear()
    ser = ModelFuser(eng, calibration=False).fuse(imgs)
    assert eng.encoded == [2, 2, 2, 2]  # serial: every step re-encodes the intermediate, 2(N-1) in all
    # where the reference is encoded changes nothing in the result
    forced = ModelFuser(_RecordingEngine(device), batch_reference=device == "cpu").fuse(imgs)
    np.testing.assert_array_equal(forced.weights, cal.weights)
    assert ser.stats["calibration"] == "serial"
    # an engine that takes at most 2 images per call (a TensorRT profile) keeps the reference apart
    capped = _RecordingEngine(device)
    capped.max_batch = 2
    ModelFuser(capped, batch_reference=True).fuse(imgs)
    assert capped.encoded == [1, 2, 2]


def test_model_fuser_pair_with_torch_engine(small_net):
    imgs, _ = _synthetic_stack(2, size=33)
    grey = [im[..., 0] for im in imgs]
    res = ModelFuser(TorchEngine(small_net)).fuse(grey)
    assert res.fused.shape == (33, 33) and res.fused.dtype == np.uint8
    assert res.weights.shape == (33, 33, 2) and res.stats["calibration"] == "pair"
    assert res.method == "cascade" and res.stats["engine"] == "torch"
    eng = TorchEngine(small_net)
    y = np.random.default_rng(0).random((2, 1, 21, 19), dtype=np.float32)
    f = eng.encode(y)
    assert eng.decide(f[:1], f[1:], y[:1], y[1:]).shape == (1, 1, 21, 19)
