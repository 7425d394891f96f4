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


def test_train_checkpoints_to_s3(s3_server, s3_bucket, ray_session, image_folder, tmp_path):
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
