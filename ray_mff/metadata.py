"""Physical metadata carried from a stack to its fused image: pixel size and unit, z spacing,
channel names, GeoTIFF georeferencing.

Read from (one function each): OME-TIFF (the OME-XML ``Pixels`` element: ``PhysicalSizeX/Y/Z``
and their units, ``Channel/@Name``), ImageJ TIFF (``XResolution``/``YResolution`` in pixels per
``unit``, ``spacing`` = z step), plain TIFF (``XResolution``/``YResolution`` with
``ResolutionUnit`` inch or centimetre), GeoTIFF (the georeferencing tags below, copied verbatim)
and OME-Zarr (NGFF ``multiscales`` axes units and level-0 ``scale``; ``omero`` channel labels).

Written into: OME-TIFF (``PhysicalSize*`` + channel names in the OME-XML, tifffile ``ome=True``),
ImageJ TIFF (resolution + ``unit`` + ``spacing``, tifffile ``imagej=True``) or plain TIFF
(resolution + unit when it is inch/cm; GeoTIFF tags). The input's family is kept by default.

GeoTIFF tags (GeoTIFF 1.1, OGC 19-008r4): 33550 ModelPixelScale, 33922 ModelTiepoint, 34264
ModelTransformation, 34735 GeoKeyDirectory, 34736 GeoDoubleParams, 34737 GeoAsciiParams, and
GDAL's 42112 GDAL_METADATA / 42113 GDAL_NODATA. A fused image has the input's pixel grid, so
the tags apply unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import tifffile

#: georeferencing tags copied onto fused GeoTIFFs (see module docstring)
GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42112, 42113)

_RESOLUTION_UNITS = {2: "inch", 3: "cm"}  # TIFF ResolutionUnit 1 = none
_UNIT_ALIASES = {"micron": "µm", "microns": "µm", "um": "µm", "\\u00B5m": "µm", "micrometer": "µm",
                 "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m", "pixel": None}


@dataclass(frozen=True)
class PhysicalMetadata:
    """What a stack says about its physical grid; every field optional.

    pixel_size:    (y, x) size of one pixel in ``unit``.
    unit:          length unit of ``pixel_size`` and ``z_spacing`` ("µm", "nm", "cm", "inch", ...).
    z_spacing:     distance between focal planes, in ``unit``.
    channel_names: one per channel (C axis), when the file names them.
    geotiff_tags:  ((code, dtype, count, value), ...) copied verbatim onto a fused TIFF.
    """

    pixel_size: tuple[float, float] | None = None
    unit: str | None = None
    z_spacing: float | None = None
    channel_names: tuple[str, ...] | None = None
    geotiff_tags: tuple = field(default=(), repr=False)

    def manifest_fields(self) -> dict:
        """Manifest columns ``pixel_size_x``, ``pixel_size_y``, ``pixel_size_z``, ``pixel_unit``."""
        ps = self.pixel_size
        return {"pixel_size_x": ps[1] if ps else None, "pixel_size_y": ps[0] if ps else None,
                "pixel_size_z": self.z_spacing, "pixel_unit": self.unit}


def normalize_unit(unit) -> str | None:
    if unit is None:
        return None
    u = str(unit).strip()
    return _UNIT_ALIASES.get(u.lower(), u) if u else None


def _rational(value) -> float | None:
    try:
        num, den = value
        return float(num) / float(den) if den else None
    except (TypeError, ValueError):
        return None


def _resolution_pixel_size(page) -> tuple[float, float] | None:
    """(y, x) pixel size = 1 / (pixels per unit) from XResolution/YResolution, if meaningful."""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    rx, ry = _rational(tags["XResolution"].value), _rational(tags["YResolution"].value)
    if not rx or not ry:
        return None
    return (1.0 / ry, 1.0 / rx)


def from_tiff(tif: tifffile.TiffFile) -> PhysicalMetadata:
    """Physical metadata of a TIFF, by family: OME-XML, ImageJ, plain resolution; GeoTIFF tags always."""
    page = tif.pages.first
    geo = tuple((t.code, int(t.dtype), t.count, t.value) for t in page.tags.values() if t.code in GEOTIFF_TAGS)
    if tif.is_ome:
        meta = _from_ome_xml(tif.ome_metadata)
    elif tif.is_imagej:
        ij = tif.imagej_metadata or {}
        unit = normalize_unit(ij.get("unit"))
        ps = _resolution_pixel_size(page) if unit else None
        meta = PhysicalMetadata(pixel_size=ps, unit=unit if ps or ij.get("spacing") else None,
                                z_spacing=float(ij["spacing"]) if unit and ij.get("spacing") else None,
                                channel_names=tuple(ij["Labels"]) if isinstance(ij.get("Labels"), list) else None)
    else:
        unit_code = page.tags["ResolutionUnit"].value if "ResolutionUnit" in page.tags else 2
        unit = _RESOLUTION_UNITS.get(int(unit_code))
        ps = _resolution_pixel_size(page) if unit else None
        meta = PhysicalMetadata(pixel_size=ps, unit=unit if ps else None)
    return replace(meta, geotiff_tags=geo)


def _from_ome_xml(xml: str | None) -> PhysicalMetadata:
    if not xml:
        return PhysicalMetadata()
    try:
        image = tifffile.xml2dict(xml)["OME"]["Image"]
    except (KeyError, ValueError, TypeError):
        return PhysicalMetadata()
    pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
    sx, sy, sz = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeZ")
    unit = normalize_unit(pixels.get("PhysicalSizeXUnit", "µm"))  # OME default unit: µm
    channels = pixels.get("Channel")
    channels = channels if isinstance(channels, list) else [channels] if channels else []
    names = tuple(str(c.get("Name")) for c in channels if isinstance(c, dict) and c.get("Name") is not None)
    ps = (float(sy if sy is not None else sx), float(sx)) if sx is not None else None
    return PhysicalMetadata(pixel_size=ps, unit=unit if (ps or sz) else None,
                            z_spacing=float(sz) if sz is not None else None,
                            channel_names=names if names and len(names) == len(channels) else None)


def from_ngff(axes: list[dict], scale: list[float] | None, omero: dict | None) -> PhysicalMetadata:
    """From NGFF ``multiscales[0]``: ``axes`` (name, type, unit) and level 0's ``scale``."""
    size = dict(zip([a["name"].lower() for a in axes], scale or [None] * len(axes)))
    unit = next((normalize_unit(a.get("unit")) for a in axes if a["name"].lower() in ("x", "y") and a.get("unit")),
                None)
    ps = (float(size["y"]), float(size["x"])) if size.get("x") and size.get("y") else None
    names = None
    if omero and isinstance(omero.get("channels"), list):
        labels = [c.get("label") for c in omero["channels"]]
        names = tuple(str(x) for x in labels) if all(x is not None for x in labels) else None
    return PhysicalMetadata(pixel_size=ps, unit=unit, z_spacing=float(size["z"]) if size.get("z") else None,
                            channel_names=names)


# ----------------------------------------------------------------------------------------- writing


def _tiff_unit(unit: str | None) -> tuple[int, float] | None:
    """(ResolutionUnit, factor to convert a size in ``unit`` to that unit) for plain TIFF."""
    return {"inch": (2, 1.0), "cm": (3, 1.0), "mm": (3, 0.1), "µm": (3, 1e-4), "nm": (3, 1e-7)}.get(unit or "")


def encode_tiff(data: np.ndarray, axes: str, meta: PhysicalMetadata | None, family: str) -> bytes:
    """Encode ``data`` (axes such as ``YX``, ``YXS``, ``CYX``, ``TCYX``) as a TIFF of ``family``:
    ``"ome-tiff"``, ``"imagej"`` or ``"tiff"``, with ``meta`` written the family's way."""
    import io as _io

    meta = meta or PhysicalMetadata()
    out = _io.BytesIO()
    rgb = axes.endswith("S") and data.shape[-1] in (3, 4)
    options: dict = {"compression": "zlib", "photometric": "rgb" if rgb else "minisblack"}
    if rgb and data.shape[-1] == 4:
        options["extrasamples"] = ["unassalpha"]
    if family == "imagej" and data.dtype in (np.uint8, np.uint16, np.float32):
        md: dict = {"axes": axes}
        if meta.unit:
            md["unit"] = "micron" if meta.unit == "µm" else meta.unit
        if meta.z_spacing:
            md["spacing"] = meta.z_spacing
        if meta.channel_names:
            md["Labels"] = list(meta.channel_names)
        if meta.pixel_size:
            options["resolution"] = (1.0 / meta.pixel_size[1], 1.0 / meta.pixel_size[0])
        options.pop("compression")  # ImageJ reads uncompressed hyperstacks only
        tifffile.imwrite(out, data, imagej=True, metadata=md, **options)
        return out.getvalue()
    if family in ("ome-tiff", "imagej"):
        md = {"axes": axes}
        if meta.pixel_size:
            md.update(PhysicalSizeX=meta.pixel_size[1], PhysicalSizeY=meta.pixel_size[0])
            if meta.unit:
                md.update(PhysicalSizeXUnit=meta.unit, PhysicalSizeYUnit=meta.unit)
        if meta.z_spacing:
            md["PhysicalSizeZ"] = meta.z_spacing
            if meta.unit:
                md["PhysicalSizeZUnit"] = meta.unit
        n_channels = data.shape[axes.index("C")] if "C" in axes else 0
        if meta.channel_names and len(meta.channel_names) == n_channels:
            md["Channel"] = {"Name": list(meta.channel_names)}
        tifffile.imwrite(out, data, ome=True, metadata=md, **options)
        return out.getvalue()
    # plain TIFF (also GeoTIFF): resolution in inch/cm, georeferencing tags verbatim
    if axes not in ("YX", "YXS"):
        options["metadata"] = {"axes": axes}
    if axes == "CYX":  # microscopy convention: one plane per channel (planar), as io.encode_image
        options["planarconfig"] = "separate"
    unit = _tiff_unit(meta.unit) if meta.pixel_size else None
    if unit:
        code, factor = unit
        options["resolution"] = (1.0 / (meta.pixel_size[1] * factor), 1.0 / (meta.pixel_size[0] * factor))
        options["resolutionunit"] = code
    if meta.geotiff_tags:
        options["extratags"] = [(code, dtype, count if dtype != 2 else 0, value, True)
                                for code, dtype, count, value in meta.geotiff_tags]
    tifffile.imwrite(out, data, **options)
    return out.getvalue()
