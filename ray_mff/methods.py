"""The ONE registry of fusion methods: a name becomes a *fuser*.

A fuser is any object with ``name`` and ``fuse(images) -> FusionResult``. Two families:

- classical (``guided``, ``dwt``): plain array code in :mod:`ray_mff.fusion`, no weights;
- learned (``stacknet_s`` — the default — and the other registered models): a network from
  :mod:`ray_mff.models` run by an engine (:mod:`ray_mff.engines`), driven by
  :class:`ray_mff.fusion.stack_fuser.StackFuser` for stack-native models (one joint pass over
  the stack) or :class:`ray_mff.fusion.model_fuser.ModelFuser` for pair models (``cascade``...).
"""
from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ray_mff.fusion.result import FusionResult

DEFAULT_METHOD = "stacknet_s"
CLASSICAL_METHODS = ("guided", "dwt")


@dataclass
class ClassicalFuser:
    """Wraps a classical ``fuse_xxx(images, **options) -> FusionResult`` function."""

    name: str
    function: Callable[..., FusionResult]
    options: dict = field(default_factory=dict)
    engine: str = "numpy"
    precision: str = "fp32"

    def fuse(self, images: Sequence[np.ndarray]) -> FusionResult:
        result = self.function(images, **self.options)
        result.stats.setdefault("engine", self.engine)
        result.stats.setdefault("precision", self.precision)
        return result


def _classical(name: str) -> Callable[..., FusionResult]:
    if name == "guided":
        from ray_mff.fusion.guided import fuse_guided

        return fuse_guided
    if name == "dwt":
        from ray_mff.fusion.dwt import fuse_dwt

        return fuse_dwt
    raise KeyError(name)


def list_methods() -> list[str]:
    """Every name ``--method`` accepts: learned models first, then classical methods."""
    from ray_mff.models import list_models

    return [*list_models(), *CLASSICAL_METHODS]


def default_method() -> str:
    """The shipped default model when its weights are in the package, else ``guided``."""
    from pathlib import Path

    shipped = Path(__file__).parent / "models" / "weights" / f"{DEFAULT_METHOD}.safetensors"
    return DEFAULT_METHOD if shipped.is_file() else "guided"


def get_fuser(
    name: str | None = None,
    *,
    engine: str = "auto",
    precision: str = "fp32",
    calibration: bool = True,
    weights: str | None = "default",
    **options,
):
    """Build the fuser for ``name`` (``None`` = :func:`default_method`).

    ``engine``/``precision`` apply to learned models; ``calibration`` selects decision
    calibration (True) or serial pair-by-pair fusion (False) for stacks of more than two images;
    other keyword options go to the method (e.g. ``area_ratio`` for ``guided``).

    ``tile_size`` (pixels per side): images with a side over twice this are fused in tiles of
    this size (:class:`ray_mff.tiling.TiledFuser`); learned models default to
    :data:`ray_mff.tiling.DEFAULT_TILE_SIZE`, classical methods tile only when it is given; 0/None
    turns tiling off.
    """
    from ray_mff.tiling import DEFAULT_TILE_SIZE, maybe_tiled

    name = name or default_method()
    tile_size = options.pop("tile_size", None)
    weights = local_weights(weights)
    if name in CLASSICAL_METHODS:
        return maybe_tiled(ClassicalFuser(name, _classical(name), options), tile_size)
    from ray_mff.models import list_models

    if name not in list_models():
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}")
    from ray_mff.fusion.stack_fuser import stack_fuser_for

    stack = stack_fuser_for(name, engine=engine, precision=precision, weights=weights, calibration=calibration,
                            **options)
    if stack is not None:  # stack-native (issue 13): StackFuser, tiled like the pair models
        return maybe_tiled(stack, DEFAULT_TILE_SIZE if tile_size is None else tile_size)
    from ray_mff.engines import make_engine
    from ray_mff.fusion.model_fuser import ModelFuser

    tile_size = DEFAULT_TILE_SIZE if tile_size is None else tile_size
    # a TensorRT profile must accept the largest image fused whole (twice the tile size)
    engine_obj = make_engine(name, engine=engine, precision=precision, weights=weights,
                             max_tile=2 * int(tile_size or DEFAULT_TILE_SIZE))
    return maybe_tiled(ModelFuser(engine_obj, calibration=calibration, **options), tile_size)


def local_weights(weights):
    """``weights`` as something :func:`ray_mff.models.get_model` opens: ``"default"``, None and local
    paths pass through; a remote URI (``s3://...``) is fetched once per node into the cache
    (``$RAY_MFF_CACHE/weights/``, named by the URI and its version) and its local path returned, so every
    Ray actor of a cluster reads the same file without a shared file system."""
    from ray_mff import storage

    if weights is None or str(weights) == "default" or not storage.is_remote(str(weights)):
        return weights
    import hashlib

    from ray_mff.cache import cache_root, file_lock

    uri = str(weights)
    fs, path = storage.resolve(uri)
    info = fs.info(path)
    version = str(info.get("ETag") or info.get("etag") or "") + str(info.get("size"))
    key = hashlib.sha1(f"{uri}|{version}".encode()).hexdigest()[:16]
    local = cache_root() / "weights" / f"{key}.safetensors"
    if not local.is_file():
        with file_lock(local.with_suffix(".lock")):
            if not local.is_file():
                tmp = local.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(storage.read_bytes(uri))
                os.replace(tmp, local)
    return str(local)
