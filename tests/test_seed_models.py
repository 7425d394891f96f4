"""The other seed methods (issue 6): ssim, mscnn, cnn train (loss falls), export to ONNX (ONNX
Runtime agrees with torch), and fuse N-image stacks through the same fuser API as the default model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_mff.models import build_model, get_model, list_models
from ray_mff.train.objectives import blur_levels, blurred_patch_pairs, objective_for

SEED_MODELS = ("ssim", "mscnn", "cnn")


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: band-limited random texture (every window has structure)."""
    import cv2

    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random((h, w), dtype=np.float32), (0, 0), 1.2)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def _synthetic_stack(h: int = 64, w: int = 72, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """A 3-image colour stack: image k is sharp in the k-th vertical band, blurred elsewhere.
    Returns (uint8 images, index map of the sharp source)."""
    import cv2

    sharp = np.stack([_texture(h, w, seed + c) for c in range(3)], axis=-1)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3.0)
    truth = np.minimum(np.arange(w) * 3 // w, 2)[None, :].repeat(h, axis=0)
    images = []
    for k in range(3):
        m = (truth == k)[..., None]
        images.append(np.clip(np.rint((m * sharp + (~m) * blurred) * 255), 0, 255).astype(np.uint8))
    return images, truth


def test_registered_and_small():
    assert set(SEED_MODELS) <= set(list_models())
    for name in SEED_MODELS:
        net = build_model(name)
        n_params = sum(p.numel() for p in net.parameters())
        assert n_params * 4 < 2 * 1024 * 1024, f"{name}: {n_params} parameters is over 2 MB"
        assert net.registry_name == name and objective_for(net).name == net.training_objective


def test_blur_levels_follow_liu():
    x = _texture(40, 40, 1)
    levels = blur_levels(x)
    assert len(levels) == 5
    sharpness = [float(np.abs(np.diff(v, axis=1)).mean()) for v in [x, *levels]]
    assert all(a > b for a, b in zip(sharpness, sharpness[1:]))  # each application blurs more
    batch = blurred_patch_pairs([np.uint8(x * 255)] * 2, np.random.default_rng(0), patch=32, per_image=4)
    assert batch["y_a"].shape == (8, 1, 32, 32) and set(np.unique(batch["label"])) <= {0.0, 1.0}


@pytest.mark.parametrize("name", SEED_MODELS)
def test_loss_falls(name):
    """A few Adam steps on one fixed batch of the model's own objective (no Ray): the loss falls."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = build_model(name)
    objective = objective_for(net)
    images = [np.uint8(_texture(96, 96, s) * 255) for s in range(3)]
    cfg = {"patch": 32 if name == "cnn" else 48, "patches_per_image": 4, "qg_weight": 1.0}
    batch = {k: torch.from_numpy(v) for k, v in objective.make_batch(images, np.random.default_rng(0), cfg).items()}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        terms = objective.loss(net, batch, cfg)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert np.isfinite(losses).all()
    assert min(losses[-3:]) < losses[0], f"{name}: loss did not fall: {losses}"


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    from ray_mff.export import export_model

    out = {}
    for name in SEED_MODELS:
        torch.manual_seed(1)
        net = build_model(name).eval()
        paths = export_model(net, tmp_path_factory.mktemp(name), "fp32", name=name, verify=False)
        out[name] = (net, paths)
    return out


@pytest.mark.parametrize("name", SEED_MODELS)
def test_onnx_matches_torch(name, onnx_exports):
    from ray_mff.engines.onnx_engine import OnnxEngine
    from ray_mff.engines.torch_engine import TorchEngine

    net, paths = onnx_exports[name]
    ort = OnnxEngine(paths["encoder"], paths["decider"], stride=net.stride, threads=1)
    ref = TorchEngine(net)
    ya, yb = _texture(45, 58, 3), _texture(45, 58, 4)  # odd sizes: the stride-2 model pads
    y = np.stack([ya, yb])[:, None]
    yp = np.pad(y, ((0, 0), (0, 0), (0, 45 % net.stride), (0, 58 % net.stride)), mode="edge")
    ft, fo = ref.encode(yp), ort.encode(y)
    np.testing.assert_allclose(fo, ft, atol=1e-4)
    dt = ref.decide(ft[:1], ft[1:], yp[:1], yp[1:])[..., :45, :58]
    do = ort.decide(fo[:1], fo[1:], y[:1], y[1:])
    assert do.shape == (1, 1, 45, 58)
    np.testing.assert_allclose(do, dt, atol=1e-4)


@pytest.mark.parametrize("name", SEED_MODELS)
@pytest.mark.parametrize("calibration", [True, False])
def test_fuse_three_image_stack(name, calibration, onnx_exports):
    """A synthetic 3-image colour stack fuses through ModelFuser (ONNX Runtime engine); with the
    shipped weights the fused image is closer to the all-sharp truth than any source."""
    from ray_mff.engines import make_engine
    from ray_mff.fusion.model_fuser import ModelFuser

    images, truth = _synthetic_stack()
    net, _ = onnx_exports[name]
    engine = make_engine(name, engine="onnx", model=net, threads=1)
    result = ModelFuser(engine, calibration=calibration).fuse(images)
    assert result.fused.shape == images[0].shape and result.fused.dtype == np.uint8
    assert result.weights.shape == (64, 72, 3)
    np.testing.assert_allclose(result.weights.sum(axis=-1), 1.0, atol=1e-4)
    expected = "calibrated" if calibration and net.output != "fused" else "serial"
    assert result.stats["calibration"] == expected
    assert result.stats["output"] == net.output


@pytest.mark.parametrize("name", SEED_MODELS)
def test_shipped_weights_fuse_a_stack(name):
    """The shipped weights choose the sharp source of a synthetic 3-image stack on most pixels."""
    from ray_mff.models import default_weights_path
    from ray_mff.methods import get_fuser

    if not default_weights_path(name).is_file():
        pytest.skip(f"no shipped weights for {name} yet")
    images, truth = _synthetic_stack(96, 120)
    result = get_fuser(name, engine="torch").fuse(images)
    sharp_share = float((result.index_map == truth).mean())
    assert sharp_share > 0.7, f"{name}: sharp source chosen on {sharp_share:.0%} of pixels"
    assert get_model(name).weights_metadata["model"] == name


@pytest.mark.timeout(300)
def test_trainer_picks_the_model_objective(ray_session, tmp_path):
    """``jobs/train.py --model cnn`` runs the one Ray Train loop with the cnn's own data and loss
    (clear/blurred patch pairs, cross-entropy) and exports loadable safetensors weights."""
    import cv2

    from ray_mff.models import read_metadata
    from ray_mff.train.trainer import run_training

    for i in range(4):
        cv2.imwrite(str(tmp_path / f"img_{i}.png"), np.uint8(_texture(80, 80, 10 + i) * 255))
    out = run_training({
        "model": "cnn", "data": str(tmp_path), "val_data": str(tmp_path), "val_pairs": 2, "steps": 4,
        "batch_size": 2, "patch": 16, "lr": 1e-3, "warmup_steps": 1, "report_every": 2, "checkpoint_every": 4,
        "num_workers": 1, "storage_path": str(tmp_path / "runs"), "name": "cnn_tiny",
        "export": str(tmp_path / "cnn.safetensors"),
    })
    assert {"bce", "accuracy", "val_bce"} <= set(out["metrics"])
    assert read_metadata(out["weights"])["model"] == "cnn"
    assert get_model("cnn", weights=out["weights"]).output == "focus"
