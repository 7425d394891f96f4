"""ray-mff: multi-focus image fusion at archive scale.

Python API (mirrors ``ray-mff fuse``)::

    import ray_mff
    result = ray_mff.fuse_stack(["a.png", "b.png"])          # default model
    result = ray_mff.fuse_stack([img_a, img_b, img_c], method="guided")
    result.fused, result.weights, result.index_map, result.stats
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ray_mff.errors import MFFError
from ray_mff.fusion.result import FusionResult

__version__ = "0.1.0"
__all__ = ["FusionResult", "MFFError", "fuse_stack", "__version__"]


def fuse_stack(images: Sequence[np.ndarray | str], method: str | None = None, **options) -> FusionResult:
    """Fuse one stack of N >= 2 registered images (arrays, local paths or fsspec URLs).

    ``method`` is any name from ``ray-mff methods`` (default: the shipped model); ``options`` go to
    :func:`ray_mff.methods.get_fuser` (``engine``, ``precision``, ``calibration``, method knobs).
    ``images`` may also be one path of a single-file z-stack (``"cells.ome.tif"``, ``"x.ome.zarr"``;
    one T/C combination) or a lazy :class:`ray_mff.planes.PlaneSequence`: planes are then read as
    fusion needs them (:mod:`ray_mff.zstack`).
    """
    from ray_mff import io
    from ray_mff.methods import get_fuser
    from ray_mff.planes import is_lazy

    if isinstance(images, str):
        from ray_mff.zstack import open_source

        with open_source([images]) as src:
            if len(src.groups) != 1 or src.n_planes < 2:
                raise ValueError(f"{images}: {len(src.groups)} T/C planes series of {src.n_planes} planes; "
                                 "fuse_stack takes one series of >= 2 (ray-mff fuse handles T and C)")
            return get_fuser(method, **options).fuse(src.groups[0][1])
    if is_lazy(images):
        return get_fuser(method, **options).fuse(images)

    arrays = [io.read_image(x) if isinstance(x, str) else np.asarray(x) for x in images]
    io.check_stack(arrays, [x if isinstance(x, str) else f"image[{i}]" for i, x in enumerate(images)])
    if len(arrays) < 2:
        raise ValueError("fuse_stack needs at least two images")
    return get_fuser(method, **options).fuse(arrays)
