"""Tiled fusion for large images: memory bounded by the tile size, no seams.

Remote-sensing scenes and stitched microscopy reach 10k x 10k pixels and more; a fully
convolutional network's activations grow with the image (the shipped ``cascade`` holds ~100
float32 maps per pixel at its peak), so :class:`TiledFuser` wraps any weights-producing fuser
and runs it tile by tile:

1. **Tiles.** Each axis is cut into *cores* at boundaries ``c_1 < c_2 < ...``. A tile's crop is its
   core, widened by ``feather / 2`` (the blend zone) plus ``margin`` (context that is computed and
   thrown away) on every side that is not the image border, with its origin rounded down to a
   multiple of ``align``, and its length too (except at the image end), so strided layers
   (``cascade`` samples its activities every 2 px and its context branch pools those by 4, a
   stride of 8, then upsamples back) see the same pixel grid as in the whole image. ``margin``
   must cover the receptive field of the network plus the guided-filter radius (``cascade``:
   about 120 px), so that inside the blend zone a tile's weights equal the untiled ones.
2. **Blend the weights, not the pixels.** Each tile's (h, w, N) decision weights are multiplied by
   a separable raised-cosine window that is 1 in the core and falls 1 -> 0 across the blend zone,
   where the neighbour's window rises 0 -> 1: the windows sum to exactly 1 everywhere (partition of
   unity), so the blended weights still sum to 1 per pixel and no seam can appear. The fused
   image is then ``F = sum_n W_n I_n`` from the blended weights (:func:`fuse_with_weights`), the
   same rule the inner fuser applies; multi-image stacks are calibrated per tile by the inner
   fuser (the calibration is per pixel).
3. **Stream rows of tiles.** Tiles are visited row by row; blended weights accumulate in a band of
   ``(tile rows x W x N)`` float32; rows that no later tile touches are fused into the output and
   dropped, and only the blend-zone rows are carried into the next band.

**Memory.** Peak is the sources (held by the caller) + the output + one band of weights
(``~tile_size x W x N x 4`` bytes) + the inner fuser's working set for one tile; never a full-size
float32 map per source, and no memory that an engine keeps between calls (ONNX Runtime's arenas
are off while tiling: :meth:`ray_mff.engines.onnx_engine.OnnxEngine.without_arena`). The full
``(H, W, N)`` float32 weights are returned only when they fit ``weights_budget`` (default 1 GiB;
a 12000 x 12000 3-image stack would need 1.7 GB, which with 2.6 GB of uint16 RGB sources and the
0.86 GB output would not leave room for the working set under a 6 GiB bound). Above the budget
the result carries the per-pixel source index (``index_map``, uint16, 2 bytes/pixel,
blended-weight argmax) and ``weights=None``.

The inner network must be *local* for tiles to match the whole image: ``cascade`` is (its
channel attention pools cells of 16 px, not the whole image, and it upsamples by exact factors,
so a crop on the 32 px grid sees the whole image's pixel grid; receptive field +-117 px, measured
from input gradients, inside the 128 px margin). A global operation would make every tile
differ: with squeeze-and-excitation over the whole input, tiled and untiled results differed by
up to 7 grey levels on a 3000 x 3000 crop. Tiled vs untiled results are compared in
``tests/test_tiling.py`` and ``bench/tiling.py``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ray_mff.fusion.decision import fuse_with_weights
from ray_mff.fusion.result import FusionResult
from ray_mff.planes import crop, plane_shape

#: default tile side (pixels): ~1 MP crops keep the network's working set near 1 GB
DEFAULT_TILE_SIZE = 1024
#: default context margin: cascade's receptive field is +-117 px (a context branch at 1/8 resolution with
#: dilations 1, 2, 4, its local channel attention and its boundary guided filter)
DEFAULT_MARGIN = 128
#: default blend-zone width
DEFAULT_FEATHER = 32
#: default alignment of tile origins (a multiple of every stride in the shipped networks)
DEFAULT_ALIGN = 32
#: return the full (H, W, N) float32 weights only up to this many bytes
DEFAULT_WEIGHTS_BUDGET = 1 << 30
#: rows fused per output chunk (bounds the float32 temporaries of fuse_with_weights)
FUSE_CHUNK_ROWS = 256


@dataclass(frozen=True)
class AxisSegment:
    """One tile position along an axis.

    core:    [start, end) this tile owns (cores partition the axis);
    support: [start, end) where its blend window is non-zero (core +- feather/2, clipped);
    crop:    [start, end) the inner fuser sees (support + margin, origin aligned, clipped).
    """

    core: tuple[int, int]
    support: tuple[int, int]
    crop: tuple[int, int]


def split_axis(n: int, tile: int, margin: int, feather: int, align: int = 1) -> list[AxisSegment]:
    """Cut an axis of length ``n`` into segments whose crops are at most ``tile`` long.

    Interior boundaries sit at evenly spaced positions; one segment when ``n <= tile``.
    """
    if n <= tile:
        return [AxisSegment((0, n), (0, n), (0, n))]
    half = feather // 2
    core_max = tile - 2 * (margin + half) - 2 * (align - 1)
    if core_max < max(16, feather):
        raise ValueError(f"tile {tile} is too small for margin {margin}, feather {feather} and align {align}")
    k = math.ceil(n / core_max)
    cuts = [round(i * n / k) for i in range(k + 1)]
    out = []
    for i in range(k):
        a, b = cuts[i], cuts[i + 1]
        s0 = 0 if i == 0 else a - half
        s1 = n if i == k - 1 else b - half + feather
        c0 = 0 if i == 0 else max(0, (s0 - margin) // align * align)
        # crop *length* a multiple of align too: a network that pools (ceil mode) and upsamples back
        # to the input *size* stretches its grid across a crop whose length is off the pooling grid
        # (cascade upsamples by exact factors instead, but other registered models may not)
        c1 = n if i == k - 1 else min(n, c0 + -(-(s1 + margin - c0) // align) * align)
        out.append(AxisSegment((a, b), (s0, s1), (c0, c1)))
    return out


def blend_window(seg: AxisSegment, cuts_before: bool, cuts_after: bool, feather: int) -> np.ndarray:
    """1-D raised-cosine window over ``seg.support``: rises across the zone at the core start,
    falls across the zone at the core end; neighbouring windows sum to exactly 1."""
    s0, s1 = seg.support
    x = np.arange(s0, s1, dtype=np.float64) + 0.5
    w = np.ones_like(x)
    half = feather // 2
    if cuts_before:
        u = np.clip((x - (seg.core[0] - half)) / feather, 0.0, 1.0)
        w *= 0.5 - 0.5 * np.cos(np.pi * u)
    if cuts_after:
        u = np.clip((x - (seg.core[1] - half)) / feather, 0.0, 1.0)
        w *= 0.5 + 0.5 * np.cos(np.pi * u)
    return w.astype(np.float32)


@dataclass
class TiledFusionResult(FusionResult):
    """A :class:`FusionResult` that may carry its index map without the full weights."""

    stored_index_map: np.ndarray | None = field(default=None, repr=False)

    @property
    def index_map(self) -> np.ndarray | None:  # type: ignore[override]
        if self.weights is not None:
            return np.argmax(self.weights, axis=-1).astype(np.uint16)
        return self.stored_index_map


class TiledFuser:
    """Wrap a fuser so that images larger than ``tile_size`` are fused tile by tile.

    fuser:          any fuser whose results carry ``weights`` (H, W, N); fusers without weights
                    (transform-domain methods) are blended on their fused pixels instead.
    tile_size:      largest crop side given to the inner fuser.
    untiled_max_side: images with both sides <= this go to the inner fuser whole (bit-identical
                    results); default ``2 * tile_size`` (2048: camera stacks such as stack_v4's
                    1600 x 1200 fuse whole, remote-sensing scenes are tiled).
    margin:         context pixels around each blend zone (>= receptive field + filter radius).
    feather:        blend-zone width in pixels.
    align:          tile origins are multiples of this (keeps strided layers on the image grid).
    weights_budget: bytes up to which the full (H, W, N) float32 weights are returned.

    Example::

        >>> fuser = TiledFuser(get_fuser("cascade"), tile_size=1024)   # doctest: +SKIP
        >>> result = fuser.fuse([a, b, c])          # 12000 x 12000 uint16 RGB   # doctest: +SKIP
        >>> result.index_map.shape, result.stats["tiles"]                         # doctest: +SKIP
        ((12000, 12000), 196)
    """

    def __init__(self, fuser, tile_size: int = DEFAULT_TILE_SIZE, margin: int = DEFAULT_MARGIN,
                 feather: int = DEFAULT_FEATHER, align: int = DEFAULT_ALIGN,
                 weights_budget: int = DEFAULT_WEIGHTS_BUDGET, untiled_max_side: int | None = None):
        self.fuser = fuser
        self.name = getattr(fuser, "name", "tiled")
        self.tile_size, self.margin, self.feather, self.align = int(tile_size), int(margin), int(feather), int(align)
        self.untiled_max_side = int(untiled_max_side) if untiled_max_side else 2 * self.tile_size
        self.weights_budget = int(weights_budget)
        split_axis(self.tile_size + 1, self.tile_size, self.margin, self.feather, self.align)  # validate early

    def __getattr__(self, item):  # engine, calibration... of the wrapped fuser
        if item == "fuser":
            raise AttributeError(item)
        return getattr(self.fuser, item)

    def needs_tiling(self, shape: tuple[int, ...]) -> bool:
        return shape[0] > self.untiled_max_side or shape[1] > self.untiled_max_side

    @property
    def fuse_batch(self):
        """The wrapped fuser's ``fuse_batch`` for the stacks under the tiling threshold (the others
        are tiled one by one); absent (AttributeError) when the wrapped fuser has none."""
        if getattr(self.fuser, "fuse_batch", None) is None:
            raise AttributeError("fuse_batch")
        return self._fuse_batch

    def _fuse_batch(self, stacks: Sequence[Sequence[np.ndarray]]) -> list[FusionResult]:
        whole = [i for i, images in enumerate(stacks) if not self.needs_tiling(plane_shape(images))]
        results: list = [None] * len(stacks)
        for i, result in zip(whole, self.fuser.fuse_batch([stacks[i] for i in whole]) if whole else []):
            results[i] = result
        return [self.fuse(images) if result is None else result for images, result in zip(stacks, results)]

    def fuse(self, images: Sequence[np.ndarray]) -> FusionResult:
        """N registered images (H, W) or (H, W, C) of one dtype -> FusionResult, tiled above the budget."""
        if not self.needs_tiling(plane_shape(images)):
            return self.fuser.fuse(images)
        first = np.asarray(images[0])
        # an engine that can keep memory between calls (ONNX Runtime's arena) must not while tiling
        engine = getattr(self.fuser, "engine", None)
        with getattr(engine, "without_arena", contextlib.nullcontext)():
            return self._fuse_tiles(images, first)

    def _fuse_tiles(self, images: Sequence[np.ndarray], first: np.ndarray) -> FusionResult:
        t0 = time.perf_counter()
        h, w = first.shape[:2]
        n = len(images)
        rows = split_axis(h, self.tile_size, self.margin, self.feather, self.align)
        cols = split_axis(w, self.tile_size, self.margin, self.feather, self.align)
        col_windows = [blend_window(s, j > 0, j < len(cols) - 1, self.feather) for j, s in enumerate(cols)]
        out = np.empty_like(first)
        keep_weights = h * w * n * 4 <= self.weights_budget
        full_weights = np.empty((h, w, n), np.float32) if keep_weights else None
        index_map = None if keep_weights else np.empty((h, w), np.uint16)
        by_weights = None  # decided by the first tile: blend weights, or fused pixels if there are none
        inner_stats: dict = {}
        carry = None
        for i, rs in enumerate(rows):
            r0, r1 = rs.support
            row_window = blend_window(rs, i > 0, i < len(rows) - 1, self.feather)
            band = None
            for j, cs in enumerate(cols):
                (y0, y1), (x0, x1) = rs.crop, cs.crop
                # a lazy plane sequence reads only this window (chunks/tiles of OME-Zarr, tiled TIFF)
                result = self.fuser.fuse(crop(images, y0, y1, x0, x1))
                if by_weights is None:
                    by_weights = result.weights is not None
                    inner_stats = dict(result.stats)
                tile = result.weights if by_weights else result.fused
                correction = getattr(result, "correction", None) if by_weights else None
                if correction is not None:  # stack-native models: blended like one more weight channel
                    tile = np.concatenate([tile, correction[..., None]], axis=-1)
                # the part of the tile inside its blend support, times the separable window
                part = tile[r0 - y0:r1 - y0, cs.support[0] - x0:cs.support[1] - x0].astype(np.float32, copy=False)
                window = row_window[:, None] * col_windows[j][None, :]
                if band is None:
                    band = np.zeros((r1 - r0, w) + part.shape[2:], np.float32)
                    if carry is not None:
                        band[:carry.shape[0]] += carry
                band[:, cs.support[0]:cs.support[1]] += part * (window[..., None] if part.ndim == 3 else window)
                del result, tile, part
            done = rows[i + 1].support[0] if i + 1 < len(rows) else h
            self._emit(images, band[:done - r0], r0, out, full_weights, index_map, by_weights)
            carry = band[done - r0:].copy()
            del band
        stats = {**inner_stats, "seconds": time.perf_counter() - t0, "tiles": len(rows) * len(cols),
                 "tile_size": self.tile_size, "tile_margin": self.margin, "tile_feather": self.feather}
        return TiledFusionResult(fused=out, weights=full_weights, method=self.name, stats=stats,
                                 stored_index_map=index_map)

    def _emit(self, images, band: np.ndarray, r0: int, out: np.ndarray, full_weights, index_map,
              by_weights: bool) -> None:
        """Write final rows [r0, r0 + len(band)) of the output (and weights or index map)."""
        for a in range(0, band.shape[0], FUSE_CHUNK_ROWS):
            b = min(band.shape[0], a + FUSE_CHUNK_ROWS)
            chunk = band[a:b]
            y0, y1 = r0 + a, r0 + b
            if by_weights:
                sources = crop(images, y0, y1, 0, out.shape[1])
                if chunk.shape[-1] == len(images) + 1:  # stack-native models: weights + luminance correction
                    from ray_mff.fusion.stack_fuser import fuse_with_correction

                    chunk, correction = chunk[..., :-1], chunk[..., -1]
                    out[y0:y1] = fuse_with_correction(sources, chunk, correction)
                else:
                    out[y0:y1] = fuse_with_weights(sources, chunk)
                if full_weights is not None:
                    full_weights[y0:y1] = chunk
                else:
                    index_map[y0:y1] = np.argmax(chunk, axis=-1)
            else:
                out[y0:y1] = _to_dtype(chunk, out.dtype)


def _to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def maybe_tiled(fuser, tile_size: int | None = DEFAULT_TILE_SIZE, **options):
    """``TiledFuser(fuser, tile_size, ...)``, or ``fuser`` itself when ``tile_size`` is None/0."""
    if not tile_size:
        return fuser
    return TiledFuser(fuser, tile_size=tile_size, **options)
