"""ray_mff.metrics: the survey's published numbers, committed per-image values, the N-source
generalisation against a literal two-source transcription, and known values on synthetic images."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, signal

from ray_mff import metrics

# Liu et al., "Multi-focus image fusion: A survey of the state of the art", Information Fusion 64
# (2020), Table 7 (colour Lytro set, 20 pairs): the contract in ../shared/data/README.md.
PUBLISHED = {
    "cnn": {"q_mi": 1.1512, "q_g": 0.7615, "q_y": 0.9875, "q_cb": 0.8084},
    "dwt": {"q_mi": 0.9019, "q_g": 0.7357, "q_y": 0.9545, "q_cb": 0.7362},
}
TOLERANCE = 0.002
METRICS = ("q_mi", "q_g", "q_y", "q_cb")


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------------------------------
# the published means on the 20 Lytro pairs
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lytro_sources(shared_data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(read_png(shared_data / "lytro" / f"lytro_{i:02d}_A.png"),
             read_png(shared_data / "lytro" / f"lytro_{i:02d}_B.png")) for i in range(1, 21)]


@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_published_means_on_lytro(shared_data, lytro_sources, method):
    rows = []
    for i, (a, b) in enumerate(lytro_sources, start=1):
        fused = read_png(shared_data / "lytro_results" / method / f"lytro_{i:02d}.png")
        rows.append(metrics.evaluate([a, b], fused))
    means = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    for m in METRICS:
        assert abs(means[m] - PUBLISHED[method][m]) <= TOLERANCE, (method, m, means)


# ------------------------------------------------------------------------------------------
# committed per-image values on small Lytro crops (no ../shared needed)
# ------------------------------------------------------------------------------------------

def test_committed_crop_values(fixtures):
    # 64x64 crops (rows y..y+63, columns x..x+63) of lytro_NN_A/B.png and the survey's CNN result
    # lytro_results/cnn/lytro_NN.png: lytro04 (y=300, x=160), lytro11 (40, 300; saturated
    # highlights, flat windows), lytro18 (220, 220). Values computed by this module after it
    # reproduced the survey's Table 7 means.
    folder = fixtures / "metrics"
    expected = json.loads((folder / "values.json").read_text())
    assert len(expected) >= 2
    for name, want in expected.items():
        a = read_png(folder / f"{name}_A.png")
        b = read_png(folder / f"{name}_B.png")
        f = read_png(folder / f"{name}_F.png")
        assert a.shape == b.shape == f.shape and a.ndim == 3 and a.dtype == np.uint8
        got = metrics.evaluate([a, b], f)
        got.update(sf=metrics.spatial_frequency(f), ag=metrics.average_gradient(f),
                   entropy=metrics.entropy(f))
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (name, key)


# ------------------------------------------------------------------------------------------
# a literal transcription of the survey's two-source formulas, written independently of the
# module (2-D correlate2d instead of separable filters, fftshift'ed full FFT, per-source code)
# ------------------------------------------------------------------------------------------

def _grey(x):
    return np.floor(x[..., 0] * 0.298936021293775 + x[..., 1] * 0.587043074451121
                    + x[..., 2] * 0.114020904255103 + 0.5)


def _filter2_same(h, x):
    return signal.correlate2d(x, h, mode="same", boundary="fill")


def ref_q_g(a, b, f):
    sx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)
    sy = sx.T

    def grad(x):
        gx, gy = _filter2_same(sx, x), _filter2_same(sy, x)
        g = np.sqrt(gx ** 2 + gy ** 2)
        gx = gx + (gx == 0) * 1e-5
        return g, np.arctan(gy / gx)

    fg, fa = grad(f)
    ag, aa = grad(a)
    bg, ba = grad(b)
    bimap = ag > fg
    ag = ag + (ag == 0) * 1e-5
    b1 = fg / ag
    fg = fg + (fg == 0) * 1e-5
    gaf = bimap * b1 + (1 - bimap) * (ag / fg)
    aaf = 1 - np.abs(aa - fa) * 2 / np.pi
    bimap = bg > fg
    bg = bg + (bg == 0) * 1e-5
    b1 = fg / bg
    fg = fg + (fg == 0) * 1e-5
    gbf = bimap * b1 + (1 - bimap) * (bg / fg)
    abf = 1 - np.abs(ba - fa) * 2 / np.pi
    qaf = 0.9994 / (1 + np.exp(-15 * (gaf - 0.5))) * 0.9879 / (1 + np.exp(-22 * (aaf - 0.8)))
    qbf = 0.9994 / (1 + np.exp(-15 * (gbf - 0.5))) * 0.9879 / (1 + np.exp(-22 * (abf - 0.8)))
    return np.sum(qaf * ag + qbf * bg) / np.sum(ag + bg)


def ref_q_y(a, b, f):
    t = np.arange(-3, 4)
    w = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()

    def ssim(x, y):
        # Two-pass window moments, sum w (x - mu)(y - mu'), exact (to ~1e-27) in flat windows.
        xw = np.lib.stride_tricks.sliding_window_view(x, (7, 7))
        yw = np.lib.stride_tricks.sliding_window_view(y, (7, 7))
        mx, my = (xw * w).sum((2, 3)), (yw * w).sum((2, 3))
        dx, dy = xw - mx[..., None, None], yw - my[..., None, None]
        sx, sy, sxy = (dx * dx * w).sum((2, 3)), (dy * dy * w).sum((2, 3)), (dx * dy * w).sum((2, 3))
        c = 2e-16
        return (2 * mx * my + c) * (2 * sxy + c) / ((mx * mx + my * my + c) * (sx + sy + c)), sx, sy

    sab, va, vb = ssim(a, b)
    saf, _, _ = ssim(a, f)
    sbf, _, _ = ssim(b, f)
    z = (va + vb) < 1e-12  # the survey's guard for sigma_A^2 + sigma_B^2 == 0
    va, vb = np.where(z, 0.5, va), np.where(z, 0.5, vb)
    lam = va / (va + vb)
    q = np.where(sab >= 0.75, lam * saf + (1 - lam) * sbf, np.maximum(saf, sbf))
    return q.mean()


def _normalize1(x):
    return np.floor((x - x.min()) / (x.max() - x.min()) * 255 + 0.5)


def ref_q_mi(a, b, f):
    def mi(x, y):
        h = np.zeros((256, 256))
        np.add.at(h, (x.astype(int).ravel(), y.astype(int).ravel()), 1)
        h /= h.sum()
        ent = lambda p: -np.sum(p * np.log2(p + (p == 0)))  # noqa: E731
        hx, hy = ent(h.sum(1)), ent(h.sum(0))
        return hx + hy - ent(h), hx, hy

    a, b, f = _normalize1(a), _normalize1(b), _normalize1(f)
    i_af, h_a, h_f = mi(a, f)
    i_bf, h_b, _ = mi(b, f)
    return 2 * (i_af / (h_a + h_f) + i_bf / (h_b + h_f))


def ref_q_cb(a, b, f):
    h, w = a.shape
    # MATLAB freqspace([h w], 'meshgrid') scaled by w/30 and h/30.
    u = ((np.arange(w) - w // 2) * (2 / w)) * (w / 30)
    v = ((np.arange(h) - h // 2) * (2 / h)) * (h / 30)
    uu, vv = np.meshgrid(u, v)
    r = np.sqrt(uu ** 2 + vv ** 2)
    sd = np.exp(-(r / 15.3870) ** 2) - 0.7622 * np.exp(-(r / 1.3456) ** 2)
    x, y = np.meshgrid(np.arange(-15, 16), np.arange(-15, 16))
    g1 = np.exp(-(x * x + y * y) / 8) / (2 * np.pi * 4)
    g2 = np.exp(-(x * x + y * y) / 32) / (2 * np.pi * 16)

    def masked(im):
        im = _normalize1(im)
        fim = np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(im)) * sd))
        c = np.abs(_filter2_same(g1, fim) / _filter2_same(g2, fim) - 1)
        return c ** 3 / (c ** 2 + 1e-4)

    ca, cb, cf = masked(a), masked(b), masked(f)
    qaf = np.where(ca < cf, ca / cf, cf / ca)
    qbf = np.where(cb < cf, cb / cf, cf / cb)
    la = ca * ca / (ca * ca + cb * cb)
    lb = cb * cb / (ca * ca + cb * cb)
    return np.mean(la * qaf + lb * qbf)


REFERENCE = {"q_g": ref_q_g, "q_y": ref_q_y, "q_mi": ref_q_mi, "q_cb": ref_q_cb}


def synthetic_pair(h=40, w=52, seed=0, flat_patch=False):
    """A textured scene, each source blurred on one half, and an imperfect fusion (uint8 RGB);
    optionally with a constant patch of a different level in each (flat windows, as in Lytro's
    saturated highlights)."""
    rng = np.random.default_rng(seed)
    scene = ndimage.gaussian_filter(rng.normal(128, 60, (h, w, 3)), (1.0, 1.0, 0))
    blurred = ndimage.gaussian_filter(scene, (2.5, 2.5, 0))
    left = np.zeros((h, w, 1), bool)
    left[:, : w // 2] = True
    a = np.where(left, scene, blurred)
    b = np.where(left, blurred, scene)
    f = 0.8 * scene + 0.2 * blurred + rng.normal(0, 3, scene.shape)
    if flat_patch:
        for x, level in ((a, 255), (b, 240), (f, 250)):
            x[8:30, 10:40] = level
    to8 = lambda x: np.clip(np.rint(x), 0, 255).astype(np.uint8)  # noqa: E731
    return to8(a), to8(b), to8(f)


@pytest.mark.parametrize("flat_patch", [False, True], ids=["textured", "flat-patch"])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_two_sources_equal_the_published_pairwise_formula(name, flat_patch):
    a, b, f = synthetic_pair(flat_patch=flat_patch)
    want = REFERENCE[name](_grey(a.astype(float)), _grey(b.astype(float)), _grey(f.astype(float)))
    got = getattr(metrics, name)([a, b], f)
    # Q_G's per-pixel terms are float32 (integer gradients exact, the rest rounds ~6e-8), for speed.
    tol = 1e-7 if name == "q_g" else 1e-9
    assert got == pytest.approx(want, rel=tol, abs=tol)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_repeating_the_sources_leaves_the_score_unchanged(name):
    # The N-source forms weight every source like the pair does, so (A, B, A, B) scores as (A, B).
    a, b, f = synthetic_pair(seed=1)
    fn = getattr(metrics, name)
    assert fn([a, b, a, b], f) == pytest.approx(fn([a, b], f), rel=1e-9, abs=1e-9)


def test_three_sources_score_a_good_fusion_above_a_poor_one():
    # Source k is defocused on the k-th third of the scene: the all-sharp scene is the ideal
    # fusion, the all-blurred one the worst. (With sources sharp on one third only, Q_MI and
    # Q_Y prefer a fusion equal to the blurred majority: a property of those metrics.)
    rng = np.random.default_rng(2)
    scene = ndimage.gaussian_filter(rng.normal(128, 60, (48, 60)), 1.0)
    blurred = ndimage.gaussian_filter(scene, 3.0)
    cols = np.arange(60)[None, :] // 20
    srcs = [np.where(cols == k, blurred, scene).clip(0, 255).astype(np.uint8) for k in range(3)]
    good = scene.clip(0, 255).astype(np.uint8)
    poor = blurred.clip(0, 255).astype(np.uint8)
    rg, rp = metrics.evaluate(srcs, good), metrics.evaluate(srcs, poor)
    for m in METRICS:
        assert rg[m] > rp[m], m


# ------------------------------------------------------------------------------------------
# known values
# ------------------------------------------------------------------------------------------

def test_identical_sources_and_fusion_score_the_maximum():
    a, _, _ = synthetic_pair(seed=3)
    r = metrics.evaluate([a, a], a)
    assert r["q_mi"] == pytest.approx(2.0, abs=1e-12)
    assert r["q_y"] == pytest.approx(1.0, abs=1e-12)
    assert r["q_cb"] == pytest.approx(1.0, abs=1e-12)
    # Q_G's sigmoids saturate below 1: Gamma_g / (1 + e^{k_g (1 - sigma_g)}) * Gamma_a / (...).
    q_g_max = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert r["q_g"] == pytest.approx(q_g_max, abs=1e-7)  # Q_G's per-pixel terms are float32


def test_flat_windows_have_exactly_zero_variance():
    # Constant regions (saturated highlights, backgrounds) must not turn Q_Y's SSIM structure
    # term (C2 = 2e-16) into round-off noise: with exact zero variances a constant source pair
    # and a constant fusion leave only the luminance term 2 mu_A mu_F / (mu_A^2 + mu_F^2).
    a = np.full((24, 24), 200, np.uint8)
    assert metrics.q_y([a, a], a) == 1.0
    f = np.full((24, 24), 150, np.uint8)
    assert metrics.q_y([a, a], f) == pytest.approx(2 * 200 * 150 / (200 ** 2 + 150 ** 2), rel=1e-12)
    # (textured images with a constant patch: see the flat-patch case of the pairwise test)


def test_q_y_in_bands_of_rows_equals_one_pass(monkeypatch):
    a, b, f = synthetic_pair(h=57, w=44, seed=7, flat_patch=True)
    one_pass = metrics.q_y([a, b, f], f)
    monkeypatch.setattr(metrics, "_QY_BAND_ELEMENTS", 4 * 44 * 5)  # bands of 5 output rows
    assert metrics.q_y([a, b, f], f) == pytest.approx(one_pass, rel=1e-12)


def test_dtypes_share_the_8bit_grey_scale():
    a, b, f = synthetic_pair(seed=4)
    want = metrics.evaluate([a, b], f)
    for conv in (lambda x: x.astype(np.uint16) * 257, lambda x: (x / 255.0).astype(np.float32)):
        got = metrics.evaluate([conv(a), conv(b)], conv(f))
        for m in METRICS:
            assert got[m] == pytest.approx(want[m], abs=1e-12 if m != "q_g" else 1e-9), m
    # grey input equals the rgb2gray of colour input
    grey = [_grey(x.astype(float)).astype(np.uint8) for x in (a, b, f)]
    got = metrics.evaluate(grey[:2], grey[2])
    for m in METRICS:
        # Q_G: float32 terms whose last bit may depend on memory alignment (SIMD vs scalar tails)
        assert got[m] == pytest.approx(want[m], abs=1e-12 if m != "q_g" else 1e-9), m


def test_psnr_and_ssim_against_ground_truth():
    truth = np.full((32, 32, 3), 100, np.uint8)
    img = truth.copy()
    assert metrics.psnr(truth, img) == math.inf
    assert metrics.ssim(truth, img) == pytest.approx(1.0)
    img[..., 0] += 3  # MSE = 9 / 3 = 3 over all pixels and channels
    assert metrics.psnr(truth, img) == pytest.approx(10 * math.log10(255 ** 2 / 3))
    assert metrics.psnr(truth.astype(np.uint16) * 257, img.astype(np.uint16) * 257) \
        == pytest.approx(metrics.psnr(truth, img))
    a, _, f = synthetic_pair(seed=5)
    s = metrics.ssim(a, f)
    assert 0.0 < s < 1.0
    assert metrics.ssim(a.astype(np.float32) / 255, f.astype(np.float32) / 255) \
        == pytest.approx(s, abs=1e-5)
    r = metrics.evaluate([a, a], f, truth=a)
    assert r["psnr"] == pytest.approx(metrics.psnr(a, f)) and r["ssim"] == pytest.approx(s)
    with pytest.raises(ValueError):
        metrics.psnr(truth, img.astype(np.uint16))


def test_single_image_statistics():
    stripes = np.zeros((8, 8), np.uint8)
    stripes[:, 1::2] = 255
    assert metrics.entropy(stripes) == pytest.approx(1.0)
    assert metrics.entropy(np.full((8, 8), 7, np.uint8)) == 0.0
    # every horizontal difference is 255: RF^2 = 7 * 8 * 255^2 / 64, CF = 0
    assert metrics.spatial_frequency(stripes) == pytest.approx(255 * math.sqrt(56 / 64))
    ramp = np.tile(np.arange(0, 80, 10, dtype=np.uint8), (8, 1))  # dx = 10, dy = 0
    assert metrics.average_gradient(ramp) == pytest.approx(10 / math.sqrt(2))
    assert metrics.spatial_frequency(np.dstack([stripes] * 3)) == pytest.approx(
        metrics.spatial_frequency(stripes))


def test_rejects_bad_inputs():
    a, b, f = synthetic_pair()
    with pytest.raises(ValueError):
        metrics.q_g([a], f)
    with pytest.raises(ValueError):
        metrics.q_mi([a, b[:-1]], f)
    assert set(metrics.evaluate([a, b], f)) == set(METRICS)
