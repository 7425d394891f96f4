"""Decision-map primitives, the classical methods (guided, dwt) and the synthetic focus-stack renderer."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from ray_mff.fusion.consistency import relabel_small_regions, verify_decision_map, verify_index_map
from ray_mff.fusion.decision import fuse_with_weights, normalize_weights, one_hot
from ray_mff.fusion.dwt import fuse_dwt, majority_filter
from ray_mff.fusion.focus_measure import laplacian_energy, spatial_frequency_map, sum_modified_laplacian
from ray_mff.fusion.guided import fuse_guided
from ray_mff.fusion.guided_filter import guided_filter
from ray_mff.fusion.luminance import luminance
from ray_mff.synthetic import disk_psf, render_focus_stack


def psnr(x: np.ndarray, y: np.ndarray, peak: float) -> float:
    mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
    return float(10 * np.log10(peak * peak / mse))


# ---------------------------------------------------------------- guided filter


def _guided_filter_brute_force(guide: np.ndarray, src: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He et al. 2013, Eq. 4-8 window by window in float64, mirrored borders (BORDER_REFLECT)."""
    h, w = guide.shape
    gp = np.pad(guide.astype(np.float64), r, mode="symmetric")
    sp = np.pad(src.astype(np.float64), r, mode="symmetric")
    a = np.empty((h, w))
    b = np.empty((h, w))
    for y in range(h):
        for x in range(w):
            gi = gp[y : y + 2 * r + 1, x : x + 2 * r + 1]
            pi = sp[y : y + 2 * r + 1, x : x + 2 * r + 1]
            mu, pbar = gi.mean(), pi.mean()
            a[y, x] = ((gi * pi).mean() - mu * pbar) / (gi.var() + eps)
            b[y, x] = pbar - a[y, x] * mu
    ap, bp = np.pad(a, r, mode="symmetric"), np.pad(b, r, mode="symmetric")
    q = np.empty((h, w))
    for y in range(h):
        for x in range(w):
            q[y, x] = ap[y : y + 2 * r + 1, x : x + 2 * r + 1].mean() * guide[y, x] + bp[
                y : y + 2 * r + 1, x : x + 2 * r + 1
            ].mean()
    return q


@pytest.mark.parametrize("r,eps", [(2, 0.01), (3, 0.1)])
def test_guided_filter_matches_brute_force(r, eps):
    rng = np.random.default_rng(0)
    guide = rng.random((19, 23)).astype(np.float32)
    src = (rng.random((19, 23)) > 0.5).astype(np.float32)
    ours = guided_filter(guide, src, radius=r, eps=eps)
    ref = _guided_filter_brute_force(guide, src, r, eps)
    assert ours.dtype == np.float32 and ours.shape == src.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_guided_filter_stack_is_channelwise_and_keeps_constants():
    rng = np.random.default_rng(1)
    guide = rng.random((32, 40)).astype(np.float32)
    src = rng.random((32, 40, 3)).astype(np.float32)
    stacked = guided_filter(guide, src, radius=4, eps=0.05)
    for k in range(3):
        np.testing.assert_allclose(stacked[..., k], guided_filter(guide, src[..., k], radius=4, eps=0.05), atol=1e-6)
    ones = guided_filter(guide, np.ones_like(guide), radius=4, eps=0.05)
    np.testing.assert_allclose(ones, 1.0, atol=1e-5)


# ---------------------------------------------------------------- consistency verification


def test_small_regions_of_both_polarities_are_removed():
    h, w = 100, 100  # threshold 0.01 * H * W = 100 px
    d = np.zeros((h, w), np.float32)
    d[:, 50:] = 1.0  # right half chooses source A
    d[20:26, 10:16] = 1.0  # 36-px blob of A inside B
    d[60:67, 70:77] = 0.0  # 49-px hole of B inside A
    d[80:95, 5:20] = 1.0  # 225-px region of A: large enough to stay
    lum = [np.random.default_rng(2).random((h, w)).astype(np.float32) for _ in range(2)]
    hard = verify_decision_map(d, lum, refine=False)
    expected = np.zeros((h, w), np.float32)
    expected[:, 50:] = 1.0
    expected[80:95, 5:20] = 1.0
    np.testing.assert_array_equal(hard, expected)
    # a lower threshold keeps both small regions
    kept = verify_decision_map(d, lum, area_ratio=0.003, refine=False)
    np.testing.assert_array_equal(kept, d)

    soft = verify_decision_map(d, lum)
    assert soft.dtype == np.float32 and soft.min() >= 0 and soft.max() <= 1
    assert soft[50, 5] < 0.05 and soft[50, 95] > 0.95  # far from edges the decision is kept


def test_n_source_relabel_to_surrounding_majority():
    idx = np.zeros((90, 90), np.int32)
    idx[:, 30:60] = 1
    idx[:, 60:] = 2
    idx[40:45, 10:15] = 2  # small island of 2 inside 0
    idx[10:14, 40:44] = 0  # small island of 0 inside 1
    idx[70:72, 70:72] = 1  # small island of 1 inside 2
    idx[50:52, 70:72] = 0
    idx[50:52, 72:74] = 1  # two touching small islands (0 and 1) inside 2
    clean = relabel_small_regions(idx, 3, min_area=81)
    expected = np.zeros((90, 90), np.int32)
    expected[:, 30:60] = 1
    expected[:, 60:] = 2
    np.testing.assert_array_equal(clean, expected)

    lum = [np.full((90, 90), v, np.float32) for v in (0.2, 0.5, 0.8)]
    w = verify_index_map(idx, 3, lum)
    assert w.shape == (90, 90, 3) and w.dtype == np.float32
    np.testing.assert_allclose(w.sum(axis=2), 1.0, atol=1e-5)
    assert np.array_equal(np.argmax(w, axis=2), expected)
    hard = verify_index_map(idx, 3, lum, refine=False)
    np.testing.assert_array_equal(hard, one_hot(expected, 3))


def test_strong_focus_evidence_protects_a_small_region():
    idx = np.zeros((100, 100), np.int32)
    idx[40:50, 40:50] = 1  # 100 px < threshold 0.02 * 10000 = 200 px
    evidence = np.full((100, 100), 0.1)
    assert np.all(relabel_small_regions(idx, 2, 200, evidence=evidence) == 0)
    evidence[40:50, 40:50] = 2.0  # focus measure ~7x the other source's: a small object in focus
    np.testing.assert_array_equal(relabel_small_regions(idx, 2, 200, evidence=evidence), idx)


def test_methods_reject_bad_stacks():
    a = np.zeros((8, 8), np.uint8)
    for method in (fuse_guided, fuse_dwt):
        with pytest.raises(ValueError):
            method([a])
        with pytest.raises(ValueError):
            method([a, np.zeros((8, 8), np.uint16)])


# ---------------------------------------------------------------- applying weights


def test_fuse_with_weights_dtypes_and_colour():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    half = np.full((8, 9, 2), 0.5, np.float32)
    f = fuse_with_weights([a, b], half)
    assert f.dtype == np.uint8 and f.shape == a.shape
    np.testing.assert_array_equal(f, np.rint((a.astype(np.float64) + b) / 2).astype(np.uint8))
    idx = rng.integers(0, 2, (8, 9))
    f = fuse_with_weights([a, b], one_hot(idx, 2))
    np.testing.assert_array_equal(f, np.where(idx[..., None] == 0, a, b))

    g = [rng.integers(0, 65536, (6, 7), dtype=np.uint16) for _ in range(3)]
    w = normalize_weights(rng.random((6, 7, 3)))
    f = fuse_with_weights(g, w)
    assert f.dtype == np.uint16
    ref = sum(w[..., k].astype(np.float64) * g[k] for k in range(3))
    assert np.max(np.abs(f - ref)) <= 0.5 + 1e-2
    # overshooting weights clip to the dtype's range instead of wrapping
    over = fuse_with_weights([np.full((2, 2), 250, np.uint8)] * 2, np.full((2, 2, 2), 0.6, np.float32))
    assert np.all(over == 255)
    fl = fuse_with_weights([np.full((2, 2), 0.25, np.float32), np.full((2, 2), 0.75, np.float32)], half[:2, :2])
    assert fl.dtype == np.float32 and np.allclose(fl, 0.5)


def test_normalize_weights_handles_empty_pixels():
    w = np.zeros((2, 2, 4), np.float32)
    w[0, 0, 1] = 2.0
    w[1, 1, 2] = -1.0
    n = normalize_weights(w)
    np.testing.assert_allclose(n.sum(axis=2), 1.0)
    assert n[0, 0, 1] == 1.0 and np.allclose(n[0, 1], 0.25)


# ---------------------------------------------------------------- focus measures


def test_focus_measures_rank_sharp_above_blurred():
    lum = luminance(skimage.data.camera()[100:228, 100:228])
    import cv2

    blurred = cv2.filter2D(lum, -1, disk_psf(3.0), borderType=cv2.BORDER_REFLECT)
    for fm in (laplacian_energy, sum_modified_laplacian, spatial_frequency_map):
        sharp, soft = fm(lum, 7), fm(blurred, 7)
        assert sharp.shape == lum.shape and sharp.dtype == np.float32
        assert np.mean(sharp > soft) > 0.9


def test_majority_filter_removes_isolated_choices():
    idx = np.zeros((9, 9), np.int32)
    idx[4, 4] = 1
    idx[:, 7:] = 2
    out = majority_filter(idx, 3)
    assert out[4, 4] == 0 and np.all(out[:, 7:] == 2)


# ---------------------------------------------------------------- synthetic stacks and the two methods


@pytest.fixture(scope="module")
def rgb_pair():
    img = skimage.data.astronaut()[:256, 128:384]
    stack, truth, depth = render_focus_stack(img, 2, seed=5)
    return stack, truth, depth


@pytest.fixture(scope="module")
def grey16_triple():
    img = skimage.data.camera()[128:384, 128:384]
    stack, truth, depth = render_focus_stack(img, 3, seed=6, dtype=np.uint16)
    return stack, truth, depth


def test_render_focus_stack_shapes_and_truth():
    img = skimage.data.astronaut()[:96, :128]
    stack, truth, depth = render_focus_stack(img, 4, seed=0, layers=3)
    assert len(stack) == 4 and all(s.shape == img.shape and s.dtype == np.uint8 for s in stack)
    np.testing.assert_array_equal(truth, img)
    assert depth.shape == img.shape[:2] and depth.dtype == np.uint16 and len(np.unique(depth)) <= 3
    # without blur and noise every image is the truth
    sharp, _, _ = render_focus_stack(img, 3, seed=0, max_radius=0.0, noise_sigma=0.0)
    for s in sharp:
        np.testing.assert_array_equal(s, img)
    # each image is sharp exactly where the depth map says so (away from layer boundaries)
    stack, truth, depth = render_focus_stack(img, 3, seed=1, noise_sigma=0.0, dtype=np.uint16)
    assert truth.dtype == np.uint16 and stack[0].dtype == np.uint16
    import cv2

    interior = [cv2.erode((depth == k).astype(np.uint8), np.ones((19, 19), np.uint8)) > 0 for k in range(3)]
    for k in range(3):
        if interior[k].any():
            err = np.abs(stack[k].astype(np.int64) - truth.astype(np.int64))[interior[k]]
            assert err.max() <= 1


def test_disk_psf_is_normalised_pillbox():
    k = disk_psf(4.0)
    assert k.shape == (9, 9) and abs(k.sum() - 1) < 1e-6
    assert k[4, 4] == k.max() and k[0, 0] == 0
    assert disk_psf(0.2).shape == (1, 1)


@pytest.mark.parametrize("method", [fuse_guided, fuse_dwt])
def test_methods_on_8bit_rgb_pair(method, rgb_pair):
    stack, truth, _ = rgb_pair
    res = method(stack)
    assert res.fused.shape == truth.shape and res.fused.dtype == np.uint8
    assert res.method == method.__name__.removeprefix("fuse_")
    best_source = max(psnr(s, truth, 255) for s in stack)
    assert psnr(res.fused, truth, 255) > best_source + 3


@pytest.mark.parametrize("method", [fuse_guided, fuse_dwt])
def test_methods_on_16bit_grey_triple(method, grey16_triple):
    stack, truth, _ = grey16_triple
    res = method(stack)
    assert res.fused.shape == truth.shape and res.fused.dtype == np.uint16
    if res.weights is not None:
        assert res.weights.shape == truth.shape + (3,)
        np.testing.assert_allclose(res.weights.sum(axis=2), 1.0, atol=1e-4)
    best_source = max(psnr(s, truth, 65535) for s in stack)
    assert psnr(res.fused, truth, 65535) > best_source + 3


def test_dwt_odd_size_is_cropped():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (37, 51), dtype=np.uint8)
    b = rng.integers(0, 256, (37, 51), dtype=np.uint8)
    res = fuse_dwt([a, b])
    assert res.fused.shape == (37, 51) and res.weights is None and res.index_map is None
    # identical sources fuse to themselves
    same = fuse_dwt([a, a.copy()]).fused
    assert np.max(np.abs(same.astype(int) - a)) <= 1


def test_guided_recovers_synthetic_16bit_stack():
    """Acceptance: guided fusion of a rendered 16-bit 3-image stack reaches >= 35 dB against the truth.

    Default renderer: disk PSF of radius 4 px between neighbouring focus depths (8 px across the
    stack), occlusion spill at object boundaries, sensor noise sigma 0.003 of full scale.
    """
    stack, truth, depth = render_focus_stack(skimage.data.camera(), 3, seed=0, dtype=np.uint16)
    res = fuse_guided(stack)
    value = psnr(res.fused, truth, 65535)
    assert value >= 35.0, value
    assert np.mean(res.index_map == depth) > 0.9


def test_guided_lytro_q_g(shared_data):
    """Acceptance: mean Q_G over the 20 Lytro pairs >= 0.750 (survey DWT 0.7357, CNN 0.7615)."""
    metrics = pytest.importorskip("ray_mff.metrics")
    import cv2

    values = []
    for i in range(1, 21):
        a = cv2.imread(str(shared_data / "lytro" / f"lytro_{i:02d}_A.png"))[..., ::-1]
        b = cv2.imread(str(shared_data / "lytro" / f"lytro_{i:02d}_B.png"))[..., ::-1]
        fused = fuse_guided([np.ascontiguousarray(a), np.ascontiguousarray(b)]).fused
        values.append(metrics.q_g([a, b], fused))
    assert np.mean(values) >= 0.750, np.mean(values)
