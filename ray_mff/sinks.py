"""The write stage: a fused stack becomes files and scores for its manifest row.

discover (``stacks.py``) -> read (``io.py``) -> fuse (``fusion/``, ``models/``) -> **write** (here).
Both executors end a stack here: the local loop through :func:`ray_mff.runner.process_stack`, the Ray
pipeline in its CPU post stage (:mod:`ray_mff.pipeline`), so outputs and scores are the same
whoever ran the stack.

- :func:`write_outputs`: the fused image (PNG for 8-bit, TIFF otherwise, or ``opts.output_format``)
  and, when asked, the decision map picture under ``decision_maps/``; writes are atomic
  (:func:`ray_mff.io.write_image`).
- :func:`score`: the no-reference fusion metrics of the manifest (Q_G, Q_Y, Q_MI;
  :mod:`ray_mff.metrics`), skipped above the run's pixel and source limits.
"""
from __future__ import annotations

import numpy as np

from ray_mff import io, storage
from ray_mff.fusion.result import FusionResult

DECISION_MAP_DIR = "decision_maps"


def output_uri_for(output_root: str, stack_id: str, image: np.ndarray | None, fmt: str | None) -> str:
    """``OUTPUT/<stack_id>.<ext>``: ``fmt`` when given, else the default extension for ``image``."""
    ext = f".{fmt.lower().lstrip('.')}" if fmt else (io.default_extension(image) if image is not None else ".png")
    return storage.join_uri(output_root, f"{stack_id}{ext}")


def decision_map_image(result: FusionResult, n: int) -> np.ndarray | None:
    """8-bit picture of the decision: D for pairs, the source index scaled to 0..255 otherwise.

    Huge tiled results carry only the index map (no (H, W, N) weights); pairs then show it too.
    """
    if result.weights is not None and n == 2:
        return np.clip(np.rint(result.weights[..., 0] * 255), 0, 255).astype(np.uint8)
    index = result.index_map
    if index is None:
        return None
    if n == 2:  # index 0 = first source in focus, shown white like D = 1
        return np.where(index == 0, 255, 0).astype(np.uint8)
    return np.rint(index.astype(np.float32) * (255.0 / (n - 1))).astype(np.uint8)


def write_outputs(output_root: str, stack_id: str, fused: np.ndarray, opts,
                  decision_map: np.ndarray | None = None) -> dict:
    """Write the fused image (and the decision map picture when ``opts.save_decision_maps``).

    Returns the row fields ``output_uri`` and ``decision_map_uri`` (None when not written).
    """
    out_uri = output_uri_for(output_root, stack_id, fused, opts.output_format)
    io.write_image(out_uri, fused)
    dm_uri = write_decision_map(output_root, stack_id, decision_map) if opts.save_decision_maps else None
    return {"output_uri": out_uri, "decision_map_uri": dm_uri}


def write_decision_map(output_root: str, stack_id: str, decision_map: np.ndarray | None) -> str | None:
    """``OUTPUT/decision_maps/<stack_id>.png`` (atomic); None when there is no map to write."""
    if decision_map is None:
        return None
    uri = storage.join_uri(output_root, DECISION_MAP_DIR, f"{stack_id}.png")
    io.write_image(uri, decision_map)
    return uri


def score(images: list[np.ndarray], fused: np.ndarray, opts) -> dict:
    """Q_G, Q_MI (and Q_Y up to ``opts.q_y_max_sources`` sources) of ``fused``; {} when metrics
    are off or the image is over ``opts.metrics_max_pixels``. Every image goes to grey once."""
    if not opts.compute_metrics or len(images) < 2 or fused.shape[0] * fused.shape[1] > opts.metrics_max_pixels:
        return {}
    from ray_mff import metrics

    keys = ("q_g", "q_mi", "q_y") if len(images) <= opts.q_y_max_sources else ("q_g", "q_mi")
    return metrics.evaluate(images, fused, keys=keys)
