"""The local CLI end to end, as a user runs it: good and bad stacks, the manifest, reruns."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ray_mff
from ray_mff import cli, io
from ray_mff.synthetic import render_focus_stack


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((h // 8, w // 8, 3))
    import cv2

    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC) + 0.15 * rng.random((h, w, 3))
    return np.clip(img / img.max(), 0, 1)


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    """A flat folder and sub-folders mixing good stacks with every kind of bad one."""
    root = tmp_path / "in"
    root.mkdir()
    stack, _, _ = render_focus_stack(_texture(96, 128, 1), 2, seed=1, dtype=np.uint8)
    io.write_image(str(root / "pair_A.png"), stack[0])
    io.write_image(str(root / "pair_B.png"), stack[1])
    deep = root / "deep16"
    deep.mkdir()
    stack16, _, _ = render_focus_stack(_texture(80, 96, 2)[..., 0], 3, seed=2, dtype=np.uint16)
    for i, img in enumerate(stack16):
        io.write_image(str(deep / f"deep_z{i:03d}.tif"), img)
    # a truncated PNG: the bytes of a real one cut in half
    good = (root / "pair_A.png").read_bytes()
    (root / "broken_A.png").write_bytes(good[: len(good) // 2])
    (root / "broken_B.png").write_bytes((root / "pair_B.png").read_bytes())
    # members of different sizes
    io.write_image(str(root / "mismatch_A.png"), stack[0])
    io.write_image(str(root / "mismatch_B.png"), stack[1][:64, :64])
    # a non-image claiming a focal plane
    io.write_image(str(root / "text_A.png"), stack[0])
    (root / "text_B.png").write_text("this is not an image")
    # a one-image stack and an empty stack folder
    io.write_image(str(root / "single_A.png"), stack[0])
    (root / "empty").mkdir()
    return root


def _manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet")


def test_fuse_archive_with_bad_stacks(archive: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    code = cli.main(["fuse", str(archive), str(out), "--method", "guided", "--executor", "local"])
    assert code == 1  # some stacks failed: the exit code says so
    df = _manifest(out)
    assert df["stack_id"].is_unique
    by_id = df.set_index("stack_id")
    ok = set(df.loc[df.status == "ok", "stack_id"])
    assert {"pair", "single"} <= ok and any("deep" in s for s in ok)
    # each bad stack is an error row naming its file and the reason
    assert "broken_A.png" in by_id.loc["broken", "error"]
    assert "mismatch_B.png" in by_id.loc["mismatch", "error"]
    assert "text_B.png" in by_id.loc["text", "error"]
    errors = df[df.status == "error"]
    assert len(errors) == 4  # broken, mismatch, text, empty
    assert errors["error"].notna().all()
    # good stacks: outputs of the right type, dtype kept end to end
    pair = by_id.loc["pair"]
    assert pair["output_uri"].endswith("pair.png") and pair["dtype"] == "uint8"
    assert pair["q_g"] > 0.3 and pair["n_images"] == 2
    deep = df[df.stack_id.str.contains("deep")].iloc[0]
    assert deep["output_uri"].endswith(".tif")
    fused16 = io.read_image(deep["output_uri"])
    assert fused16.dtype == np.uint16 and fused16.shape == (80, 96)
    assert "passed through" in by_id.loc["single", "warning"]
    # nothing half-written: only finished images and the manifest in OUTPUT
    leftovers = [p for p in out.rglob("*") if p.is_file() and (p.name.startswith(".") or "tmp" in p.name)]
    assert leftovers == []
    printed = capsys.readouterr().out
    assert "failed" in printed and "broken_A.png" in printed


def test_rerun_does_only_what_is_missing(archive: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ["fuse", str(archive), str(out), "--method", "guided", "--executor", "local", "--no-metrics"]
    cli.main(args)
    first = _manifest(out)
    # second run: everything is done (known failures on unchanged inputs are not repeated)
    cli.main(args)
    assert len(_manifest(out)) == len(first)
    # lose one output: the rerun redoes exactly that stack
    os.remove(out / "pair.png")
    cli.main(args)
    df = _manifest(out)
    assert len(df) == len(first) + 1
    assert (out / "pair.png").is_file()
    # fix a bad stack: the rerun notices the changed input and fuses it
    (archive / "text_B.png").unlink()
    io.write_image(str(archive / "text_B.png"), io.read_image(str(archive / "pair_B.png")))
    cli.main(args)
    latest = ray_mff.manifest.latest_rows(str(out))
    assert latest["text"]["status"] == "ok"
    # --force redoes every stack
    n_before = len(_manifest(out))
    cli.main(args + ["--force"])
    assert len(_manifest(out)) == n_before + len(first)


def test_eval_prints_table_and_json(archive: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    cli.main(["fuse", str(archive), str(out), "--method", "dwt", "--executor", "local", "--no-metrics"])
    capsys.readouterr()
    assert cli.main(["eval", str(archive), str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    scored = {r["stack_id"]: r for r in report["stacks"] if "error" not in r}
    assert "pair" in scored and 0 < scored["pair"]["q_g"] <= 1
    assert report["mean"]["q_y"] > 0.5
    cli.main(["eval", str(archive), str(out)])
    assert "MEAN" in capsys.readouterr().out
    # decision maps share the fused images' stems (decision_maps/<stack>.png): eval must not score them
    means = []
    for name, extra in (("plain", []), ("maps", ["--save-decision-maps"])):
        cli.main(["fuse", str(archive), str(tmp_path / name), "--method", "guided", "--executor", "local",
                  "--no-metrics", *extra])
        capsys.readouterr()
        assert cli.main(["eval", str(archive), str(tmp_path / name), "--json"]) == 0
        means.append(json.loads(capsys.readouterr().out)["mean"])
    assert any((tmp_path / "maps" / "decision_maps").iterdir())
    assert {k: v for k, v in means[1].items() if k != "stack_id"} == pytest.approx(
        {k: v for k, v in means[0].items() if k != "stack_id"}, rel=1e-9)


def test_python_api_matches_cli(tmp_path: Path):
    stack, truth, _ = render_focus_stack(_texture(64, 80, 3), 3, seed=3, dtype=np.uint8)
    result = ray_mff.fuse_stack(stack, method="guided")
    assert result.fused.shape == truth.shape and result.fused.dtype == np.uint8
    assert result.weights.shape == (64, 80, 3)
    assert result.index_map.max() <= 2
    paths = []
    for i, img in enumerate(stack):
        paths.append(str(tmp_path / f"s_{i}.png"))
        io.write_image(paths[-1], img)
    from_files = ray_mff.fuse_stack(paths, method="guided")
    np.testing.assert_array_equal(from_files.fused, result.fused)


def test_cli_help_and_unknown_method(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fuse", "--help"])
    assert exc.value.code == 0
    assert "--method" in capsys.readouterr().out
    (tmp_path / "in").mkdir()
    io.write_image(str(tmp_path / "in" / "x_A.png"), np.zeros((8, 8), np.uint8))
    io.write_image(str(tmp_path / "in" / "x_B.png"), np.zeros((8, 8), np.uint8))
    code = cli.main(["fuse", str(tmp_path / "in"), str(tmp_path / "out"), "--method", "nope"])
    assert code == 2 and "unknown method" in capsys.readouterr().err


def test_guided_on_lytro_through_the_cli(shared_data: Path, tmp_path: Path):
    """Acceptance: `ray-mff fuse` on the 20 Lytro pairs with --method guided scores mean Q_G >= 0.750."""
    out = tmp_path / "lytro"
    code = cli.main(["fuse", str(shared_data / "lytro"), str(out), "--method", "guided", "--executor", "local"])
    assert code == 0
    df = _manifest(out)
    assert len(df) == 20 and (df.status == "ok").all()
    assert df.q_g.mean() >= 0.750


def test_tile_size_option_and_decision_maps(tmp_path: Path):
    """--tile-size reaches the fuser (here a classical one, tiled on request) and decision maps are written."""
    root = tmp_path / "in"
    root.mkdir()
    stack, truth, _ = render_focus_stack(_texture(400, 900, 5), 3, seed=5, dtype=np.uint8)
    for i, img in enumerate(stack):
        io.write_image(str(root / f"big_z{i:03d}.png"), img)
    out_tiled, out_whole = tmp_path / "tiled", tmp_path / "whole"
    common = ["--method", "guided", "--executor", "local", "--no-metrics", "--save-decision-maps"]
    assert cli.main(["fuse", str(root), str(out_tiled), "--tile-size", "384", *common]) == 0
    assert cli.main(["fuse", str(root), str(out_whole), *common]) == 0
    row = _manifest(out_tiled).iloc[0]
    dmap = io.read_image(row["decision_map_uri"])
    assert dmap.shape == (400, 900) and dmap.dtype == np.uint8 and set(np.unique(dmap)) <= {0, 127, 128, 255}
    tiled, whole = io.read_image(row["output_uri"]), io.read_image(str(out_whole / "big.png"))
    assert tiled.shape == whole.shape == truth.shape
    assert np.abs(tiled.astype(int) - whole.astype(int)).mean() < 1.0  # same fusion, seams blended away


def test_decision_map_picture_from_index_only_result():
    from ray_mff.fusion.result import FusionResult
    from ray_mff.sinks import decision_map_image as _decision_map_image

    class IndexOnly(FusionResult):  # what a huge tiled result carries: no (H, W, N) weights
        @property
        def index_map(self):
            return np.array([[0, 1], [1, 0]], np.uint16)

    pic = _decision_map_image(IndexOnly(np.zeros((2, 2), np.uint8), None, "cascade"), 2)
    np.testing.assert_array_equal(pic, [[255, 0], [0, 255]])


def test_fuse_with_weights_file_local_and_s3(tmp_path: Path, s3_server: str, s3_bucket: str, monkeypatch, capsys):
    """`--weights` fuses with a trained file (local or s3://, fetched once into the cache), is part of
    the recipe (other weights re-fuse), and a wrong file is a setup error (exit 2) naming it."""
    import boto3
    import torch

    from ray_mff.models import build_model, save_weights

    monkeypatch.setenv("RAY_MFF_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "in"
    src.mkdir()
    stack, _, _ = render_focus_stack(_texture(64, 80, 5), 2, seed=5, dtype=np.uint8)
    io.write_image(str(src / "p_A.png"), stack[0])
    io.write_image(str(src / "p_B.png"), stack[1])
    torch.manual_seed(0)
    w1, w2 = tmp_path / "w1.safetensors", tmp_path / "w2.safetensors"
    save_weights(build_model("ssim"), w1)
    save_weights(build_model("ssim"), w2)
    out = tmp_path / "out"
    base = ["fuse", str(src), str(out), "--method", "ssim", "--executor", "local", "--no-metrics"]
    assert cli.main(base + ["--weights", str(w1)]) == 0
    first = (out / "p.png").read_bytes()
    assert cli.main(base + ["--weights", str(w1)]) == 0  # same recipe: nothing to do
    assert "0 fused, 1 skipped" in capsys.readouterr().out
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(w2), s3_bucket, "models/w2.safetensors")
    uri = f"s3://{s3_bucket}/models/w2.safetensors"
    assert cli.main(base + ["--weights", uri, "--s3-endpoint", s3_server]) == 0  # new weights: new recipe
    assert "1 fused" in capsys.readouterr().out
    assert (out / "p.png").read_bytes() != first
    assert len(list((tmp_path / "cache" / "weights").glob("*.safetensors"))) == 1
    for bad, why in ([str(tmp_path / "missing.safetensors"), "no weights file"],
                     [str(w1), "not 'cascade'"]):
        args = base + ["--weights", bad]
        if why.startswith("not"):
            args[args.index("ssim")] = "cascade"
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert bad in err and why in err and "Traceback" not in err
    assert cli.main(["fuse", str(src), str(out), "--method", "guided", "--weights", str(w1)]) == 2
    assert "classical" in capsys.readouterr().err
