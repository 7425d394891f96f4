"""The local cache folder and the locks that let many processes on a node fill it once.

A leaf module (it imports nothing from ray_mff): exported ONNX graphs (:func:`ray_mff.export.cached_onnx`)
and TensorRT plans and timing caches (:mod:`ray_mff.engines.tensorrt_build`) live under
:func:`cache_root`; :func:`file_lock` makes the Ray actors of one node build each of them once.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path


def cache_root() -> Path:
    """``$RAY_MFF_CACHE`` or ``~/.cache/ray-mff``."""
    env = os.environ.get("RAY_MFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ray-mff"


def file_sha(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = 600.0):
    """Exclusive advisory lock on ``path`` (created if missing) for processes on one host."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: lock held for more than {timeout:.0f} s")
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
