"""Stack fuser: a stack-native network (:mod:`ray_mff.models.stacknet`) behind a stack engine
(:mod:`ray_mff.engines.stack_engine`) -> :class:`FusionResult` for N >= 2 images.

Per stack (luminance in, every channel out):

- **one joint pass** (N <= ``chunk``, or ``calibration=False``, the reference mode): encode every
  image once, run the joint graph on all N: weights W (N softmax maps) and the fused luminance
  F_y. The fused image is the weighted blend of the sources plus the fused-result branch's
  luminance correction on every channel, ``F = sum_n W_n I_n + (F_y - sum_n W_n y_n)``: adding the
  same value to R, G and B moves the luminance (whose coefficients sum to 1) by exactly that value.
- **chunks + decision calibration** (N > ``chunk`` and ``calibration=True``): a reference image r
  (the middle one) joins every chunk of ``chunk - 1`` other images, so every chunk's logits can be
  read relative to the same image. The logits of a softmax are focus scores up to a per-pixel
  constant, so ``s_k = l_k - l_r`` is image k's score on a scale shared by all chunks; in the form
  :class:`ray_mff.fusion.calibration.DecisionCalibrator` takes, D_k = sigmoid((l_r - l_k) / c) =
  P(r sharper than k) at temperature c, whose calibrated score is exactly logit(1 - D_k) = s_k / c
  (c = :data:`CAL_SCALE` keeps it inside the calibrator's clip). Softmax calibration
  (temperature 1 / c, no tie-break measure: the joint network already ranks ties) then
  gives the weights the one-pass softmax would give if every chunk saw the same context; the
  correction is taken, per pixel, from the chunk holding the best-scoring image. Each image is
  encoded once; memory holds one chunk's features and the calibrator's scores.

Inputs are padded (edge replication) to the engine's ``stride`` and cropped back; the fused image
keeps the sources' dtype and channels.

Example::

    >>> from ray_mff.engines.stack_engine import make_stack_engine          # doctest: +SKIP
    >>> fuser = StackFuser(make_stack_engine("stacknet", engine="onnx"))   # doctest: +SKIP
    >>> result = fuser.fuse([img_a, img_b, img_c])                          # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ray_mff.engines.base import crop_to, describe_engine, pad_to_multiple
from ray_mff.fusion.calibration import DecisionCalibrator
from ray_mff.fusion.decision import check_stack
from ray_mff.fusion.luminance import from_unit_float, luminance, to_unit_float
from ray_mff.fusion.result import FusionResult

#: images per joint pass in calibrated mode (the reference included); training saw up to 8
DEFAULT_CHUNK = 8
#: images per encoder call at most this many pixels (batch x H x W)
ENCODE_PIXELS = 1 << 21
#: calibrated mode: a chunk holds at most this many pixels (images x H x W), so large images go in
#: smaller chunks (a chunk of 8 stack_v4 images, 1600 x 1200, peaked at 2.67 GB for 17 images)
CHUNK_PIXELS = 1 << 23
#: relative logits go to the calibrator divided by this (and its softmax temperature is 1 / this):
#: its scores are clipped at logit(1 - CAL_EPS) = 13.8, and a trained network's logits differ by
#: tens, so unscaled every image much sharper than the reference would tie at the clip and be
#: blended (measured: 12-image stacks, 35.1 dB calibrated vs 40.5 dB joint, step-150 weights)
CAL_SCALE = 4.0
CAL_EPS = 1e-6


@dataclass
class StackFusionResult(FusionResult):
    """A :class:`FusionResult` plus the fused-result branch's luminance correction (H, W), so
    :class:`ray_mff.tiling.TiledFuser` can blend it across tiles like the weights."""

    correction: np.ndarray | None = field(default=None, repr=False)


class StackFuser:
    """Fuser protocol (``name``, ``fuse``) for a stack-native model run by a stack engine.

    engine:      a stack engine (``encode``, ``decide_stack``, ``stride``).
    calibration: N > ``chunk``: True = chunks calibrated against a reference, False = one joint
                 pass over the whole stack (the reference mode; memory grows with N).
    chunk:       images per joint pass in calibrated mode (>= 2, the reference included); fewer
                 when they would exceed :data:`CHUNK_PIXELS`.
    reference:   calibration reference; None = the middle image (N // 2).
    correction:  add the fused-result branch's boundary correction (True, the design) or fuse with
                 the decision weights alone (False). Measured 2026-12-01 (model card): at the
                 checkpoints trained so far the decision alone scores higher, on BSDS500-val ground
                 truth (+0.3 dB) and on Lytro (Q_Y, Q_MI); the result's ``correction`` is kept either way.
    """

    def __init__(self, engine, *, calibration: bool = True, chunk: int = DEFAULT_CHUNK, reference: int | None = None,
                 name: str | None = None, correction: bool = True):
        if int(chunk) < 2:
            raise ValueError(f"chunk must be >= 2, got {chunk}")
        self.engine = engine
        self.calibration = bool(calibration)
        self.chunk = int(chunk)
        self.reference = reference
        self.correction = bool(correction)
        self.stride = int(getattr(engine, "stride", 1))
        self.name = name or getattr(engine, "model_name", None) or "stacknet"

    def _prep(self, lum: np.ndarray) -> np.ndarray:
        return pad_to_multiple(np.ascontiguousarray(lum, dtype=np.float32)[None, None], self.stride)

    def _encode(self, ys: list[np.ndarray]) -> np.ndarray:
        per_call = max(1, ENCODE_PIXELS // int(ys[0].shape[-2] * ys[0].shape[-1]))
        return np.concatenate([self.engine.encode(np.concatenate(ys[i:i + per_call], axis=0))
                               for i in range(0, len(ys), per_call)], axis=0)

    def _joint(self, lums: list[np.ndarray], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """One joint pass -> (weights (H, W, N), luminance correction (H, W))."""
        ys = [self._prep(y) for y in lums]
        feats = self._encode(ys)
        y = np.concatenate(ys, axis=0)
        _, wts, fused = self.engine.decide_stack(feats, y)
        wts = crop_to(wts, h, w)[:, 0]  # (N, H, W)
        blend = np.einsum("nhw,nhw->hw", wts, crop_to(y, h, w)[:, 0])
        return np.ascontiguousarray(np.moveaxis(wts, 0, -1)), crop_to(fused, h, w)[0, 0] - blend

    def _calibrated(self, images: Sequence[np.ndarray], h: int, w: int, ref: int,
                    chunk: int) -> tuple[np.ndarray, np.ndarray]:
        # luminances are made chunk by chunk: a long stack's N float32 planes are never all held
        n = len(images)
        cal = DecisionCalibrator(n, ref, (h, w), mode="softmax", beta=0.0, eps=CAL_EPS, temperature=1.0 / CAL_SCALE)
        cal.add_reference()
        y_ref = self._prep(luminance(images[ref]))
        f_ref = self._encode([y_ref])
        others = [k for k in range(n) if k != ref]
        correction = np.zeros((h, w), np.float32)
        best_chunk = np.full((h, w), -np.inf, np.float32)
        for i in range(0, len(others), chunk - 1):
            part = others[i:i + chunk - 1]
            ys = [self._prep(luminance(images[k])) for k in part]
            feats = np.concatenate([f_ref, self._encode(ys)], axis=0)
            y = np.concatenate([y_ref] + ys, axis=0)
            logit, wts, fused = self.engine.decide_stack(feats, y)
            logit = crop_to(logit, h, w)[:, 0]
            rel = logit[1:] - logit[:1]  # s_k = l_k - l_ref, on the scale every chunk shares
            for j, k in enumerate(part):
                # D_k = sigmoid((l_ref - l_k) / CAL_SCALE): the calibrator reads back s_k / CAL_SCALE
                z = np.clip(rel[j] / CAL_SCALE, -30.0, 30.0)
                cal.add(k, (1.0 / (1.0 + np.exp(z))).astype(np.float32))
            top = np.maximum(rel.max(axis=0), 0.0)  # the chunk's best score (the reference scores 0)
            blend = np.einsum("nhw,nhw->hw", crop_to(wts, h, w)[:, 0], crop_to(y, h, w)[:, 0])
            take = top > best_chunk
            correction[take] = (crop_to(fused, h, w)[0, 0] - blend)[take]
            np.maximum(best_chunk, top, out=best_chunk)
        return cal.weights(), correction

    def fuse(self, images: Sequence[np.ndarray]) -> FusionResult:
        """N >= 2 registered images (H, W) or (H, W, C), one dtype -> FusionResult (weights (H, W, N))."""
        check_stack(images)
        t0 = time.perf_counter()
        n = len(images)
        h, w = images[0].shape[:2]
        ref = None
        chunk = max(2, min(self.chunk, CHUNK_PIXELS // (h * w)))
        if n <= chunk or not self.calibration:
            weights, correction = self._joint([luminance(img) for img in images], h, w)
            mode = "pair" if n == 2 else "joint"
        else:
            ref = n // 2 if self.reference is None else int(self.reference)
            weights, correction = self._calibrated(images, h, w, ref, chunk)
            mode = "calibrated"
        fused = fuse_with_correction(images, weights, correction if self.correction else np.zeros_like(correction))
        desc = describe_engine(self.engine)
        stats = {"engine": desc.get("engine", "?"), "precision": desc.get("precision", "fp32"),
                 "device": desc.get("device", "cpu"), "calibration": mode, "reference": ref, "chunk": chunk,
                 "correction": self.correction,
                 "n": n, "seconds": time.perf_counter() - t0}
        return StackFusionResult(fused=fused, weights=weights, method=self.name, stats=stats, correction=correction)


def stack_fuser_for(name: str, *, engine: str = "auto", precision: str = "fp32", weights="default",
                    calibration: bool = True, **options) -> StackFuser | None:
    """A :class:`StackFuser` when the registered model ``name`` is stack-native (has
    ``decide_stack``), else None (a pair model: :class:`ray_mff.fusion.model_fuser.ModelFuser`)."""
    from ray_mff.engines.stack_engine import make_stack_engine
    from ray_mff.errors import EngineUnavailableError
    from ray_mff.models import build_model

    if not hasattr(build_model(name), "decide_stack"):
        return None
    if precision != "fp32":
        raise EngineUnavailableError(f"stack-native model {name!r} runs in fp32 only (asked for {precision})")
    return StackFuser(make_stack_engine(name, engine=engine, weights=weights), calibration=calibration, **options)


def fuse_with_correction(images: Sequence[np.ndarray], weights: np.ndarray, correction: np.ndarray) -> np.ndarray:
    """F = sum_n W_n I_n + correction on every channel, in unit float, back to the sources' dtype.

    images: N arrays (H, W) or (H, W, C); weights (H, W, N); correction (H, W) in luminance units
    of [0, 1]. Accumulates one source at a time (one float32 image of working memory)."""
    first = np.asarray(images[0])
    acc = np.zeros(first.shape, np.float32)
    for k, img in enumerate(images):
        wk = weights[..., k]
        acc += to_unit_float(img) * (wk[..., None] if first.ndim == 3 else wk)
    acc += correction[..., None] if first.ndim == 3 else correction
    return from_unit_float(acc, first.dtype)  # integers rounded and clipped, floats unclipped
