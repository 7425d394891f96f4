"""Lazy plane sequences: the focal planes of a stack, each read from storage when it is indexed.

A fuser takes ``images: Sequence[np.ndarray]``. A :class:`PlaneSequence` is such a sequence that
holds no pixels: ``planes[k]`` reads plane k (one page of a TIFF, one chunk row of a zarr array,
one file of a folder stack) and forgets it. Fusion that folds over planes (``guided``, ``dwt``,
decision calibration) then peaks at one plane plus its running state, whatever the stack depth.

``planes.crop(y0, y1, x0, x1)`` is the same sequence restricted to a window; on chunked storage
(OME-Zarr, tiled TIFF through tifffile's zarr store) a read then touches only the chunks/tiles
under that window, which is what :mod:`ray_mff.tiling` uses.

Example::

    >>> import numpy as np
    >>> planes = ArrayPlanes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "ZYX")
    >>> len(planes), planes.shape, planes[1][0, 0]
    (2, (3, 4), np.uint8(12))
    >>> planes.crop(1, 3, 0, 2)[0].tolist()
    [[4, 5], [8, 9]]
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np


class PlaneSequence(Sequence):
    """Base: ``len``, ``planes[k]`` -> (H, W) or (H, W, S) array, ``shape`` and ``dtype`` of one plane.

    Members agree in shape and dtype by construction (or raise naming the file on read), so
    :func:`ray_mff.fusion.decision.check_stack` does not read them to check.
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, k: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"plane {k} outside a stack of {n}")
        return self._read(k)

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> "PlaneSequence":
        """The same planes restricted to rows [y0, y1) and columns [x0, x1)."""
        return _Cropped(self, (y0, y1, x0, x1))

    def _read_window(self, k: int, window: tuple[int, int, int, int]) -> np.ndarray:
        y0, y1, x0, x1 = window
        return self._read(k)[y0:y1, x0:x1]

    @property
    def nbytes(self) -> int:
        """Bytes of all planes, were they read at once."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize * len(self)


class _Cropped(PlaneSequence):
    def __init__(self, base: PlaneSequence, window: tuple[int, int, int, int]):
        self.base, self.window = base, window
        y0, y1, x0, x1 = window
        self.shape = (y1 - y0, x1 - x0) + tuple(base.shape[2:])
        self.dtype = base.dtype

    def __len__(self) -> int:
        return len(self.base)

    def _read(self, k: int) -> np.ndarray:
        return self.base._read_window(k, self.window)

    def crop(self, y0, y1, x0, x1) -> PlaneSequence:
        a, _, b, _ = self.window
        return _Cropped(self.base, (a + y0, a + y1, b + x0, b + x1))


class ArrayPlanes(PlaneSequence):
    """Planes of an array-like (numpy, zarr, tifffile's zarr store) along its ``Z`` axis.

    arr:   any object with ``shape``, ``dtype`` and numpy basic indexing (zarr reads only the
           chunks an index touches).
    axes:  one letter per dimension of ``arr``; must hold ``Z``, ``Y`` and ``X``. A trailing
           ``S`` (samples: RGB) stays in the plane as (H, W, S).
    fixed: index of every other axis (e.g. ``{"T": 0, "C": 1}``) selecting one (T, C) plane series.
    """

    def __init__(self, arr, axes: str, fixed: dict[str, int] | None = None):
        self.arr, self.axes, self.fixed = arr, axes, dict(fixed or {})
        if len(axes) != len(arr.shape):
            raise ValueError(f"axes {axes!r} do not match an array of shape {tuple(arr.shape)}")
        missing = set(axes) - set("ZYXS") - set(self.fixed)
        if missing or not {"Z", "Y", "X"} <= set(axes):
            raise ValueError(f"axes {axes!r}: need Z, Y, X and an index for {sorted(missing)}")
        size = dict(zip(axes, arr.shape))
        self._n = size["Z"]
        self.shape = (size["Y"], size["X"]) + ((size["S"],) if "S" in size else ())
        self.dtype = np.dtype(arr.dtype)
        # the plane comes out in source axis order; this permutes it to (Y, X[, S])
        kept = [a for a in axes if a in "YXS"]
        self._perm = tuple(kept.index(a) for a in "YXS" if a in kept)

    def __len__(self) -> int:
        return self._n

    def _index(self, k: int, window=None) -> tuple:
        idx = []
        for a in self.axes:
            if a == "Z":
                idx.append(k)
            elif a == "Y":
                idx.append(slice(window[0], window[1]) if window else slice(None))
            elif a == "X":
                idx.append(slice(window[2], window[3]) if window else slice(None))
            elif a == "S":
                idx.append(slice(None))
            else:
                idx.append(self.fixed[a])
        return tuple(idx)

    def _read(self, k: int) -> np.ndarray:
        return self._plane(self.arr[self._index(k)])

    def _read_window(self, k, window):
        return self._plane(self.arr[self._index(k, window)])

    def _plane(self, a) -> np.ndarray:
        a = np.asarray(a)
        if self._perm != tuple(range(a.ndim)):
            a = np.ascontiguousarray(a.transpose(self._perm))
        return a


class FilePlanes(PlaneSequence):
    """One plane per file (a folder stack), read with ``reader(uri)`` on access.

    Each read is checked against the first member's shape and dtype; a member that differs raises
    :class:`ray_mff.errors.StackMismatchError` naming it.
    """

    def __init__(self, uris: Sequence[str], reader: Callable[[str], np.ndarray], first: np.ndarray | None = None):
        self.uris, self.reader = list(uris), reader
        first = reader(self.uris[0]) if first is None else first
        self.shape, self.dtype = tuple(first.shape), first.dtype

    def __len__(self) -> int:
        return len(self.uris)

    def _read(self, k: int) -> np.ndarray:
        from ray_mff.errors import StackMismatchError

        img = self.reader(self.uris[k])
        if tuple(img.shape) != self.shape or img.dtype != self.dtype:
            raise StackMismatchError(self.uris[k], f"{img.shape} {img.dtype} differs from the stack's first member "
                                                   f"{self.shape} {self.dtype} in {self.uris[0]}")
        return img


class MappedPlanes(PlaneSequence):
    """``fn`` applied to each plane on access (e.g. luminance); nothing is kept."""

    def __init__(self, base: Sequence, fn: Callable[[np.ndarray], np.ndarray]):
        self.base, self.fn = base, fn
        self.shape = tuple(base.shape) if hasattr(base, "shape") else None
        self.dtype = getattr(base, "dtype", None)

    def __len__(self) -> int:
        return len(self.base)

    def _read(self, k: int) -> np.ndarray:
        return self.fn(self.base[k])


def is_lazy(images) -> bool:
    """True for a :class:`PlaneSequence` (planes read on access), False for arrays held in memory."""
    return isinstance(images, PlaneSequence)


def mapped(images: Sequence[np.ndarray], fn: Callable[[np.ndarray], np.ndarray]) -> Sequence[np.ndarray]:
    """``[fn(img) for img in images]`` for images in memory; a lazy :class:`MappedPlanes` for a
    :class:`PlaneSequence`, so a deep stack never holds N results at once."""
    if is_lazy(images):
        return MappedPlanes(images, fn)
    return [fn(img) for img in images]


def crop(images: Sequence[np.ndarray], y0: int, y1: int, x0: int, x1: int) -> Sequence[np.ndarray]:
    """Window [y0, y1) x [x0, x1) of every plane; lazy (reads only that window) for a PlaneSequence."""
    if is_lazy(images):
        return images.crop(y0, y1, x0, x1)
    return [np.asarray(img)[y0:y1, x0:x1] for img in images]


def plane_shape(images: Sequence[np.ndarray]) -> tuple[int, ...]:
    """Shape of one plane without reading one when the sequence knows it."""
    if is_lazy(images) and images.shape is not None:
        return tuple(images.shape)
    return tuple(np.asarray(images[0]).shape)
