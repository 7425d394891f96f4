"""Stacks as microscopes and remote-sensing archives store them: single-file z-stacks (ImageJ,
OME-TIFF, plain multi-page), OME-Zarr (local and S3), metadata carried through, GeoTIFF tags,
depth maps, lazy planes that stream through fusion and tiling."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data
import tifffile

from ray_mff import cli, io, storage
from ray_mff.fusion.guided import fuse_guided
from ray_mff.metadata import PhysicalMetadata, from_tiff
from ray_mff.metrics import psnr
from ray_mff.omezarr import read_ngff, write_ome_zarr
from ray_mff.planes import ArrayPlanes
from ray_mff.synthetic import render_focus_stack

N, SIZE = 4, 96


@pytest.fixture(scope="module")
def stacks():
    """Two channels' focus stacks (uint16, N planes) with their all-in-focus truths."""
    out = []
    for seed, picture in ((1, skimage.data.camera()), (2, skimage.data.moon())):
        small = cv2.resize(picture, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        planes, truth, _ = render_focus_stack(small, N, seed=seed, dtype=np.uint16, max_radius=6.0)
        out.append((np.stack(planes), truth))
    return out


def _fuse(inp: Path, out: Path, *extra: str) -> pd.DataFrame:
    code = cli.main(["fuse", str(inp), str(out), "--method", "guided", "--executor", "local", *extra])
    assert code == 0
    return pd.read_parquet(out / "manifest.parquet").set_index("stack_id")


def test_single_file_layouts_fuse_like_separate_files(stacks, tmp_path: Path):
    (z0, t0), (z1, t1) = stacks
    inp = tmp_path / "in"
    inp.mkdir()
    # the same stacks as folders of separate files: the reference
    for c, z in enumerate((z0, z1)):
        (inp / f"files_c{c}").mkdir()
        for k, plane in enumerate(z):
            tifffile.imwrite(inp / f"files_c{c}" / f"p_{k}.tif", plane)
    (inp / "ij").mkdir()  # a sub-folder holding one file: that file is the stack
    tifffile.imwrite(inp / "ij" / "stack.tif", z0, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "um"})
    zcyx = np.stack([z0, z1], axis=1)
    ome = {"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm",
           "PhysicalSizeZ": 2.0, "Channel": {"Name": ["DAPI", "GFP"]}}
    tifffile.imwrite(inp / "zc.ome.tif", zcyx, ome=True, metadata={"axes": "ZCYX", **ome})
    tifffile.imwrite(inp / "tzc.ome.tif", np.stack([zcyx, zcyx[:, ::-1]]), ome=True, metadata={"axes": "TZCYX", **ome})
    (inp / "plain").mkdir()
    tifffile.imwrite(inp / "plain" / "pages.tif", z1, photometric="minisblack", metadata=None)
    write_ome_zarr(str(inp / "zarr.ome.zarr"), np.stack([z0, z1]), "CZYX",
                   PhysicalMetadata((0.5, 0.5), "µm", 3.0, ("DAPI", "GFP")), chunk=64)

    rows = _fuse(inp, tmp_path / "out", "--depth-map")
    assert (rows.status == "ok").all(), rows.error.dropna().tolist()
    ref = {c: psnr(t, io.read_image(rows.loc[f"files_c{c}", "output_uri"])) for c, t in enumerate((t0, t1))}
    assert min(ref.values()) > 30

    def check_psnr(fused_plane, c):
        assert fused_plane.dtype == np.uint16
        assert psnr((t0, t1)[c], fused_plane) == pytest.approx(ref[c], abs=1e-9)

    with tifffile.TiffFile(rows.loc["ij", "output_uri"]) as tif:  # ImageJ ZYX -> ImageJ YX
        assert tif.is_imagej and tif.series[0].axes == "YX"
        meta = from_tiff(tif)
        assert meta.pixel_size == (0.5, 0.5) and meta.unit == "µm" and meta.z_spacing == 1.5
        check_psnr(tif.asarray(), 0)
    assert rows.loc["ij", "n_images"] == N and rows.loc["ij", "pixel_size_x"] == 0.5
    assert rows.loc["ij", "pixel_unit"] == "µm" and rows.loc["ij", "pixel_size_z"] == 1.5

    with tifffile.TiffFile(rows.loc["zc", "output_uri"]) as tif:  # OME ZCYX -> OME CYX, one plane per channel
        assert tif.is_ome and tif.series[0].axes == "CYX" and rows.loc["zc", "output_uri"].endswith(".ome.tif")
        meta = from_tiff(tif)
        assert meta.pixel_size == (0.25, 0.25) and meta.channel_names == ("DAPI", "GFP")
        fused = tif.asarray()
        check_psnr(fused[0], 0)
        check_psnr(fused[1], 1)

    with tifffile.TiffFile(rows.loc["tzc", "output_uri"]) as tif:  # TZCYX -> TCYX
        assert tif.series[0].axes == "TCYX" and tif.series[0].shape == (2, 2, SIZE, SIZE)
        fused = tif.asarray()
        check_psnr(fused[0, 0], 0)
        check_psnr(fused[1, 0], 1)  # T 1 holds the channels swapped
        check_psnr(fused[1, 1], 0)

    # plain multi-page: pages taken as Z, and the row says so
    assert "read as focal planes (Z)" in rows.loc["plain", "warning"] and "--z-axis none" in rows.loc["plain", "warning"]
    check_psnr(io.read_image(rows.loc["plain", "output_uri"]), 1)

    arr, axes, meta = read_ngff(rows.loc["zarr", "output_uri"])  # OME-Zarr -> OME-Zarr
    assert axes == "CYX" and arr.dtype == np.uint16 and meta.pixel_size == (0.5, 0.5)
    assert meta.channel_names == ("DAPI", "GFP") and rows.loc["zarr", "pixel_size_z"] == 3.0
    check_psnr(arr[0], 0)
    check_psnr(arr[1], 1)

    # depth maps: plane index (uint16), height where z spacing is known, colour preview
    depth = tifffile.imread(rows.loc["ij", "depth_map_uri"])
    assert depth.dtype == np.uint16 and depth.shape == (SIZE, SIZE) and depth.max() < N and depth.max() > 0
    height = tifffile.imread(str(tmp_path / "out" / "ij_height.tif"))
    assert height.dtype == np.float32 and np.array_equal(height, depth * np.float32(1.5))
    assert io.read_image(str(tmp_path / "out" / "ij_depth.png")).shape == (SIZE, SIZE, 3)
    assert tifffile.imread(rows.loc["tzc", "depth_map_uri"]).shape == (2, 2, SIZE, SIZE)
    assert not (tmp_path / "out" / "plain_height.tif").exists()  # no z spacing, no height


def test_z_axis_choices(stacks, tmp_path: Path):
    z = stacks[0][0]
    inp = tmp_path / "in"
    (inp / "a").mkdir(parents=True)
    tifffile.imwrite(inp / "a" / "pages.tif", z, photometric="minisblack", metadata=None)
    rows = _fuse(inp, tmp_path / "none", "--z-axis", "none")  # the pages are channels of one image
    assert rows.loc["a", "channels"] == N and "passed through" in rows.loc["a", "warning"]
    out = cli.main(["fuse", str(inp), str(tmp_path / "bad"), "--method", "guided", "--z-axis", "T"])
    assert out == 1
    row = pd.read_parquet(tmp_path / "bad" / "manifest.parquet").iloc[0]
    assert "pages.tif" in row.error and "--z-axis T" in row.error and "choose one of" in row.error


def test_geotiff_tags_survive_fusion(stacks, tmp_path: Path):
    z = stacks[0][0]
    geo = [(33550, 12, 3, (10.0, 10.0, 0.0)), (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0)),
           (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)),
           (34736, 12, 1, (0.0,)), (34737, 2, 0, "WGS 84 / UTM zone 33N|"), (42113, 2, 0, "0")]
    (tmp_path / "in" / "scene").mkdir(parents=True)
    for k, plane in enumerate(z[:2]):
        tifffile.imwrite(tmp_path / "in" / "scene" / f"band_{k}.tif", plane, extratags=[(*g, True) for g in geo],
                         resolution=(10.0, 10.0), resolutionunit="CENTIMETER")
    rows = _fuse(tmp_path / "in", tmp_path / "out")
    assert rows.loc["scene", "pixel_size_x"] == pytest.approx(0.1) and rows.loc["scene", "pixel_unit"] == "cm"
    with tifffile.TiffFile(rows.loc["scene", "output_uri"]) as tif:
        tags = tif.pages.first.tags
        assert tags["XResolution"].value == (10, 1) and tags["ResolutionUnit"].value == 3  # 10 px/cm kept
        for code, _, _, value in geo:
            got = tags[code].value
            assert (got == value) if isinstance(value, str) else np.allclose(got, value), code
        assert tif.pages.first.geotiff_tags["ProjectedCSTypeGeoKey"] == 32633


def test_ome_zarr_on_s3(stacks, tmp_path: Path, s3_server, s3_bucket, monkeypatch):
    (z0, t0), _ = stacks
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    write_ome_zarr(f"s3://{s3_bucket}/in/plate.zarr/A/1/0", z0[None], "CZYX", PhysicalMetadata((0.5, 0.5), "µm"))
    write_ome_zarr(f"s3://{s3_bucket}/in/plate.zarr/A/2/0", z0[None, ::-1], "CZYX", PhysicalMetadata((0.5, 0.5), "µm"))
    try:
        code = cli.main(["fuse", f"s3://{s3_bucket}/in", str(tmp_path / "out"), "--method", "guided",
                         "--s3-endpoint", s3_server, "--format", "ome-tiff"])
    finally:
        storage.set_s3_endpoint(None)  # --s3-endpoint sets the process-wide default
    assert code == 0
    rows = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("stack_id")
    assert sorted(rows.index) == ["plate__A__1__0", "plate__A__2__0"]
    for sid in rows.index:
        with tifffile.TiffFile(rows.loc[sid, "output_uri"]) as tif:
            assert tif.is_ome and from_tiff(tif).pixel_size == (0.5, 0.5)  # C of size 1: tifffile squeezes it
            assert psnr(t0, tif.asarray().reshape(SIZE, SIZE)) > 30
    # and written back to S3 as OME-Zarr with a pyramid
    write_ome_zarr(f"s3://{s3_bucket}/out/f.ome.zarr", np.zeros((600, 520), np.uint16), "YX")
    arr, axes, _ = read_ngff(f"s3://{s3_bucket}/out/f.ome.zarr")
    assert axes == "YX" and arr.shape == (600, 520) and arr.chunks == (256, 256)


def test_pyramid_levels_and_atomic_local_write(tmp_path: Path):
    import zarr

    data = np.arange(3 * 600 * 520, dtype=np.uint16).reshape(3, 600, 520)
    uri = str(tmp_path / "x.ome.zarr")
    write_ome_zarr(uri, data, "CYX", PhysicalMetadata((0.2, 0.2), "µm", None, ("a", "b", "c")))
    group = zarr.open_group(uri, mode="r")
    ms = group.attrs["multiscales"][0]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    assert ms["datasets"][2]["coordinateTransformations"][0]["scale"] == [1.0, 0.8, 0.8]
    assert group["2"].shape == (3, 150, 130)
    assert np.array_equal(group["0"][:], data)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_vendor_format_without_bioio_is_a_clear_error(tmp_path: Path):
    try:  # bioio is an optional extra; this checks the error when it is absent
        import bioio  # noqa: F401
        pytest.skip("bioio installed")
    except ImportError:
        pass
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.czi").write_bytes(b"ZISRAWFILE" + bytes(100))
    assert cli.main(["fuse", str(tmp_path / "in"), str(tmp_path / "out"), "--method", "guided"]) == 1
    row = pd.read_parquet(tmp_path / "out" / "manifest.parquet").iloc[0]
    assert "scan.czi" in row.error and "ray-mff[vendor]" in row.error


class _CountingPlanes(ArrayPlanes):
    """ArrayPlanes recording every read: (plane, window rows, window cols)."""

    def __init__(self, arr, axes):
        super().__init__(arr, axes)
        self.reads = []

    def _read(self, k):
        self.reads.append((k, self.shape[0], self.shape[1]))
        return super()._read(k)

    def _read_window(self, k, window):
        self.reads.append((k, window[1] - window[0], window[3] - window[2]))
        return super()._read_window(k, window)


def test_lazy_planes_stream_through_guided_and_tiles(stacks):
    from ray_mff.methods import get_fuser
    from ray_mff.tiling import TiledFuser

    z = np.concatenate([stacks[0][0], stacks[1][0]])  # 8 planes
    planes = _CountingPlanes(z, "ZYX")
    lazy = fuse_guided(planes)
    whole = fuse_guided(list(z))
    assert np.array_equal(lazy.fused, whole.fused)
    assert len(planes.reads) <= 3 * len(z)  # focus measure, guide, blend: each plane read at most 3 times
    # tiled: each tile reads only its window of each plane, never a whole plane
    planes.reads.clear()
    tiled = TiledFuser(get_fuser("guided"), tile_size=64, margin=8, feather=8, align=8,
                       untiled_max_side=64).fuse(planes)
    assert tiled.fused.shape == (SIZE, SIZE) and planes.reads
    assert max(h * w for _, h, w in planes.reads[1:]) < SIZE * SIZE


def test_calibrator_as_weight_source_matches_full_weights(stacks):
    from ray_mff.fusion.calibration import DecisionCalibrator
    from ray_mff.fusion.decision import fuse_with_weights

    z = stacks[0][0]
    rng = np.random.default_rng(0)
    cal = DecisionCalibrator(N, 1, (SIZE, SIZE))
    cal.add_reference(rng.random((SIZE, SIZE), dtype=np.float32))
    for k in (0, 2, 3):
        cal.add(k, rng.random((SIZE, SIZE), dtype=np.float32), rng.random((SIZE, SIZE), dtype=np.float32))
    full = cal.weights()
    for k in range(N):
        wk = cal.weight(k)
        assert np.array_equal(full[..., k], np.zeros_like(full[..., k]) if wk is None else wk)
    assert np.array_equal(fuse_with_weights(ArrayPlanes(z, "ZYX"), cal), fuse_with_weights(list(z), full))


def test_default_model_accepts_lazy_planes(stacks, monkeypatch):
    """The learned default fuses a lazy sequence as it fuses arrays; above the weights budget it
    streams its weights from the calibrator (same fused image, index map instead of weights)."""
    from ray_mff.fusion import decision
    from ray_mff.methods import get_fuser

    z = stacks[0][0]
    fuser = get_fuser("cascade", engine="onnx")
    whole = fuser.fuse(list(z))
    lazy = fuser.fuse(ArrayPlanes(z, "ZYX"))
    assert np.array_equal(lazy.fused, whole.fused) and lazy.weights.shape == (SIZE, SIZE, N)
    monkeypatch.setattr(decision, "FULL_WEIGHTS_MAX_BYTES", 0)
    streamed = fuser.fuse(ArrayPlanes(z, "ZYX"))
    assert streamed.weights is None and np.array_equal(streamed.fused, whole.fused)
    assert np.array_equal(streamed.index_map, whole.index_map)


def test_discovery_of_single_file_stacks(tmp_path: Path):
    from ray_mff.stacks import discover_stacks

    for rel in ("cells.ome.tif", "scan.czi", "planes/x_z001.ome.tif", "planes/x_z002.ome.tif",
                "multi/a.tif", "multi/b.tif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    write_ome_zarr(str(tmp_path / "plate.zarr" / "B" / "3" / "0"), np.zeros((2, 8, 8), np.uint8), "ZYX")
    write_ome_zarr(str(tmp_path / "img.ome.zarr"), np.zeros((2, 8, 8), np.uint8), "ZYX")
    found = {s.id: len(s.uris) for s in discover_stacks(tmp_path)}
    # one plane per .ome.tif (a z-plane name) still groups by pattern; a folder of files is one stack
    assert found == {"cells": 1, "scan": 1, "planes": 2, "multi": 2, "plate__B__3__0": 1, "img": 1}
    per_file = {s.id for s in discover_stacks(tmp_path / "multi", stack_per_file=True)}
    assert per_file == {"a", "b"}
