"""Open a stack as it is stored: a folder of single images, or ONE file holding a Z axis.

:func:`open_source` turns a stack's uris into a :class:`StackSource`: one lazy plane sequence
(:mod:`ray_mff.planes`) per (T, C) combination, the axes the fused output keeps (the input's minus
Z), its physical metadata (:mod:`ray_mff.metadata`) and the file family to write it back as.

Which axis is the focus axis:

- a folder stack: the member files, in discovery order;
- a TIFF (tifffile series axes): ``Z`` when the file labels one (ImageJ hyperstacks, OME-TIFF,
  tifffile's shaped TIFFs); other axes (T, C, planar S) are kept, one fused plane per combination;
  a trailing ``S`` (RGB samples) stays inside the plane;
- a plain multi-page TIFF (generic pages ``Q``/``I``: Z or C?) is never guessed silently: its
  pages are read as focal planes and the row's ``warning`` says so, with the option that reads them
  as channels (``--z-axis none``);
- ``z_axis`` overrides the guess: an axis letter of the file (``"T"``, ``"Q"``, ``"C"``...) or
  ``"none"`` (the file is one image: passed through);
- OME-Zarr: level 0 of the first multiscale image, axes from its NGFF metadata
  (:mod:`ray_mff.omezarr`);
- vendor formats (CZI, ND2, LIF): through ``bioio`` when the optional extra is installed
  (``pip install 'ray-mff[vendor]'``), else an error row saying so.

No plane is read here: TIFFs are opened through tifffile's zarr store (only the pages, strips or
tiles a plane or a tile window needs are read), zarr arrays through zarr, folder members file by
file.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ray_mff import io, storage
from ray_mff.errors import EmptyStackError, ImageReadError, StackMismatchError
from ray_mff.metadata import PhysicalMetadata, from_tiff
from ray_mff.planes import ArrayPlanes, FilePlanes, MappedPlanes

#: folder stacks whose planes together decode to at most this many bytes are read whole, once
#: (as before single-file stacks existed: every member is fetched once); larger ones are lazy
EAGER_STACK_BYTES = 256 << 20

#: file name endings of vendor formats read through bioio plugins (optional extra ``vendor``)
VENDOR_EXTENSIONS = (".czi", ".nd2", ".lif")

_FAMILY_EXT = {"ome-tiff": ".ome.tif", "imagej": ".tif", "tiff": ".tif", "ome-zarr": ".ome.zarr"}


@dataclass
class StackSource:
    """A stack opened for fusion.

    groups:   ((index per kept axis), planes) per (T, C, ...) combination; ``planes`` is a
              sequence of N focal planes (H, W) or (H, W, S), lazy for single files.
    axes:     axes of the fused output, e.g. ``"YX"``, ``"YXS"``, ``"CYX"``, ``"TCYX"``.
    shape:    its shape.
    family:   format family of a single-file input (``tiff``, ``imagej``, ``ome-tiff``, ``ome-zarr``),
              or ``files`` for a folder stack.
    note:     what was assumed about the layout (goes into the row's ``warning``), or None.
    """

    uris: tuple[str, ...]
    groups: list[tuple[tuple[int, ...], Sequence[np.ndarray]]]
    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype
    family: str
    meta: PhysicalMetadata = field(default_factory=PhysicalMetadata)
    note: str | None = None
    in_memory: bool = False
    _closers: list = field(default_factory=list, repr=False)

    @property
    def n_planes(self) -> int:
        return len(self.groups[0][1])

    @property
    def nbytes(self) -> int:
        """Bytes of one (T, C) group's planes, were they all read at once."""
        return int(np.prod(self.plane_shape)) * np.dtype(self.dtype).itemsize * self.n_planes

    @property
    def plane_shape(self) -> tuple[int, ...]:
        planes = self.groups[0][1]
        return tuple(planes.shape) if hasattr(planes, "shape") else tuple(np.asarray(planes[0]).shape)

    def row_facts(self) -> dict:
        """Manifest columns known before fusing: size, channels, dtype, planes, physical metadata."""
        h, w = self.plane_shape[:2]
        channels = int(np.prod([self.shape[i] for i, a in enumerate(self.axes) if a in "CS"] or [1]))
        return {"height": h, "width": w, "channels": channels, "dtype": str(np.dtype(self.dtype)),
                "n_images": self.n_planes, **self.meta.manifest_fields()}

    def output_extension(self, fmt: str | None) -> str:
        """``--format`` if given (``ome-zarr``, ``ome-tiff``, ``tif``, ``png``...), else the input's family."""
        if fmt:
            fmt = fmt.lower().lstrip(".")
            return {"ome-zarr": ".ome.zarr", "ome-tiff": ".ome.tif", "ome.tif": ".ome.tif"}.get(fmt, f".{fmt}")
        if self.family in _FAMILY_EXT:
            return _FAMILY_EXT[self.family]
        if self.axes in ("YX", "YXS"):
            return io.default_extension(np.empty((1, 1) + tuple(self.shape[2:]), self.dtype))
        return ".tif"

    def assemble(self, planes: Sequence[np.ndarray]) -> np.ndarray:
        """One fused plane per group -> the output array with :attr:`axes`."""
        out = np.empty(self.shape, self.dtype)
        for (key, _), plane in zip(self.groups, planes):
            out[key] = plane
        return out

    def close(self) -> None:
        for close in self._closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - closing a read handle must not mask the result
                pass
        self._closers.clear()

    def __enter__(self) -> "StackSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_single_file_stack_name(name: str) -> bool:
    """Names that are always one stack each: ``.ome.tif(f)``, ``.zarr`` and vendor formats."""
    low = name.lower().rstrip("/")
    return low.endswith((".ome.tif", ".ome.tiff", ".zarr")) or low.endswith(VENDOR_EXTENSIONS)


def open_source(uris: Sequence[str], *, z_axis: str | None = "auto", max_pixels: int | None = io.DEFAULT_MAX_PIXELS,
                eager_bytes: int = EAGER_STACK_BYTES) -> StackSource:
    """Open a stack's members (see module docstring). Raises typed errors naming the file."""
    uris = tuple(os.fspath(u) for u in uris)
    if not uris:
        raise EmptyStackError("<stack>", "stack has no members")
    if len(uris) == 1:
        uri = uris[0]
        low = uri.lower().rstrip("/")
        if any(part.endswith(".zarr") for part in low.split("/")):  # an image, or one inside a plate
            return open_ome_zarr(uri, z_axis=z_axis, max_pixels=max_pixels)
        if low.endswith(VENDOR_EXTENSIONS):
            return _open_vendor(uri, z_axis)
        if (z_axis or "auto").lower() != "none" and io._ext(uri) in (".tif", ".tiff"):
            src = _open_tiff(uri, z_axis, max_pixels)
            if src is not None:
                return src
    return _open_files(uris, max_pixels, eager_bytes)


# ---------------------------------------------------------------------------------- folder stacks


def _open_files(uris: tuple[str, ...], max_pixels, eager_bytes: int) -> StackSource:
    """A folder stack: one image per file (the reader and checks of :func:`ray_mff.io.read_stack`)."""
    def reader(u):
        return io.read_image(u, max_pixels=max_pixels)

    try:
        data = storage.read_bytes(uris[0])
    except Exception as e:  # noqa: BLE001
        raise io._io_error(uris[0], e) from None
    first = io.decode_image(data, uris[0], max_pixels=max_pixels)
    family = "files"  # output format as before: PNG for 8-bit grey/RGB(A), TIFF otherwise
    meta = _tiff_meta(data) if io.sniff_format(data[:8]) == "tiff" else PhysicalMetadata()
    del data
    planes: Sequence[np.ndarray]
    if first.nbytes * len(uris) <= eager_bytes:
        images = [first]
        for uri in uris[1:]:
            img = reader(uri)
            io.check_stack([first, img], [uris[0], uri])
            images.append(img)
        planes, in_memory = images, True
    else:
        planes, in_memory = FilePlanes(uris, reader, first=first), False
    axes = "YX" if first.ndim == 2 else "YXS"
    return StackSource(uris, [((), planes)], axes, tuple(first.shape), first.dtype, family, meta,
                       in_memory=in_memory)


def _tiff_meta(data: bytes) -> PhysicalMetadata:
    import io as _io

    import tifffile

    try:
        with tifffile.TiffFile(_io.BytesIO(data)) as tif:
            return from_tiff(tif)
    except Exception:  # noqa: BLE001 - metadata is a courtesy; the pixels were read fine
        return PhysicalMetadata()


# ---------------------------------------------------------------------------------- single TIFF


def _open_tiff(uri: str, z_axis: str | None, max_pixels) -> StackSource | None:
    """A TIFF with a focus axis -> StackSource; None when it is one image (the folder path reads it)."""
    import tifffile
    import zarr

    fs, path = storage.resolve(uri)
    try:
        fh = fs.open(path, "rb", block_size=1 << 20)
    except Exception as e:  # noqa: BLE001
        raise io._io_error(uri, e) from None
    try:
        tif = tifffile.TiffFile(fh)
    except Exception as e:  # noqa: BLE001
        fh.close()
        raise ImageReadError(uri, f"corrupt TIFF header: {e}") from None
    closers = [tif.close, fh.close]
    try:
        if not tif.series:
            raise ImageReadError(uri, "corrupt TIFF: no image in file")
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        z, note = _choose_z(uri, axes, shape, z_axis)
        if z is None:
            for close in closers:
                close()
            return None
        if series.keyframe.photometric == tifffile.PHOTOMETRIC.PALETTE:
            raise ImageReadError(uri, "palette (indexed-colour) TIFF is not supported: store grey or RGB")
        io._check_tiff_extent(series, fs.size(path), uri)
        family = "ome-tiff" if tif.is_ome else "imagej" if tif.is_imagej else "tiff"
        meta = from_tiff(tif)
        store = series.aszarr()
        closers.insert(0, store.close)
        # zarr's mode "r" wants a store that says it is read-only (tifffile's is, on a file handle)
        arr = zarr.open_array(store, mode="r" if getattr(store, "read_only", True) else "r+")
        src = _array_source(uri, arr, axes.replace(z, "Z") if z != "Z" else axes, family, meta, note, max_pixels)
    except BaseException:
        for close in closers:
            close()
        raise
    src._closers.extend(closers)
    return src


def _choose_z(uri: str, axes: str, shape: tuple[int, ...], z_axis: str | None) -> tuple[str | None, str | None]:
    """(letter of the focus axis or None for one image, note on what was assumed)."""
    choice = (z_axis or "auto").strip()
    size = dict(zip(axes, shape))
    if choice.lower() == "none":
        return None, None
    if choice.lower() != "auto":
        letter = choice.upper()
        if letter not in size or letter in "YX":
            raise ImageReadError(uri, f"--z-axis {choice}: the file's axes are {axes} {shape}; choose one of "
                                      f"{', '.join(a for a in axes if a not in 'YX')} or none")
        if "Z" in size and letter != "Z":
            raise ImageReadError(uri, f"--z-axis {choice}: the file also has a Z axis ({axes} {shape}); its "
                                      "planes would mix two focus series")
        return letter, None
    if "Z" in size:
        return ("Z", None) if size["Z"] > 1 else (None, None)
    others = [a for a in axes if a not in "YX" and not (a == "S" and axes.endswith("S"))]
    generic = [a for a in others if a in "QI"]
    if not others or not generic:
        if "T" in others and "C" not in others and len(others) == 1:
            raise ImageReadError(uri, f"TIFF holds a T series ({axes} {shape}) and no Z axis: give --z-axis T to "
                                      "fuse along T, or store the focal planes on a Z axis")
        return None, None  # YX, YXS, CYX: one image, read as today
    if len(generic) == 1 and len(others) == 1:
        a = generic[0]
        return a, (f"{storage.basename(uri)}: its {size[a]} pages carry no axis label (Z or C?): read as "
                   f"focal planes (Z); run with --z-axis none to read them as channels of one image")
    raise ImageReadError(uri, f"cannot tell the focus axis of a TIFF with axes {axes} {shape}: give --z-axis "
                              f"with one of {', '.join(others)}, or none")


def open_ome_zarr(uri: str, *, z_axis: str | None = "auto", max_pixels=None):
    """An OME-Zarr image as a :class:`ray_mff.zstack.StackSource` (lazy: chunks read on access)."""
    from ray_mff.omezarr import read_ngff  # zarr only when a store is opened

    arr, letters, meta = read_ngff(uri)
    size = tuple(arr.shape)
    z, note = _choose_z(uri, letters, size, z_axis)
    if z is None:
        raise ImageReadError(uri, f"OME-Zarr image has no focus axis (axes {letters}, shape {size}): give --z-axis")
    return _array_source(uri, arr, letters.replace(z, "Z") if z != "Z" else letters, "ome-zarr", meta, note,
                         max_pixels)


def _array_source(uri: str, arr, axes: str, family: str, meta: PhysicalMetadata, note: str | None,
                  max_pixels) -> StackSource:
    """An array with a Z axis (after renaming) -> one ArrayPlanes per combination of the kept axes."""
    size = dict(zip(axes, arr.shape))
    trailing_s = axes.endswith("S")
    kept = [a for a in axes if a not in "ZYX" and not (a == "S" and trailing_s)]
    h, w = size["Y"], size["X"]
    samples = size["S"] if trailing_s else 1
    if max_pixels is not None and h * w > max_pixels:
        raise io.ImageTooLargeError(uri, f"{w}x{h} = {h * w} pixels per plane exceeds the limit of {max_pixels}")
    dtype = np.dtype(arr.dtype)
    convert = None
    if dtype.kind == "f" and dtype != np.float32:
        convert, dtype = (lambda p: p.astype(np.float32)), np.dtype(np.float32)
    if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)):
        raise ImageReadError(uri, f"unsupported sample type {dtype} (ray-mff reads uint8, uint16, float32)")
    groups = []
    for key in itertools.product(*[range(size[a]) for a in kept]):
        planes = ArrayPlanes(arr, axes, dict(zip(kept, key)))
        groups.append((key, MappedPlanes(planes, convert) if convert else planes))
    out_axes = "".join(kept) + "YX" + ("S" if trailing_s else "")
    out_shape = tuple(size[a] for a in kept) + (h, w) + ((samples,) if trailing_s else ())
    if meta.channel_names and ("C" not in size or len(meta.channel_names) != size["C"]):
        meta = PhysicalMetadata(meta.pixel_size, meta.unit, meta.z_spacing, None, meta.geotiff_tags)
    return StackSource((uri,), groups, out_axes, out_shape, dtype, family, meta, note)


# ---------------------------------------------------------------------------------- vendor formats


def _open_vendor(uri: str, z_axis: str | None) -> StackSource:
    """CZI / ND2 / LIF through bioio (optional extra); a clear error row without it."""
    try:
        from bioio import BioImage
    except ImportError:
        raise ImageReadError(uri, f"reading {io._ext(uri)} files needs the optional extra 'vendor' "
                                  "(pip install 'ray-mff[vendor]': bioio and its CZI/ND2/LIF plugins)") from None
    try:
        img = BioImage(uri)
        data = img.dask_data  # lazy, dims e.g. TCZYX: a plane is computed on access
        axes = "".join(img.dims.order)
        sizes = img.physical_pixel_sizes
        names = tuple(str(c) for c in img.channel_names) if img.channel_names else None
    except Exception as e:  # noqa: BLE001 - plugin errors vary
        raise ImageReadError(uri, f"bioio could not open it: {type(e).__name__}: {e}") from None
    meta = PhysicalMetadata(pixel_size=(sizes.Y, sizes.X) if sizes.X and sizes.Y else None,
                            unit="µm" if sizes.X else None, z_spacing=sizes.Z or None, channel_names=names)
    z, note = _choose_z(uri, axes, tuple(data.shape), z_axis)
    if z is None:
        raise StackMismatchError(uri, f"no focus axis in {axes} {tuple(data.shape)}: give --z-axis")
    return _array_source(uri, data, axes.replace(z, "Z") if z != "Z" else axes, "ome-tiff", meta, note, None)
