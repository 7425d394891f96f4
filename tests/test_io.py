"""ray_mff.io: round trips per dtype/layout, every typed rejection, atomic writes, S3 through s3fs."""
from __future__ import annotations

import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import tifffile

from ray_mff import io as rio
from ray_mff import storage
from ray_mff.errors import (
    ImageReadError,
    ImageTooLargeError,
    ImageWriteError,
    MFFError,
    NotAnImageError,
    StackMismatchError,
)

RNG = np.random.default_rng(7)


def ramp(shape, dtype):
    """Deterministic image with distinct channel values (catches BGR/RGB and axis mix-ups)."""
    h, w = shape[:2]
    c = shape[2] if len(shape) == 3 else 1
    base = np.arange(h * w * c, dtype=np.float64).reshape(h, w, c) / (h * w * c)
    base += np.arange(c) / (2 * c)  # channel offset
    base = np.mod(base, 1.0)
    if np.dtype(dtype).kind == "f":
        img = base.astype(np.float32)
    else:
        img = np.rint(base * np.iinfo(dtype).max).astype(dtype)
    return img if len(shape) == 3 else img[..., 0]


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", [(17, 23), (17, 23, 3), (17, 23, 4)], ids=["grey", "rgb", "rgba"])
def test_uint8_png_round_trip(tmp_path, shape):
    img = ramp(shape, np.uint8)
    assert rio.default_extension(img) == ".png"
    uri = rio.write_image(tmp_path / "x.png", img)
    with open(uri, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = rio.read_image(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, img)


def test_rgb_channel_order_matches_other_readers(tmp_path):
    """Pure red written by us is red for tifffile/OpenCV conventions too (no BGR leak)."""
    img = np.zeros((4, 5, 3), np.uint8)
    img[..., 0] = 255
    rio.write_image(tmp_path / "red.png", img)
    bgr = cv2.imread(str(tmp_path / "red.png"), cv2.IMREAD_UNCHANGED)
    assert bgr[0, 0].tolist() == [0, 0, 255]
    assert rio.read_image(tmp_path / "red.png")[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((19, 13), np.uint16),
        ((19, 13, 3), np.uint16),
        ((19, 13, 4), np.uint16),
        ((19, 13), np.float32),
        ((19, 13, 3), np.float32),
        ((19, 13, 2), np.uint8),
        ((19, 13, 5), np.uint16),
    ],
    ids=["u16-grey", "u16-rgb", "u16-rgba", "f32-grey", "f32-rgb", "u8-2ch", "u16-5ch"],
)
def test_tiff_round_trip(tmp_path, shape, dtype):
    img = ramp(shape, dtype)
    assert rio.default_extension(img) == ".tif"
    path = tmp_path / ("x" + rio.default_extension(img))
    rio.write_image(path, img)
    out = rio.read_image(path)
    assert out.dtype == img.dtype and out.shape == img.shape
    np.testing.assert_array_equal(out, img)


def test_float32_values_beyond_unit_range_survive(tmp_path):
    img = np.array([[-1.5, 0.0], [0.25, 1e6]], np.float32)
    rio.write_image(tmp_path / "f.tif", img)
    np.testing.assert_array_equal(rio.read_image(tmp_path / "f.tif"), img)


def test_multichannel_is_stored_as_planar_cyx(tmp_path):
    img = ramp((11, 7, 5), np.uint16)
    rio.write_image(tmp_path / "m.tif", img)
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        series = tif.series[0]
        assert series.shape == (5, 11, 7)
        stored = series.asarray()
    np.testing.assert_array_equal(stored, img.transpose(2, 0, 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metadata": {"axes": "CYX"}},
        {"imagej": True, "metadata": {"axes": "CYX"}},
        {"photometric": "minisblack", "planarconfig": "separate"},
        {},  # plain multi-page, no axes metadata
    ],
    ids=["shaped-cyx", "imagej-cyx", "planar-samples", "multipage"],
)
def test_reads_microscopy_cyx_tiff_as_hwc(tmp_path, kwargs):
    chw = ramp((5, 9, 6), np.uint16).reshape(9, 6, 5).transpose(2, 0, 1).copy()  # (C=5, H=9, W=6)
    tifffile.imwrite(tmp_path / "c.tif", chw, **kwargs)
    out = rio.read_image(tmp_path / "c.tif")
    assert out.shape == (9, 6, 5)
    np.testing.assert_array_equal(out, chw.transpose(1, 2, 0))


def test_reads_contiguous_rgb_tiff_written_elsewhere(tmp_path):
    img = ramp((8, 10, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", img, photometric="rgb")
    np.testing.assert_array_equal(rio.read_image(tmp_path / "rgb.tiff"), img)


def test_uint16_png_when_asked_and_tiff_when_forced(tmp_path):
    img = ramp((6, 9, 3), np.uint16)
    rio.write_image(tmp_path / "a.png", img)
    np.testing.assert_array_equal(rio.read_image(tmp_path / "a.png"), img)
    rio.write_image(tmp_path / "b", img, fmt="tiff")
    assert rio.image_shape(tmp_path / "b").format == "tiff"
    np.testing.assert_array_equal(rio.read_image(tmp_path / "b"), img)


@pytest.mark.parametrize("shape", [(32, 40), (32, 40, 3)], ids=["grey", "rgb"])
def test_jpeg_round_trip_is_close(tmp_path, shape):
    img = cv2.GaussianBlur(ramp(shape, np.uint8), (5, 5), 2)
    rio.write_image(tmp_path / "x.jpg", img)
    out = rio.read_image(tmp_path / "x.jpg")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 4


def test_format_sniffed_from_content_not_name(tmp_path):
    img = ramp((5, 6, 3), np.uint8)
    (tmp_path / "really_a_png.jpg").write_bytes(rio.encode_image(img, "png"))
    np.testing.assert_array_equal(rio.read_image(tmp_path / "really_a_png.jpg"), img)


def test_image_shape_reads_header_only(tmp_path, monkeypatch):
    rio.write_image(tmp_path / "a.png", ramp((12, 34, 4), np.uint8))
    rio.write_image(tmp_path / "b.jpg", ramp((12, 34, 3), np.uint8))
    rio.write_image(tmp_path / "c.tif", ramp((12, 34, 5), np.uint16))
    monkeypatch.setattr(rio.cv2, "imdecode", lambda *a: pytest.fail("image_shape decoded pixels"))
    assert rio.image_shape(tmp_path / "a.png") == ("png", 12, 34, 4)
    assert rio.image_shape(tmp_path / "b.jpg") == ("jpeg", 12, 34, 3)
    assert rio.image_shape(tmp_path / "c.tif") == ("tiff", 12, 34, 5)


def test_file_uri(tmp_path):
    img = ramp((3, 4), np.uint8)
    rio.write_image(f"file://{tmp_path}/u.png", img)
    np.testing.assert_array_equal(rio.read_image(f"file://{tmp_path}/u.png"), img)


# --------------------------------------------------------------------------- rejections


def assert_names(err: MFFError, path, *words):
    assert str(err).startswith(str(path) + ": ")
    for w in words:
        assert w in err.reason.lower(), err.reason


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError) as e:
        rio.read_image(tmp_path / "nope.png")
    assert_names(e.value, tmp_path / "nope.png", "no such file")
    assert e.value.kind == "unreadable"


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ImageReadError) as e:
        rio.read_image(tmp_path / "d.png")
    assert str(e.value).startswith(str(tmp_path / "d.png"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path):
    p = tmp_path / "locked.png"
    rio.write_image(p, ramp((3, 3), np.uint8))
    p.chmod(0)
    with pytest.raises(ImageReadError) as e:
        rio.read_image(p)
    assert_names(e.value, p, "permission")


@pytest.mark.parametrize("shape,dtype", [((40, 50, 3), np.uint8), ((40, 50), np.uint16)])
def test_truncated_png(tmp_path, shape, dtype):
    data = rio.encode_image(RNG.integers(0, 255, shape).astype(dtype), "png")
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as e:
        rio.read_image(p)
    assert type(e.value) is ImageReadError
    assert_names(e.value, p, "truncated png")


def test_png_missing_only_iend_is_truncated(tmp_path):
    data = rio.encode_image(ramp((8, 8), np.uint8), "png")
    p = tmp_path / "noend.png"
    p.write_bytes(data[:-12])
    with pytest.raises(ImageReadError, match="truncated PNG"):
        rio.read_image(p)


def test_png_with_corrupt_pixel_data(tmp_path):
    """Structurally complete PNG whose IDAT is garbage: the decoder's None becomes a typed error."""
    data = bytearray(rio.encode_image(RNG.integers(0, 255, (30, 30, 3)).astype(np.uint8), "png"))
    idat = data.index(b"IDAT")
    for i in range(idat + 6, idat + 60):
        data[i] ^= 0x5A
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageReadError) as e:
        rio.read_image(p)
    assert_names(e.value, p, "corrupt png")


def test_truncated_jpeg(tmp_path):
    data = rio.encode_image(RNG.integers(0, 255, (64, 64, 3)).astype(np.uint8), "jpeg")
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as e:
        rio.read_image(p)
    assert_names(e.value, p, "truncated jpeg")


@pytest.mark.parametrize("cut", [0.5, 0.05], ids=["in-pixels", "in-header"])
def test_truncated_tiff(tmp_path, cut):
    img = RNG.integers(0, 65535, (64, 64)).astype(np.uint16)
    rio.write_image(tmp_path / "whole.tif", img)
    data = (tmp_path / "whole.tif").read_bytes()
    # Uncompressed too: a short strip must not come back zero-filled.
    tifffile.imwrite(tmp_path / "raw.tif", img)
    raw = (tmp_path / "raw.tif").read_bytes()
    for name, blob in (("cut.tif", data), ("rawcut.tif", raw)):
        p = tmp_path / name
        p.write_bytes(blob[: int(len(blob) * cut)])
        with pytest.raises(ImageReadError) as e:
            rio.read_image(p)
        assert type(e.value) is ImageReadError
        assert str(e.value).startswith(str(p) + ": ")


def test_random_bytes_named_png(tmp_path):
    p = tmp_path / "noise.png"
    p.write_bytes(RNG.integers(0, 256, 4096).astype(np.uint8).tobytes())
    with pytest.raises(NotAnImageError) as e:
        rio.read_image(p)
    assert_names(e.value, p, "not png, jpeg or tiff", ".png")
    assert e.value.kind == "not_an_image"


def test_text_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("focus stack notes\n")
    with pytest.raises(NotAnImageError) as e:
        rio.read_image(p)
    assert_names(e.value, p, "not an image file", ".txt")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError) as e:
        rio.read_image(p)
    assert_names(e.value, p, "empty")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tiff"])
def test_pixel_limit_checked_before_decoding(tmp_path, monkeypatch, fmt):
    img = ramp((40, 50, 3), np.uint8)
    p = tmp_path / f"big.{fmt}"
    p.write_bytes(rio.encode_image(img, fmt))
    np.testing.assert_equal(rio.read_image(p, max_pixels=2000).shape, img.shape)  # exactly at the limit
    monkeypatch.setattr(rio.cv2, "imdecode", lambda *a: pytest.fail("decoded before the pixel check"))
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", lambda *a, **k: pytest.fail("decoded"), raising=False)
    with pytest.raises(ImageTooLargeError) as e:
        rio.read_image(p, max_pixels=1999)
    assert_names(e.value, p, "50x40", "1999")
    assert e.value.kind == "too_large"


def test_decompression_bomb_header(tmp_path):
    """A 100000 x 100000 PNG header over a few bytes of data is refused from IHDR alone."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb)
    with pytest.raises(ImageTooLargeError):
        rio.read_image(p)
    assert rio.image_shape(p)[1:3] == (100_000, 100_000)


def test_z_series_tiff_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((4, 8, 8), np.uint8), photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(ImageReadError, match="a stack of its own"):
        rio.read_image(tmp_path / "z.tif")


def test_palette_tiff_is_refused(tmp_path):
    colormap = np.zeros((3, 256), np.uint16)
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((4, 4), np.uint8), photometric="palette", colormap=colormap)
    with pytest.raises(ImageReadError, match="palette"):
        rio.read_image(tmp_path / "p.tif")


def test_unsupported_tiff_dtype(tmp_path):
    tifffile.imwrite(tmp_path / "i32.tif", np.zeros((4, 4), np.int32))
    with pytest.raises(ImageReadError, match="int32"):
        rio.read_image(tmp_path / "i32.tif")


def test_errors_survive_pickling(tmp_path):
    import pickle

    with pytest.raises(ImageReadError) as e:
        rio.read_image(tmp_path / "nope.png")
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is ImageReadError and str(again) == str(e.value)


# --------------------------------------------------------------------------- read_stack


def test_read_stack_ok(tmp_path):
    uris = [rio.write_image(tmp_path / f"s_{i}.png", ramp((9, 9, 3), np.uint8)) for i in range(3)]
    imgs = rio.read_stack(uris)
    assert len(imgs) == 3 and all(i.shape == (9, 9, 3) for i in imgs)


@pytest.mark.parametrize(
    "other,what",
    [
        (ramp((9, 10, 3), np.uint8), "size"),
        (ramp((9, 9), np.uint8), "channel count"),
        (ramp((9, 9, 4), np.uint8), "channel count"),
        (ramp((9, 9, 3), np.uint16), "bit depth"),
    ],
    ids=["size", "grey-vs-rgb", "rgba-vs-rgb", "bit-depth"],
)
def test_read_stack_mismatch(tmp_path, other, what):
    a = rio.write_image(tmp_path / "a.png", ramp((9, 9, 3), np.uint8))
    b = rio.write_image(tmp_path / "b.png", ramp((9, 9, 3), np.uint8))
    c = rio.write_image(tmp_path / ("c" + rio.default_extension(other)), other)
    with pytest.raises(StackMismatchError) as e:
        rio.read_stack([a, b, c])
    err = e.value
    assert err.uri == c and what in err.reason
    assert str(a) in err.reason  # names the reference member too
    assert "9x9, 3 channels, uint8" in err.reason  # both descriptions


def test_check_stack_on_arrays():
    a, b = ramp((4, 4), np.uint8), ramp((4, 4), np.uint16)
    rio.check_stack([a, a.copy()], ["image[0]", "image[1]"])
    with pytest.raises(StackMismatchError) as e:
        rio.check_stack([a, a, b], ["image[0]", "image[1]", "image[2]"])
    assert str(e.value).startswith("image[2]: bit depth differs")


def test_read_stack_passes_read_errors_through(tmp_path):
    a = rio.write_image(tmp_path / "a.png", ramp((9, 9), np.uint8))
    with pytest.raises(ImageReadError) as e:
        rio.read_stack([a, tmp_path / "missing.png"])
    assert e.value.uri == str(tmp_path / "missing.png")


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize(
    "name,img,why",
    [
        ("f.png", ramp((4, 4), np.float32), "png"),
        ("m.png", ramp((4, 4, 5), np.uint8), "png"),
        ("j.jpg", ramp((4, 4), np.uint16), "jpeg"),
        ("j.jpeg", ramp((4, 4, 4), np.uint8), "jpeg"),
        ("d.tif", np.zeros((4, 4), np.float64), "dtype"),
        ("x.bmp", ramp((4, 4), np.uint8), "extension"),
    ],
)
def test_write_rejections_leave_no_file(tmp_path, name, img, why):
    with pytest.raises(ImageWriteError) as e:
        rio.write_image(tmp_path / name, img)
    assert_names(e.value, tmp_path / name, why)
    assert files_in(tmp_path) == []


def test_fmt_contradicting_extension(tmp_path):
    with pytest.raises(ImageWriteError, match="contradicts"):
        rio.write_image(tmp_path / "x.png", ramp((4, 4), np.uint8), fmt="tiff")


def test_atomic_write_cleans_up_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    old = ramp((5, 5), np.uint8)
    rio.write_image(target, old)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(ImageWriteError, match="disk full"):
        rio.write_image(target, ramp((5, 5, 3), np.uint8))
    monkeypatch.undo()
    assert files_in(tmp_path) == ["out.png"]  # no temp file left behind
    np.testing.assert_array_equal(rio.read_image(target), old)  # old content intact


def test_atomic_write_cleans_up_when_the_encoder_fails(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ValueError("encoder exploded")

    monkeypatch.setattr(rio, "encode_image", broken)
    with pytest.raises(ImageWriteError, match="encoder exploded"):
        rio.write_image(tmp_path / "sub" / "x.png", ramp((5, 5), np.uint8))
    assert not (tmp_path / "sub").exists() or files_in(tmp_path / "sub") == []


def test_write_creates_parent_folders_and_respects_umask(tmp_path):
    p = tmp_path / "a" / "b" / "c.png"
    rio.write_image(p, ramp((3, 3), np.uint8))
    assert p.is_file()
    mode = p.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


# --------------------------------------------------------------------------- S3 through s3fs (moto server)


def test_s3_read_and_write(s3_server, s3_bucket, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    rgb = ramp((12, 10, 3), np.uint8)
    client.put_object(Bucket=s3_bucket, Key="in/a.png", Body=rio.encode_image(rgb, "png"))

    uri = f"s3://{s3_bucket}/in/a.png"
    np.testing.assert_array_equal(rio.read_image(uri, s3_endpoint=s3_server), rgb)
    assert rio.image_shape(uri, s3_endpoint=s3_server) == ("png", 12, 10, 3)

    u16 = ramp((7, 9, 5), np.uint16)
    out = f"s3://{s3_bucket}/out/deep/m.tif"
    rio.write_image(out, u16, s3_endpoint=s3_server)
    body = client.get_object(Bucket=s3_bucket, Key="out/deep/m.tif")["Body"].read()
    np.testing.assert_array_equal(rio.decode_image(body), u16)
    assert storage.exists(out, s3_endpoint=s3_server)

    # The endpoint override AWS tools honour, without passing it explicitly.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    np.testing.assert_array_equal(rio.read_image(out), u16)

    with pytest.raises(ImageReadError) as e:
        rio.read_image(f"s3://{s3_bucket}/in/missing.png")
    assert_names(e.value, f"s3://{s3_bucket}/in/missing.png", "no such file")

    client.put_object(Bucket=s3_bucket, Key="in/cut.png", Body=rio.encode_image(rgb, "png")[:100])
    with pytest.raises(ImageReadError, match="truncated PNG"):
        rio.read_image(f"s3://{s3_bucket}/in/cut.png")
