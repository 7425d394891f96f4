"""The one image reader/writer: bytes <-> numpy arrays, dtype preserved, every rejection typed.

Arrays are ``(H, W)`` (grey) or ``(H, W, C)``: RGB/RGBA in RGB order, other channel counts as
stored (microscopy ``C x H x W`` TIFFs are transposed to ``H x W x C``). dtype is kept:
uint8, uint16 and float32 (float16/float64 TIFF samples are widened/narrowed to float32).

Decoders, and why:

- PNG and JPEG: OpenCV ``cv2.imdecode(..., IMREAD_UNCHANGED)``. It keeps 16-bit PNG (grey *and*
  RGB/RGBA) as uint16, where Pillow reduces 16-bit RGB to 8 bits; it is already a dependency,
  and it is the faster decoder. UNCHANGED also means EXIF orientation is *not* applied, which
  is what registered focus stacks need (every member keeps the stored pixel grid).
  OpenCV returns BGR(A); we flip to RGB(A).
- TIFF: tifffile, which understands multi-page/planar/ImageJ/OME layouts through its *series*
  (``axes`` such as ``YX``, ``YXS``, ``CYX``, ``SYX``) and float samples.

Before any pixel is decoded the header is parsed by hand (PNG IHDR, JPEG SOF, TIFF IFDs via
tifffile without reading strips) and checked against ``max_pixels``: a decompression-bomb guard.
The byte structure is then validated, because decoders can hand back a silently partial image:
PNG chunks must run to IEND, JPEG entropy data must end in EOI, TIFF strips/tiles must lie
inside the file.

Example::

    >>> img = read_image("tests/fixtures/x.png")            # doctest: +SKIP
    >>> write_image("out/x" + default_extension(img), img)  # doctest: +SKIP
"""
from __future__ import annotations

import io as _io
import os
import struct
from collections.abc import Sequence
from typing import BinaryIO, NamedTuple

# OpenCV has its own decode limit (2**30 pixels by default) read once at import; our own guard
# below replaces it, so lift it unless the user set it (only effective if cv2 is not yet imported).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 40))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from . import storage  # noqa: E402
from .errors import (  # noqa: E402
    ImageReadError,
    ImageTooLargeError,
    ImageWriteError,
    NotAnImageError,
    StackMismatchError,
    EmptyStackError,
)

DEFAULT_MAX_PIXELS = 1_000_000_000
"""Default decompression-bomb limit on H*W (a 31623 x 31623 image). Pass ``max_pixels=None`` to disable."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""File extensions (case-insensitive) treated as images by discovery and by :func:`write_image`."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_FORMAT_BY_EXT = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff"}
_FMT_ALIASES = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "tif": "tiff", "tiff": "tiff"}
_SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


class ImageHeader(NamedTuple):
    """What the header says, without decoding pixels."""

    format: str  # "png" | "jpeg" | "tiff"
    height: int
    width: int
    # Channels as the file stores them. read_image may expand PNG: grey+alpha (2) and palette or
    # RGB with a transparency chunk decode to RGBA (4), as OpenCV does.
    channels: int


def _ext(uri: str) -> str:
    return os.path.splitext(str(uri).rstrip("/"))[1].lower()


def sniff_format(head: bytes) -> str | None:
    """"png" | "jpeg" | "tiff" from the first bytes of a file, or None."""
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    return None


# --------------------------------------------------------------------------- header parsing


def _png_header(f: BinaryIO, uri: str) -> ImageHeader:
    # PNG spec 11.2.2: IHDR is the first chunk: width, height (uint32 BE), bit depth, colour type.
    f.seek(8)
    chunk = f.read(8 + 13)
    if len(chunk) < 21 or chunk[4:8] != b"IHDR":
        raise ImageReadError(uri, "corrupt PNG: no IHDR header")
    width, height, _depth, colour = struct.unpack(">IIBB", chunk[8:18])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    if channels is None or width == 0 or height == 0:
        raise ImageReadError(uri, "corrupt PNG: invalid IHDR header")
    return ImageHeader("png", height, width, channels)


# JPEG markers that carry a frame header (ITU T.81 B.2.2): SOF0..SOF15 minus DHT, JPG, DAC.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_segments(f: BinaryIO, uri: str):
    """Yield (marker, payload offset, payload length) of the header segments up to and including SOS."""
    f.seek(2)
    while True:
        b = f.read(1)
        if not b:
            raise ImageReadError(uri, "truncated JPEG: data ends before the image scan")
        if b != b"\xff":
            raise ImageReadError(uri, "corrupt JPEG: bad marker structure")
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            raise ImageReadError(uri, "truncated JPEG: data ends before the image scan")
        m = marker[0]
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # stand-alone markers, no length
            continue
        raw = f.read(2)
        if len(raw) < 2:
            raise ImageReadError(uri, "truncated JPEG: data ends before the image scan")
        length = struct.unpack(">H", raw)[0]
        if length < 2:
            raise ImageReadError(uri, "corrupt JPEG: bad segment length")
        start = f.tell()
        yield m, start, length - 2
        if m == 0xDA:  # SOS: entropy-coded data follows
            return
        f.seek(start + length - 2)


def _jpeg_header(f: BinaryIO, uri: str) -> tuple[ImageHeader, int]:
    """(header, offset where the first scan's data starts)."""
    header = None
    for m, start, length in _jpeg_segments(f, uri):
        if m in _JPEG_SOF and header is None:
            f.seek(start)
            sof = f.read(6)
            if len(sof) < 6:
                raise ImageReadError(uri, "truncated JPEG: frame header cut short")
            _precision, height, width, ncomp = struct.unpack(">BHHB", sof)
            if height == 0 or width == 0:  # height 0 = defined later by DNL: not supported by decoders
                raise ImageReadError(uri, "corrupt JPEG: zero image size in frame header")
            header = ImageHeader("jpeg", height, width, ncomp)
        if m == 0xDA:
            if header is None:
                raise ImageReadError(uri, "corrupt JPEG: scan before frame header")
            return header, start + length
    raise ImageReadError(uri, "corrupt JPEG: no frame header")  # pragma: no cover (generator raises first)


def _tiff_series(tif: tifffile.TiffFile, uri: str):
    if not tif.series:
        raise ImageReadError(uri, "corrupt TIFF: no image in file")
    return tif.series[0]


def _tiff_layout(series, uri: str) -> tuple[int, int, int, tuple[int, ...] | None]:
    """(height, width, channels, transpose axes or None) for a tifffile series.

    Accepted (squeezed) axes: ``YX``; ``YX`` + one trailing sample axis (``YXS``, RGB contiguous);
    one leading channel-like axis + ``YX`` (``CYX``, ``SYX`` planar, ``QYX``/``IYX`` generic pages).
    A leading Z or T axis is a whole focus series / time-lapse in one file, not one image: rejected.
    """
    axes, shape = series.axes, tuple(series.shape)
    if len(axes) == 2 and axes == "YX":
        return shape[0], shape[1], 1, None
    if len(axes) == 3 and axes[:2] == "YX":
        return shape[0], shape[1], shape[2], None
    if len(axes) == 3 and axes[1:] == "YX":
        if axes[0] in "ZT":
            raise ImageReadError(
                uri, f"TIFF holds a {axes[0]} series (axes {axes}, shape {shape}): a single-file stack must be "
                     "a stack of its own (one file per folder, an .ome.tif name, or --stack-per-file)"
            )
        return shape[1], shape[2], shape[0], (1, 2, 0)
    raise ImageReadError(uri, f"unsupported TIFF layout: axes {axes}, shape {shape} (expected YX, YXS or CYX)")


def _check_pixels(uri: str, h: int, w: int, c: int, max_pixels: int | None) -> None:
    if max_pixels is None:
        return
    if h * w > max_pixels:
        raise ImageTooLargeError(uri, f"{w}x{h} = {h * w} pixels exceeds the limit of {max_pixels}")
    # Many-channel TIFFs: bound the sample count to that of an RGBA image at the limit.
    if h * w * c > 4 * max_pixels:
        raise ImageTooLargeError(
            uri, f"{w}x{h}x{c} = {h * w * c} samples exceeds the limit of {4 * max_pixels} (4 x max_pixels)"
        )


def _read_header(f: BinaryIO, uri: str) -> ImageHeader:
    f.seek(0)
    head = f.read(8)
    fmt = sniff_format(head)
    if fmt is None:
        raise _not_an_image(uri, head)
    if fmt == "png":
        return _png_header(f, uri)
    if fmt == "jpeg":
        return _jpeg_header(f, uri)[0]
    f.seek(0)
    try:
        with tifffile.TiffFile(f) as tif:
            h, w, c, _ = _tiff_layout(_tiff_series(tif, uri), uri)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(uri, f"corrupt TIFF header: {e}") from None
    return ImageHeader("tiff", h, w, c)


def _not_an_image(uri: str, head: bytes) -> ImageReadError:
    ext = _ext(uri)
    if not head:
        return ImageReadError(uri, "empty file (0 bytes)")
    if ext in IMAGE_EXTENSIONS:
        return NotAnImageError(uri, f"content is not PNG, JPEG or TIFF although the name ends in {ext}")
    return NotAnImageError(uri, f"not an image file ({ext or 'no extension'}): ray-mff reads PNG, JPEG and TIFF")


def image_shape(uri: str, *, fs=None, s3_endpoint: str | None = None) -> ImageHeader:
    """Header-only probe: format, height, width, channels, reading a few KiB at most (plus TIFF IFDs).

    Raises the same typed errors as :func:`read_image` for missing, non-image or corrupt headers.
    """
    if fs is None:
        fs, path = storage.resolve(uri, s3_endpoint=s3_endpoint)
    else:
        path = uri
    try:
        with fs.open(path, "rb", block_size=1 << 16) as f:
            return _read_header(f, uri)
    except ImageReadError:
        raise
    except Exception as e:
        raise _io_error(uri, e) from None


def _io_error(uri: str, e: BaseException) -> ImageReadError:
    if isinstance(e, FileNotFoundError):
        return ImageReadError(uri, "no such file")
    if isinstance(e, PermissionError):
        return ImageReadError(uri, "permission denied")
    if isinstance(e, IsADirectoryError):
        return ImageReadError(uri, "is a directory, not a file")
    return ImageReadError(uri, f"cannot read: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- decoding


def _validate_png(data: bytes, uri: str) -> None:
    # Walk the chunks (length, type, data, CRC) to IEND: a cut file ends inside a chunk.
    pos, n = 8, len(data)
    while True:
        if pos + 8 > n:
            raise ImageReadError(uri, f"truncated PNG: data ends at byte {n} before the IEND chunk")
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise ImageReadError(
                uri, f"truncated PNG: {ctype.decode('latin-1')} chunk needs {end} bytes, file has {n}"
            )
        if ctype == b"IEND":
            return
        pos = end


def _decode_png_jpeg(data: bytes, fmt: str, uri: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(uri, f"corrupt {fmt.upper()}: the decoder rejected the data")
    if img.ndim == 3:
        if img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    return img


def _decode_tiff(data: bytes, uri: str, max_pixels: int | None) -> np.ndarray:
    try:
        with tifffile.TiffFile(_io.BytesIO(data)) as tif:
            series = _tiff_series(tif, uri)
            h, w, c, transpose = _tiff_layout(series, uri)
            _check_pixels(uri, h, w, c, max_pixels)
            if series.keyframe.photometric == tifffile.PHOTOMETRIC.PALETTE:
                # Indices would pass for grey values and fuse into nonsense: refuse rather than guess.
                raise ImageReadError(uri, "palette (indexed-colour) TIFF is not supported: store grey or RGB")
            _check_tiff_extent(series, len(data), uri)
            img = series.asarray()
    except ImageReadError:
        raise
    except Exception as e:  # tifffile raises ValueError/TiffFileError/KeyError on bad data or missing codecs
        raise ImageReadError(uri, f"corrupt or unsupported TIFF: {e}") from None
    img = np.asarray(img).reshape(series.shape)
    if transpose is not None:
        img = np.ascontiguousarray(img.transpose(transpose))
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.dtype.kind == "f" and img.dtype != np.float32:
        img = img.astype(np.float32)  # float16/float64 -> the one float dtype ray-mff carries
    if img.dtype not in _SUPPORTED_DTYPES:
        raise ImageReadError(uri, f"unsupported TIFF sample type {img.dtype} (ray-mff reads uint8, uint16, float32)")
    return img


def _check_tiff_extent(series, size: int, uri: str) -> None:
    """Every strip/tile of the series must lie inside the file (tifffile may zero-fill short reads)."""
    end = 0
    if getattr(series, "dataoffset", None) is not None:  # contiguous series (e.g. ImageJ hyperstacks)
        end = series.dataoffset + series.nbytes
    else:
        for page in series.pages:
            if page is None:
                continue
            for off, cnt in zip(page.dataoffsets, page.databytecounts):
                end = max(end, off + cnt)
    if end > size:
        raise ImageReadError(uri, f"truncated TIFF: image data needs {end} bytes, file has {size}")


def decode_image(data: bytes, uri: str = "<bytes>", *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> (H, W) or (H, W, C) array; ``uri`` only names the source in errors."""
    data = bytes(data)
    fmt = sniff_format(data[:8])
    if fmt is None:
        raise _not_an_image(uri, data[:8])
    if fmt == "tiff":
        return _decode_tiff(data, uri, max_pixels)
    f = _io.BytesIO(data)
    if fmt == "png":
        header = _png_header(f, uri)
        _check_pixels(uri, header.height, header.width, header.channels, max_pixels)
        _validate_png(data, uri)
    else:
        header, scan_start = _jpeg_header(f, uri)
        _check_pixels(uri, header.height, header.width, header.channels, max_pixels)
        # EOI (FFD9) cannot occur inside entropy-coded data (0xFF is stuffed as FF00), so a file
        # whose scan data has no EOI after it was cut short; libjpeg would grey-fill it silently.
        if data.find(b"\xff\xd9", scan_start) < 0:
            raise ImageReadError(uri, "truncated JPEG: no end-of-image marker after the scan data")
    return _decode_png_jpeg(data, fmt, uri)


def read_image(
    uri: str,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    fs=None,
    s3_endpoint: str | None = None,
) -> np.ndarray:
    """Read one PNG/JPEG/TIFF from a local path or any fsspec uri -> (H, W) or (H, W, C) array.

    ``fs``: an fsspec filesystem to read ``uri`` with (skips :func:`storage.resolve`).
    The file is fetched whole (one GET on S3), then its header is checked before decoding: the
    pixel limit bounds decoded memory, not the download.
    Raises :class:`ImageReadError` (missing, unreadable, corrupt, truncated),
    :class:`NotAnImageError`, :class:`ImageTooLargeError`; each names ``uri`` and the reason.
    """
    uri = os.fspath(uri)
    try:
        data = storage.read_bytes(uri, s3_endpoint=s3_endpoint, fs=fs)
    except Exception as e:
        raise _io_error(uri, e) from None
    return decode_image(data, uri, max_pixels=max_pixels)


def _describe(img: np.ndarray) -> str:
    h, w = img.shape[:2]
    c = _channels(img)
    return f"{w}x{h}, {c} channel{'s' if c != 1 else ''}, {img.dtype}"


def check_stack(images: Sequence[np.ndarray], uris: Sequence[str]) -> None:
    """Check that every image agrees with the first in size, channel count and dtype.

    ``uris`` name the images in errors (paths, or labels such as ``"image[2]"`` for arrays).
    Raises :class:`StackMismatchError` naming the first member that differs, with both descriptions.
    """
    if not images:
        raise EmptyStackError("<stack>", "stack has no members")
    ref, ref_uri = images[0], uris[0]
    for img, uri in zip(images[1:], uris[1:]):
        if img.shape[:2] != ref.shape[:2]:
            what = "size"
        elif _channels(img) != _channels(ref):
            what = "channel count"
        elif img.dtype != ref.dtype:
            what = "bit depth"
        else:
            continue
        raise StackMismatchError(
            uri, f"{what} differs from the stack's first member: {_describe(img)} vs {_describe(ref)} in {ref_uri}"
        )


def read_stack(uris: Sequence[str], **kw) -> list[np.ndarray]:
    """Read every member of a stack and check they agree in size, channel count and dtype.

    ``kw`` goes to :func:`read_image`. Stops at the first unreadable member or the first that
    differs from the first member (:class:`StackMismatchError`, see :func:`check_stack`).
    """
    if not uris:
        raise EmptyStackError("<stack>", "stack has no members")
    uris = [os.fspath(u) for u in uris]
    images: list[np.ndarray] = []
    for uri in uris:
        img = read_image(uri, **kw)
        if images:
            check_stack([images[0], img], [uris[0], uri])
        images.append(img)
    return images


# --------------------------------------------------------------------------- writing


def _channels(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else img.shape[2]


def default_extension(img: np.ndarray) -> str:
    """``".png"`` for 8-bit grey/RGB/RGBA, else ``".tif"`` (16-bit, float, other channel counts)."""
    return ".png" if img.dtype == np.uint8 and _channels(img) in (1, 3, 4) else ".tif"


def encode_image(img: np.ndarray, fmt: str, *, jpeg_quality: int = 95, metadata=None) -> bytes:
    """(H, W) or (H, W, C) array -> PNG/JPEG/TIFF bytes. Raises ValueError if the format cannot hold it.

    ``metadata``: a :class:`ray_mff.metadata.PhysicalMetadata` written into a TIFF (resolution and
    unit, GeoTIFF tags); PNG and JPEG carry none.
    """
    fmt = _FMT_ALIASES.get(str(fmt).lower().lstrip("."))
    if fmt is None:
        raise ValueError("format must be png, jpeg or tiff")
    img = np.ascontiguousarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    if img.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {img.dtype} (ray-mff writes uint8, uint16, float32)")
    c = _channels(img)
    if fmt in ("png", "jpeg"):
        if fmt == "png" and (img.dtype == np.float32 or c not in (1, 3, 4)):
            raise ValueError(f"PNG holds 8/16-bit grey, RGB or RGBA, not {_describe(img)}: use TIFF")
        if fmt == "jpeg" and (img.dtype != np.uint8 or c not in (1, 3)):
            raise ValueError(f"JPEG holds 8-bit grey or RGB, not {_describe(img)}: use PNG or TIFF")
        bgr = img
        if c == 3:
            bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        elif c == 4:
            bgr = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if fmt == "jpeg" else []
        ok, buf = cv2.imencode("." + ("jpg" if fmt == "jpeg" else "png"), bgr, params)
        if not ok:
            raise ValueError(f"OpenCV could not encode {_describe(img)} as {fmt}")
        return buf.tobytes()
    from ray_mff.metadata import encode_tiff

    if c == 1:
        return encode_tiff(img, "YX", metadata, "tiff")
    if c in (3, 4):
        return encode_tiff(img, "YXS", metadata, "tiff")
    # Microscopy convention: C x H x W, one plane per channel (planar), labelled CYX.
    return encode_tiff(np.ascontiguousarray(img.transpose(2, 0, 1)), "CYX", metadata, "tiff")


def write_image(
    uri: str,
    img: np.ndarray,
    *,
    fmt: str | None = None,
    jpeg_quality: int = 95,
    s3_endpoint: str | None = None,
    fs=None,
    metadata=None,
) -> str:
    """Encode and write atomically (see :func:`storage.write_bytes_atomic`); returns ``uri``.

    Format: ``fmt`` if given, else the uri's extension (.png .jpg .jpeg .tif .tiff), else
    :func:`default_extension`. 16-bit goes to PNG only when asked for; float32 and channel
    counts other than 1/3/4 need TIFF (multichannel is stored C x H x W planar, axes CYX).
    Encoding happens in memory first, so a failed encode writes nothing.
    Raises :class:`ImageWriteError` naming ``uri``.
    """
    uri = os.fspath(uri)
    ext = _ext(uri)
    ext_fmt = _FORMAT_BY_EXT.get(ext)
    if fmt is not None:
        chosen = _FMT_ALIASES.get(str(fmt).lower().lstrip("."))
        if chosen is None:
            raise ImageWriteError(uri, f"unknown format {fmt!r} (png, jpeg or tiff)")
        if ext_fmt is not None and ext_fmt != chosen:
            raise ImageWriteError(uri, f"format {chosen} contradicts the extension {ext}")
    elif ext_fmt is not None:
        chosen = ext_fmt
    elif ext:
        raise ImageWriteError(uri, f"unknown image extension {ext} (use .png, .jpg or .tif)")
    else:
        chosen = _FORMAT_BY_EXT[default_extension(np.asarray(img))]
    try:
        data = encode_image(img, chosen, jpeg_quality=jpeg_quality, metadata=metadata)
    except ValueError as e:
        raise ImageWriteError(uri, str(e)) from None
    try:
        storage.write_bytes_atomic(uri, data, s3_endpoint=s3_endpoint, fs=fs)
    except Exception as e:
        raise ImageWriteError(uri, f"cannot write: {type(e).__name__}: {e}") from None
    return uri


def write_fused(uri: str, data: np.ndarray, axes: str, *, metadata=None, family: str = "files") -> str:
    """Write a fused stack with its axes and physical metadata, in the format its name says.

    ``.ome.zarr``: OME-NGFF multiscale image (:func:`ray_mff.omezarr.write_ome_zarr`);
    ``.ome.tif``: OME-TIFF; ``.tif`` from an ImageJ input: ImageJ hyperstack; other ``.tif``:
    plain TIFF (resolution, GeoTIFF tags); PNG/JPEG: :func:`write_image` (grey or RGB(A) only).
    ``axes``: e.g. ``YX``, ``YXS`` (samples/channels last, as :func:`read_image` returns),
    ``CYX``, ``TCYX``. Atomic like :func:`write_image`; raises :class:`ImageWriteError`.
    """
    from ray_mff.metadata import encode_tiff

    uri = os.fspath(uri)
    low = uri.lower().rstrip("/")
    if low.endswith(".zarr"):
        from ray_mff.omezarr import write_ome_zarr  # noqa: PLC0415 - zarr only when asked for

        return write_ome_zarr(uri, data, axes, metadata)
    if axes in ("YX", "YXS") and not low.endswith((".ome.tif", ".ome.tiff")) and family not in ("imagej", "ome-tiff"):
        return write_image(uri, data, metadata=metadata)
    if _ext(uri) not in (".tif", ".tiff"):
        raise ImageWriteError(uri, f"a fused stack with axes {axes} needs TIFF or OME-Zarr output, not {_ext(uri)}")
    kind = "ome-tiff" if low.endswith((".ome.tif", ".ome.tiff")) else "imagej" if family == "imagej" else "tiff"
    try:
        payload = encode_tiff(np.ascontiguousarray(data), axes, metadata, kind)
    except Exception as e:  # noqa: BLE001 - tifffile raises ValueError/TypeError on what a format cannot hold
        raise ImageWriteError(uri, f"cannot encode {axes} {data.shape} {data.dtype} as {kind}: {e}") from None
    try:
        storage.write_bytes_atomic(uri, payload)
    except Exception as e:
        raise ImageWriteError(uri, f"cannot write: {type(e).__name__}: {e}") from None
    return uri
