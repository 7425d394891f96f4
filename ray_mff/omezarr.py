"""OME-Zarr (OME-NGFF) in and out, with zarr-python itself.

Why zarr and not ``ome-zarr`` or ``ngff-zarr``: both are built on zarr-python and would add dask
(and ome-zarr also pydantic and an HTTP server; ngff-zarr itk-wasm) to every worker for what is, on
our side, two small pieces of JSON: the ``multiscales`` block (NGFF 0.4 Sec. "multiscales": axes
with types and units, one ``scale`` transformation per level) and ``omero`` channel labels. zarr
3.x alone installs with the project's Python 3.11 pins (numcodecs, donfig, crc32c), reads and
writes local folders and ``s3://`` through fsspec/s3fs (already dependencies), and reads only the
chunks an index touches, which is what tiled fusion of a huge plane needs.

Read: NGFF 0.4 (zarr v2, attributes at the top level) and 0.5 (zarr v3, under ``"ome"``); level 0
(``datasets[0]``) of the first multiscale image. A plate or a folder of images is listed as one
stack per image by :mod:`ray_mff.stacks` (an image is a group whose level-0 array is ``0``).

Write: NGFF 0.4 on zarr format 2 (the version most viewers read today: napari, Fiji/MoBIE,
ome-zarr-py), chunks of 1 along T/C and up to ``chunk`` x ``chunk`` in Y/X, a pyramid halving Y
and X (2x2 mean) until the image fits one chunk (at most ``max_levels``). Locally the image is
written to a hidden temporary folder and renamed into place (no half-written output); on S3 the
arrays are written first and the group metadata last, so a reader never sees metadata pointing at
missing arrays.
"""
from __future__ import annotations

import os
import secrets
import shutil

import numpy as np

from ray_mff import storage
from ray_mff.errors import ImageReadError, ImageWriteError
from ray_mff.metadata import PhysicalMetadata, from_ngff

#: NGFF 0.4 wants UDUNITS-2 unit names
_NGFF_UNITS = {"µm": "micrometer", "nm": "nanometer", "mm": "millimeter", "cm": "centimeter", "m": "meter",
               "inch": "inch"}
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _store(uri: str, *, read_only: bool):
    from zarr.storage import FsspecStore, LocalStore

    if storage.is_remote(uri):
        options = {}
        if storage.protocol(uri) in ("s3", "s3a"):
            endpoint = storage.effective_s3_endpoint()
            if endpoint:
                options["endpoint_url"] = endpoint
        return FsspecStore.from_url(uri, storage_options=options, read_only=read_only)
    _, path = storage.resolve(uri)
    return LocalStore(path, read_only=read_only)


def read_ngff(uri: str):
    """(level-0 array, axes letters, PhysicalMetadata) of an OME-Zarr image."""
    import zarr

    try:
        group = zarr.open_group(_store(uri, read_only=True), mode="r")
        attrs = dict(group.attrs)
    except Exception as e:  # noqa: BLE001 - missing folder, not a zarr group, unreachable store
        raise ImageReadError(uri, f"not a readable zarr group: {type(e).__name__}: {e}") from None
    ome = attrs.get("ome", attrs)  # NGFF 0.5 nests its metadata under "ome"
    if "plate" in ome or "well" in ome:
        raise ImageReadError(uri, "an OME-Zarr plate/well, not an image: give the plate's folder to discovery, "
                                  "which lists one stack per image")
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise ImageReadError(uri, "not an OME-Zarr image: no 'multiscales' metadata")
    ms = multiscales[0]
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", ["t", "c", "z", "y", "x"])]
    ds = ms["datasets"][0]
    try:
        arr = group[ds["path"]]
    except KeyError:
        raise ImageReadError(uri, f"OME-Zarr level 0 ({ds['path']!r}) is missing") from None
    scale = next((t.get("scale") for t in ds.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
    letters = "".join(a["name"].upper() for a in axes)
    if len(letters) != arr.ndim:
        raise ImageReadError(uri, f"OME-Zarr axes {letters} do not match level 0's shape {arr.shape}")
    return arr, letters, from_ngff(axes, scale, ome.get("omero"))


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 mean over the last two axes (Y, X), odd edges dropped, dtype kept."""
    h, w = a.shape[-2] // 2 * 2, a.shape[-1] // 2 * 2
    x = a[..., :h, :w].astype(np.float32)
    m = (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) * 0.25
    return np.rint(m).astype(a.dtype) if a.dtype.kind in "ui" else m.astype(a.dtype)


def write_ome_zarr(uri: str, data: np.ndarray, axes: str, meta: PhysicalMetadata | None = None, *,
                   chunk: int = 256, max_levels: int = 6) -> str:
    """Write ``data`` (axes such as ``YX``, ``CYX``, ``TCYX``, ``YXS``) as an NGFF 0.4 multiscale image."""
    import zarr

    meta = meta or PhysicalMetadata()
    if axes.endswith("S"):  # RGB samples are channels in NGFF
        if "C" in axes:
            raise ImageWriteError(uri, f"cannot store axes {axes} in OME-Zarr (both C and samples)")
        data = np.moveaxis(data, -1, len(axes) - 3)
        axes = axes[:-3] + "CYX"
    order = sorted(range(len(axes)), key=lambda i: "TCZYX".index(axes[i]))  # NGFF 0.4 axis order t, c, z, y, x
    data, axes = np.transpose(data, order), "".join(axes[i] for i in order)
    names = axes.lower()
    levels = [np.ascontiguousarray(data)]
    while len(levels) < max_levels and max(levels[-1].shape[-2:]) > chunk and min(levels[-1].shape[-2:]) >= 2:
        levels.append(_halve(levels[-1]))
    unit = _NGFF_UNITS.get(meta.unit or "", None)
    ps = meta.pixel_size or (1.0, 1.0)
    ngff_axes = []
    for a in names:
        entry = {"name": a, "type": _AXIS_TYPES[a]}
        if (a in "yx" and meta.pixel_size or a == "z" and meta.z_spacing) and unit:
            entry["unit"] = unit
        ngff_axes.append(entry)
    datasets = []
    for i in range(len(levels)):
        scale = [ps[0] * 2 ** i if a == "y" else ps[1] * 2 ** i if a == "x"
                 else float(meta.z_spacing or 1.0) if a == "z" else 1.0 for a in names]
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    attrs = {"multiscales": [{"version": "0.4", "name": storage.basename(uri), "axes": ngff_axes,
                              "datasets": datasets}]}
    if "c" in names:
        n_c = data.shape[names.index("c")]
        labels = list(meta.channel_names) if meta.channel_names and len(meta.channel_names) == n_c \
            else [f"channel {i}" for i in range(n_c)]
        attrs["omero"] = {"version": "0.4", "channels": [{"label": label, "active": True} for label in labels]}
    target = uri
    local = not storage.is_remote(uri)
    if local:
        _, final = storage.resolve(uri)
        parent, name = os.path.split(final.rstrip("/"))
        os.makedirs(parent or ".", exist_ok=True)
        target = os.path.join(parent, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        root = zarr.open_group(_store(target, read_only=False), mode="w", zarr_format=2)
        for i, level in enumerate(levels):
            chunks = tuple(min(chunk, s) if a in "yx" else 1 for a, s in zip(names, level.shape))
            root.create_array(str(i), data=level, chunks=chunks)
        root.attrs.update(attrs)  # metadata last: readers see a complete image or none
    except Exception as e:  # noqa: BLE001
        if local:
            shutil.rmtree(target, ignore_errors=True)
        raise ImageWriteError(uri, f"cannot write OME-Zarr: {type(e).__name__}: {e}") from None
    if local:
        old = None
        if os.path.exists(final):
            old = f"{target}.old"
            os.replace(final, old)
        os.replace(target, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return uri
