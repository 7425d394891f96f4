"""Ray Train end to end on CPU: 2 workers, loss falls, checkpoints on local disk and S3, resume.

Tiny on purpose (a handful of steps on 40-pixel patches of a few synthetic images): it checks the
plumbing (DDP over gloo, Ray Data shards, reports, checkpoints, restoration, export), not quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ray_mff.models import get_model, read_metadata

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Four all-in-focus 'natural' images: smoothed noise with edges at several scales."""
    import cv2

    root = tmp_path_factory.mktemp("train_images")
    rng = np.random.default_rng(0)
    for i in range(4):
        x = sum(cv2.GaussianBlur(rng.random((96, 96, 3)).astype(np.float32), (0, 0), s) * s for s in (0.5, 2, 6))
        x = (x - x.min()) / (x.max() - x.min())
        cv2.imwrite(str(root / f"img_{i}.png"), (x * 255).astype(np.uint8))
    return root


def _config(image_folder: Path, storage: str, name: str, steps: int, **kw) -> dict:
    return {
        "data": str(image_folder), "val_data": str(image_folder), "val_pairs": 4,
        "model_config": {"stem": 8, "growth": 4, "layers": 2, "features": 8, "width": 8,
                         "context_width": 8, "context_dilations": [1, 2]},
        "steps": steps, "batch_size": 2, "patch": 40, "lr": 5e-3, "warmup_steps": 1,
        "report_every": steps // 2, "checkpoint_every": steps // 2, "repeat": 4,
        "num_workers": 2, "storage_path": storage, "name": name, **kw,
    }


def test_train_checkpoints_locally_resumes_and_exports(ray_session, image_folder, tmp_path):
    from ray_mff.train.trainer import run_training

    first = run_training(_config(image_folder, str(tmp_path / "runs"), "tiny", steps=8))
    m1 = first["metrics"]
    assert m1["step"] == 8 and m1["resumed_from"] == 0
    assert {"loss", "dice", "qg_loss", "val_loss", "val_dice", "val_qg_loss"} <= set(m1)
    ckpts = sorted((tmp_path / "runs" / "tiny").glob("checkpoint_0*"))
    assert ckpts and (ckpts[-1] / "model.safetensors").is_file()
    assert json.loads((ckpts[-1] / "state.json").read_text())["step"] == 8

    # the same name and storage path: a restarted run resumes from step 8 and carries on to 24
    second = run_training(_config(image_folder, str(tmp_path / "runs"), "tiny", steps=24))
    m2 = second["metrics"]
    assert m2["resumed_from"] == 8 and m2["step"] == 24
    assert m2["loss"] < m1["loss"]  # training loss window after resuming is below the first one
    assert m2["best_val"] <= m1["val_loss"]

    # exported best weights: the shipped format, loadable through the registry
    weights = Path(second["weights"])
    assert weights.is_file() and read_metadata(weights)["model"] == "cascade"
    net = get_model("cascade", weights=weights)
    assert net.config()["features"] == 8


def test_train_checkpoints_to_s3(ray_s3, s3_bucket, image_folder, tmp_path):
    s3_server = ray_s3  # Ray workers that see the dummy credentials, whichever test started Ray
    import boto3

    from ray_mff.train.trainer import run_training

    out = run_training(_config(image_folder, f"s3://{s3_bucket}/runs", "tiny_s3", steps=4, val_data=None,
                               s3_endpoint=s3_server, export=str(tmp_path / "tiny.safetensors")))
    assert out["metrics"]["step"] == 4
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=s3_bucket, Prefix="runs/tiny_s3/")["Contents"]]
    assert any(k.endswith("/model.safetensors") and "/checkpoint_" in k for k in keys)
    assert (tmp_path / "tiny.safetensors").is_file()


def test_batches_made_in_dataloader_workers_equal_the_inline_ones(image_folder):
    """Decoding and synthesis off the training loop: 2 worker processes give the very batches the
    loop made inline (step s, rank r always draws from default_rng([seed, s, r])), in step order,
    for any generator of the make_batch(images, rng, cfg) form."""
    from ray_mff.train.loader import synthetic_batches

    uris = sorted(str(p) for p in image_folder.glob("*.png"))
    steps = [(s, [uris[s % 4], uris[(s + 1) % 4]]) for s in range(5)]
    cfg = {"seed": 3, "patch": 32}

    def crops(images, rng, cfg):  # any generator: random crops and a random flag
        y, x = rng.integers(0, 96 - cfg["patch"], 2)
        stack = np.stack([im[y:y + cfg["patch"], x:x + cfg["patch"], 0] for im in images]).astype(np.float32)
        return {"crops": stack, "flag": rng.random(1).astype(np.float32)}

    inline = list(synthetic_batches(iter(steps), crops, cfg, rank=1, workers=0))
    ahead = list(synthetic_batches(iter(steps), crops, cfg, rank=1, workers=2, prefetch=2))
    assert [s for s, _ in ahead] == [s for s, _ in inline] == list(range(5))
    for (_, a), (_, b) in zip(inline, ahead):
        assert set(a) == {"crops", "flag"} and a["crops"].shape == (2, 32, 32)
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


# --------------------------------------------------------------------------- fine-tuning one branch


def _stack_batch(seed: int = 0) -> dict:
    import torch

    from ray_mff.train.synthetic_stacks import make_batch

    rng = np.random.default_rng(seed)
    images = [(rng.random((96, 96, 3)) * 255).astype(np.uint8) for _ in range(2)]
    return {k: torch.from_numpy(v) for k, v in make_batch(images, rng, patch=32, n=3).items()}


def test_stack_loss_weights_reach_the_loss():
    """cfg["loss_weights"] sets the weights of stack_truth_loss's terms; the rest keep their defaults."""
    import torch

    from ray_mff.models import build_model
    from ray_mff.train.objectives import OBJECTIVES

    torch.manual_seed(0)
    net, batch, objective = build_model("stacknet_s"), _stack_batch(), OBJECTIVES["stack_truth"]
    with torch.no_grad():
        t = objective.loss(net, batch, {})
        default = t["fused_l1"] + 0.5 * t["blend_l1"] + t["grad"] + 0.05 * t["dice"]
        assert torch.allclose(t["loss"], default)
        only_mse = objective.loss(net, batch, {"loss_weights": {"fused": 0, "blend": 0, "grad": 0, "dice": 0,
                                                                "mse": 1}})
        assert torch.allclose(only_mse["loss"], t["mse"]) and t["mse"] > 0
        no_grad_term = objective.loss(net, batch, {"loss_weights": {"grad": 0.0, "blend": 2.0}})
        assert torch.allclose(no_grad_term["loss"], t["fused_l1"] + 2.0 * t["blend_l1"] + 0.05 * t["dice"])
    # fused psnr from the fused result, blend_psnr from the selection alone
    assert {"psnr", "blend_psnr", "mse"} <= set(t)
    with pytest.raises(ValueError, match="no loss term gradient"):
        objective.check_loss_weights({"gradient": 0.0})
    with pytest.raises(ValueError, match="fixed weights"):
        OBJECTIVES["gradient_aware"].check_loss_weights({"dice": 1.0})


def test_loss_weights_and_train_only_on_the_command_line():
    import argparse

    from ray_mff.train.trainer import add_train_arguments, config_from_args

    parser = add_train_arguments(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args(["--train-only", "fused_net, head2", "--loss-weights",
                                              "fused=0,mse=1.5"]))
    assert cfg["train_only"] == ["fused_net", "head2"] and cfg["loss_weights"] == {"fused": 0.0, "mse": 1.5}
    for bad in ("mse", "mse=x", "=1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--loss-weights", bad])


def test_freeze_except_counts_and_rejects_a_prefix_that_matches_nothing():
    from ray_mff.models import build_model
    from ray_mff.train.trainer import freeze_except

    net = build_model("stacknet_s")
    trainable, total = freeze_except(net, ["fused_net"])
    assert trainable == sum(p.numel() for p in net.fused_net.parameters()) and 0 < trainable < total
    assert all(p.requires_grad == n.startswith("fused_net") for n, p in net.named_parameters())
    assert freeze_except(net, None) == (trainable, total)  # no prefixes: nothing changes
    with pytest.raises(ValueError, match="fused_nett.*matches no parameter"):
        freeze_except(net, ["fused_nett"])


def test_train_only_fine_tunes_one_branch_and_leaves_the_rest_bit_identical(ray_session, image_folder, tmp_path):
    """Through Ray Train: start from saved weights, train only the fused-result branch with the
    squared error alone; the exported weights differ from the start in that branch only, and
    the reported loss is the squared error."""
    import torch

    from ray_mff.models import build_model, load_weights, save_weights
    from ray_mff.train.trainer import run_training

    torch.manual_seed(1)
    start = tmp_path / "start.safetensors"
    save_weights(build_model("stacknet_s"), start, name="stacknet_s")
    out = run_training({"data": str(image_folder), "val_data": str(image_folder), "val_pairs": 2,
                        "model": "stacknet_s", "init_weights": str(start), "train_only": ["fused_net"],
                        "loss_weights": {"fused": 0, "blend": 0, "grad": 0, "dice": 0, "mse": 1},
                        "steps": 2, "batch_size": 2, "patch": 32, "lr": 1e-2, "warmup_steps": 1,
                        "report_every": 2, "checkpoint_every": 2, "num_workers": 1,
                        "storage_path": str(tmp_path / "runs"), "name": "branch"})
    m = out["metrics"]
    assert m["step"] == 2 and m["loss"] == pytest.approx(m["mse"]) and m["val_loss"] == pytest.approx(m["val_mse"])
    before, after = load_weights(start).state_dict(), load_weights(out["weights"]).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("fused_net.") for k in changed)
    assert changed == {k for k in before if k.startswith("fused_net.")}

    with pytest.raises(ValueError, match="matches no parameter"):  # a typo fails on the driver, before Ray
        run_training({"data": str(image_folder), "model": "stacknet_s", "train_only": ["fusednet"]})


def test_sensor_noise_options_reach_the_training_stacks():
    """cfg["photons"] / cfg["read_noise"] set the stack_truth data's noise: on a smooth picture
    (where defocus changes little) the sources sit closer to the truth with more photons and no
    read noise; unset, the data is the default's."""
    from ray_mff.train.objectives import OBJECTIVES
    from ray_mff.train.synthetic_stacks import make_batch

    ramp = np.linspace(40, 200, 96, dtype=np.float32)
    img = np.repeat((ramp[None, :] + 0.3 * ramp[:, None])[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)
    make = OBJECTIVES["stack_truth"].make_batch

    def error(b):
        return float(np.abs(b["stack"][:, :, 0] - b["truth"]).mean())

    default = make([img], np.random.default_rng(4), {"patch": 48})
    assert all(np.array_equal(default[k], make_batch([img], np.random.default_rng(4), 48)[k]) for k in default)
    noisy = make([img], np.random.default_rng(4), {"patch": 48, "photons": [30, 30], "read_noise": 0.03})
    clean = make([img], np.random.default_rng(4), {"patch": 48, "photons": [1e6, 1e6], "read_noise": 0.0})
    assert error(clean) < 0.2 * error(noisy)
