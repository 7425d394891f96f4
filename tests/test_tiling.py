"""Tiling: partition of unity, crops within the tile budget, tiled == untiled (local fusers and cascade)."""
from __future__ import annotations

import numpy as np
import pytest

from ray_mff.fusion.decision import fuse_with_weights
from ray_mff.fusion.focus_measure import laplacian_energy
from ray_mff.fusion.luminance import luminance
from ray_mff.fusion.result import FusionResult
from ray_mff.tiling import TiledFuser, blend_window, split_axis


class LocalFocusFuser:
    """Stand-in weights-producing fuser whose weights depend on a 7x7 neighbourhood only:
    soft-max of Laplacian energy (so tiling must reproduce it exactly inside the margins)."""

    name = "local"

    def __init__(self):
        self.calls = []

    def fuse(self, images):
        self.calls.append(images[0].shape[:2])
        focus = np.stack([laplacian_energy(luminance(i), window=7) for i in images], axis=-1)
        z = focus / (focus.max(axis=-1, keepdims=True) + 1e-6) * 8.0
        w = np.exp(z - z.max(axis=-1, keepdims=True))
        w = (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)
        return FusionResult(fused=fuse_with_weights(images, w), weights=w, method=self.name, stats={"engine": "numpy"})


def _stack(h, w, n=3, dtype=np.uint8, channels=3, seed=0):
    """A synthetic focus stack: one textured scene, each source sharp in a different vertical band."""
    import cv2

    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.random((h, w, channels)).astype(np.float32), (0, 0), 1.0)
    base = (base - base.min()) / (base.max() - base.min())
    blurred = cv2.GaussianBlur(base, (0, 0), 4.0).reshape(base.shape)
    scale = np.iinfo(dtype).max
    out = []
    for k in range(n):
        img = blurred.copy()
        band = slice(k * w // n, (k + 1) * w // n)
        img[:, band] = base[:, band]
        out.append(np.clip(np.rint(img * scale), 0, scale).astype(dtype))
    return out


@pytest.mark.parametrize("n,tile,margin,feather,align", [(1500, 512, 64, 32, 32), (3001, 1024, 96, 32, 32),
                                                         (700, 300, 40, 20, 4), (4000, 1024, 96, 64, 1)])
def test_split_axis_covers_and_respects_the_budget(n, tile, margin, feather, align):
    segs = split_axis(n, tile, margin, feather, align)
    assert len(segs) > 1
    assert segs[0].core[0] == 0 and segs[-1].core[1] == n
    total = np.zeros(n)
    for i, s in enumerate(segs):
        assert s.crop[1] - s.crop[0] <= tile
        assert s.crop[0] % align == 0
        assert s.crop[1] == n or (s.crop[1] - s.crop[0]) % align == 0
        assert s.crop[0] <= s.support[0] and s.support[1] <= s.crop[1]
        if i > 0:  # context on the cut side
            assert s.support[0] - s.crop[0] >= margin and segs[i - 1].core[1] == s.core[0]
        if i < len(segs) - 1:
            assert s.crop[1] - s.support[1] >= margin
        total[s.support[0]:s.support[1]] += blend_window(s, i > 0, i < len(segs) - 1, feather)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)  # partition of unity: no seam


def test_small_images_pass_through_untouched():
    inner = LocalFocusFuser()
    images = _stack(100, 120)
    res = TiledFuser(inner, tile_size=256, margin=32, feather=16).fuse(images)
    assert inner.calls == [(100, 120)]
    big = _stack(500, 300)  # up to twice the tile size per side: fused whole by default
    TiledFuser(inner, tile_size=256, margin=32, feather=16).fuse(big)
    assert inner.calls[-1] == (500, 300)
    assert "tiles" not in res.stats


@pytest.mark.parametrize("dtype,channels", [(np.uint8, 3), (np.uint16, 1)])
def test_tiled_equals_untiled_for_a_local_fuser(dtype, channels):
    images = _stack(1500, 1300, n=3, dtype=dtype, channels=channels)
    whole = LocalFocusFuser().fuse(images)
    inner = LocalFocusFuser()
    tiled = TiledFuser(inner, tile_size=512, margin=32, feather=32, untiled_max_side=512).fuse(images)
    assert max(max(c) for c in inner.calls) <= 512
    assert tiled.stats["tiles"] == len(inner.calls) > 4
    assert tiled.fused.dtype == dtype and tiled.fused.shape == images[0].shape
    np.testing.assert_allclose(tiled.weights, whole.weights, atol=1e-5)
    np.testing.assert_allclose(tiled.weights.sum(-1), 1.0, atol=1e-5)
    diff = np.abs(tiled.fused.astype(np.int64) - whole.fused.astype(np.int64)).max()
    assert diff <= 1
    assert np.array_equal(tiled.index_map, whole.index_map)


def test_above_the_weights_budget_only_the_index_map_is_kept():
    images = _stack(700, 650, n=3)
    whole = LocalFocusFuser().fuse(images)
    tiled = TiledFuser(LocalFocusFuser(), tile_size=256, margin=32, feather=16, weights_budget=1000,
                       untiled_max_side=256).fuse(images)
    assert tiled.weights is None
    assert tiled.index_map.shape == (700, 650) and tiled.index_map.dtype == np.uint16
    assert (tiled.index_map == whole.index_map).mean() > 0.999
    assert np.abs(tiled.fused.astype(int) - whole.fused.astype(int)).max() <= 1


def test_fusers_without_weights_are_blended_on_pixels():
    class Mean:
        name = "mean"

        def fuse(self, images):
            f = np.mean([i.astype(np.float32) for i in images], axis=0)
            return FusionResult(fused=np.rint(f).astype(images[0].dtype), weights=None, method="mean")

    images = _stack(600, 500, n=2)
    tiled = TiledFuser(Mean(), tile_size=256, margin=16, feather=16, untiled_max_side=256).fuse(images)
    ref = Mean().fuse(images).fused
    assert np.abs(tiled.fused.astype(int) - ref.astype(int)).max() <= 1


def test_cascade_tiled_matches_untiled(tmp_path, monkeypatch):
    """The real model through ModelFuser + ONNX Runtime, 3 images (calibrated per tile), an odd width
    (padded at the image end): tiled vs untiled within 1 grey level (8-bit) and the same weights up to
    float round-off, because the network is local and its receptive field (+-117 px) fits the margin."""
    import torch

    monkeypatch.setenv("RAY_MFF_CACHE", str(tmp_path))
    from ray_mff.engines import make_engine
    from ray_mff.fusion.model_fuser import ModelFuser
    from ray_mff.models import default_weights_path, get_model

    torch.manual_seed(0)
    weights = "default" if default_weights_path("cascade").is_file() else None
    net = get_model("cascade", weights=weights)
    fuser = ModelFuser(make_engine("cascade", engine="onnx", model=net))
    images = _stack(700, 403, n=3)  # 5 tiles of at most 512 rows, one column
    whole = fuser.fuse(images)
    tiled = TiledFuser(fuser, tile_size=512, margin=128, feather=32, untiled_max_side=512).fuse(images)
    assert tiled.stats["tiles"] == 5
    diff = np.abs(tiled.fused.astype(int) - whole.fused.astype(int))
    dw = np.abs(tiled.weights - whole.weights).max()
    print("cascade tiled vs untiled: max", diff.max(), "pixels > 1:", int((diff > 1).sum()), "max weight diff", dw)
    assert diff.max() <= 1
    assert dw < 1e-3


def test_get_fuser_tiles_learned_models_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_MFF_CACHE", str(tmp_path))
    from ray_mff.methods import get_fuser
    from ray_mff.tiling import DEFAULT_TILE_SIZE

    fuser = get_fuser("cascade", engine="onnx", weights=None)
    assert isinstance(fuser, TiledFuser) and fuser.tile_size == DEFAULT_TILE_SIZE
    assert fuser.untiled_max_side == 2 * DEFAULT_TILE_SIZE  # camera stacks (e.g. 1600 x 1200) fuse whole
    assert fuser.name == "cascade" and fuser.engine.name == "onnxruntime-cpu"
    res = fuser.fuse(_stack(64, 48, n=2))
    assert res.stats["engine"] == "onnxruntime-cpu" and "tiles" not in res.stats
    assert not isinstance(get_fuser("cascade", engine="onnx", weights=None, tile_size=0), TiledFuser)
    assert not isinstance(get_fuser("guided"), TiledFuser)
    assert isinstance(get_fuser("guided", tile_size=512), TiledFuser)
