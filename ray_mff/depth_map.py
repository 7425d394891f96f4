"""Depth maps of a fused focus stack: which focal plane each pixel came from, and how high that is.

Shape from focus (Nayar & Nakagawa, "Shape from focus", TPAMI 16(8), 1994): the plane in which a
pixel is sharpest gives its depth. The fusion's per-pixel source index (``FusionResult.index_map``,
the plane with the largest decision weight) is that plane; with the stack's z spacing the height
is ``index x spacing`` above the first plane, in the stack's length unit.

Written beside the fused image, ``OUTPUT/<stack>``:

- ``<stack>_depth.tif``: plane index, uint16, the fused output's axes without samples (``YX``,
  ``CYX``, ``TCYX``...), with the input's pixel size;
- ``<stack>_height.tif``: float32 height in physical units, when the z spacing is known;
- ``<stack>_depth.png``: a colour preview (viridis: first plane dark blue, last yellow) of the first
  (T, C) plane.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import cv2
import numpy as np

from ray_mff import io, storage
from ray_mff.metadata import encode_tiff


def preview(index: np.ndarray, n_planes: int) -> np.ndarray:
    """(H, W) plane index -> (H, W, 3) uint8 RGB, viridis over [0, n_planes - 1]."""
    scaled = np.rint(index.astype(np.float32) * (255.0 / max(n_planes - 1, 1))).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def write_depth_maps(output_root: str, stack_id: str, src, index_maps: Sequence[np.ndarray]) -> dict[str, str]:
    """Write the depth maps of one stack (see module docstring); returns {"depth", "height"?, "preview"} uris.

    src: the stack's :class:`ray_mff.zstack.StackSource` (output axes, metadata, plane count);
    index_maps: one (H, W) plane index per (T, C) group, in ``src.groups`` order.
    """
    axes = src.axes[:-1] if src.axes.endswith("S") else src.axes
    shape = src.shape[:-1] if src.axes.endswith("S") else src.shape
    index = np.empty(shape, np.uint16)
    for (key, _), idx in zip(src.groups, index_maps):
        index[key] = idx
    family = src.family if src.family in ("ome-tiff", "imagej") else "ome-tiff" if src.family == "ome-zarr" else "tiff"
    meta = replace(src.meta, channel_names=src.meta.channel_names if "C" in axes else None)
    uris = {"depth": storage.join_uri(output_root, f"{stack_id}_depth.tif")}
    storage.write_bytes_atomic(uris["depth"], encode_tiff(index, axes, meta, family))
    if src.meta.z_spacing:
        height = index.astype(np.float32) * np.float32(src.meta.z_spacing)
        uris["height"] = storage.join_uri(output_root, f"{stack_id}_height.tif")
        storage.write_bytes_atomic(uris["height"], encode_tiff(height, axes, meta, family))
    uris["preview"] = storage.join_uri(output_root, f"{stack_id}_depth.png")
    io.write_image(uris["preview"], preview(index_maps[0], src.n_planes))
    return uris
