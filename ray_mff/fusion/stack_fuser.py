"""Stack fuser: a stack-native network (:mod:`ray_mff.models.stacknet`) behind a stack engine
(:mod:`ray_mff.engines.stack_engine`) -> :class:`FusionResult` for N >= 2 images.

Per stack (luminance in, every channel out):

- **one joint pass** (N <= ``chunk``, or ``calibration=False``, the reference mode): encode every
  image once, run the joint graph on all N: logits l_n, weights W = softmax_n(l) and, with the
  fused-result branch (``correction=True``), the fused luminance F_y. The fused image is the
  weighted blend of the sources plus the branch's luminance correction on every channel,
  ``F = sum_n W_n I_n + (F_y - sum_n W_n y_n)``: adding the same value to R, G and B moves the
  luminance (whose coefficients sum to 1) by exactly that value. Without the correction the
  decision graph alone runs (no fused-result branch: about 60 % of the joint graph's cost).
- **chunks + decision calibration** (N > ``chunk`` and ``calibration=True``): a reference image r
  (the middle one) joins every chunk of ``chunk - 1`` other images, so every chunk's logits can be
  read relative to the same image. The logits of a softmax are focus scores up to a per-pixel
  constant, so ``s_k = l_k - l_r`` is image k's score on a scale shared by all chunks (s_r = 0),
  the calibration of Ma et al.'s many-image fusion (a reference decision reused for every image
  instead of fusing pair after pair), and the weights are ``softmax_k(s_k)``: what the one-pass
  softmax would give if every chunk saw the same context. The correction is taken, per pixel,
  from the chunk holding the best-scoring image. Each image is encoded once.

Both modes fuse through :class:`_SoftmaxFusion`, a streaming softmax (running maximum, normaliser
and weighted sum, rescaled when the maximum grows: the online normaliser of Milakov and
Gimelshein, "Online normalizer calculation for softmax", 2018), so memory holds one chunk's
features, one float32 image and a few maps whatever N; the (H, W, N) weights are kept only while
they fit :data:`ray_mff.fusion.decision.FULL_WEIGHTS_MAX_BYTES` (deeper stacks carry their index
map instead, as ``guided``). A source is read only over the 128 x 128 cells where its weight
reaches :data:`NEGLIGIBLE` of the best image's so far (below it, it changes no stored value).

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

from ray_mff.engines.base import concat_batch, crop_to, describe_engine, pad_to_multiple
from ray_mff.fusion.decision import check_stack, keep_full_weights, nonzero_windows
from ray_mff.fusion.luminance import from_unit_float, luminance, to_unit_float
from ray_mff.fusion.result import FusionResult

#: images per joint pass in calibrated mode (the reference included); training saw up to 8
DEFAULT_CHUNK = 8
#: images per encoder call at most this many pixels (batch x H x W)
ENCODE_PIXELS = 1 << 21
#: calibrated mode: a chunk holds at most this many pixels (images x H x W), so large images go in
#: smaller chunks. stack_v4 (65 x 1600 x 1200, 2026-12-01, stacknet_s, decision graph, one core
#: free): chunks of 4 / 6 / 8 images took 9.8 / 8.7 / 8.2 s in the graph and peaked at 1.44 /
#: 1.83 / 1.99 GB for the whole process (the images alone are 0.37 GB); 8 images of it fit here.
CHUNK_PIXELS = 1 << 24
#: a source's softmax weight below this fraction of the leading image's (exp(s_k - max) < 1e-6)
#: is dropped over whole 128 x 128 cells: at most N x 1e-6 of full scale, 0.02 grey levels of an
#: 8-bit output for 65 images, and most of a deep stack's planes are never converted to float
NEGLIGIBLE = 1e-6


@dataclass
class StackFusionResult(FusionResult):
    """A :class:`FusionResult` plus the fused-result branch's luminance correction (H, W), so
    :class:`ray_mff.tiling.TiledFuser` can blend it across tiles like the weights."""

    correction: np.ndarray | None = field(default=None, repr=False)


class _SoftmaxFusion:
    """Softmax-weighted fusion of N sources fed a chunk of scores at a time (module docstring).

    Per pixel: m = the largest score so far, S = sum_k exp(s_k - m), A = sum_k exp(s_k - m) I_k;
    a chunk that raises m rescales S and A by exp(m_old - m_new). The fused image is A / S (plus
    the correction); ``index`` is the best-scoring source. keep: also hold the N scores (N, H, W)
    to give the (H, W, N) weights at the end."""

    def __init__(self, images: Sequence[np.ndarray], keep: bool):
        self.images = images
        first = np.asarray(images[0])
        h, w = first.shape[:2]
        self.colour = first.ndim == 3
        self.acc = np.zeros(first.shape, np.float32)
        self.total = np.zeros((h, w), np.float32)
        self.top = np.full((h, w), -np.inf, np.float32)
        self.index = np.zeros((h, w), np.uint16)
        self.scores = np.empty((len(images), h, w), np.float32) if keep else None
        self.correction: np.ndarray | None = None

    def add(self, ks: Sequence[int], scores: np.ndarray, correction: np.ndarray | None = None) -> None:
        """Sources ``ks`` with their scores (len(ks), H, W); ``correction`` (H, W): this chunk's
        luminance correction, kept where the chunk holds the best score so far."""
        ks = np.asarray(ks, np.uint16)
        if np.any(ks[1:] < ks[:-1]):  # sources in order, so ties go to the first, as np.argmax
            order = np.argsort(ks, kind="stable")
            ks, scores = ks[order], scores[order]
        best = scores.argmax(axis=0)
        chunk_top = np.take_along_axis(scores, best[None], axis=0)[0]
        chosen = ks[best]
        # where this chunk holds the best score so far; on an exact tie the lower source index
        take = (chunk_top > self.top) | ((chunk_top == self.top) & (chosen < self.index))
        self.index[take] = chosen[take]
        if correction is not None:
            if self.correction is None:
                self.correction = np.zeros_like(self.total)
            self.correction[take] = correction[take]
        new_top = np.maximum(self.top, chunk_top)
        scale = np.exp(self.top - new_top)  # 0 before the first chunk (exp(-inf))
        self.total *= scale
        self.acc *= scale[..., None] if self.colour else scale
        for k, s in zip(ks, scores):
            e = np.exp(s - new_top)
            for y0, y1, x0, x1 in nonzero_windows(e >= NEGLIGIBLE):
                ek = e[y0:y1, x0:x1]
                self.total[y0:y1, x0:x1] += ek
                self.acc[y0:y1, x0:x1] += to_unit_float(np.asarray(self.images[k])[y0:y1, x0:x1]) * \
                    (ek[..., None] if self.colour else ek)
            if self.scores is not None:
                self.scores[k] = s
        self.top = new_top

    def fused(self) -> np.ndarray:
        """A / S, plus the correction when the chunks brought one (``StackFuser(correction=True)``)."""
        out = self.acc
        out /= self.total[..., None] if self.colour else self.total
        if self.correction is not None:
            out += self.correction[..., None] if self.colour else self.correction
        return from_unit_float(out, np.asarray(self.images[0]).dtype)  # integers rounded and clipped

    def weights(self) -> np.ndarray | None:
        """(H, W, N) softmax of the scores, when they were kept."""
        if self.scores is None:
            return None
        z = self.scores
        z -= self.top
        np.exp(z, out=z)
        z /= z.sum(axis=0)
        return np.ascontiguousarray(np.moveaxis(z, 0, -1))


class StackFuser:
    """Fuser protocol (``name``, ``fuse``) for a stack-native model run by a stack engine.

    engine:      a stack engine (``encode``, ``decide_stack``, ``stride``).
    calibration: N > ``chunk``: True = chunks calibrated against a reference, False = one joint
                 pass over the whole stack (the reference mode; memory grows with N).
    chunk:       images per joint pass in calibrated mode (>= 2, the reference included); fewer
                 when they would exceed :data:`CHUNK_PIXELS`.
    reference:   calibration reference; None = the middle image (N // 2).
    correction:  add the fused-result branch's boundary correction (True) or fuse with the
                 decision weights alone (False, the default: the decision graph only, no
                 fused-result branch, about 40 % cheaper). Measured 2026-12-01 (model card): at the
                 checkpoints trained so far the decision alone scores higher, on BSDS500-val ground
                 truth (+0.3 dB) and on Lytro (Q_Y, Q_MI); ``ray-mff fuse --correction on`` turns it on.
    """

    def __init__(self, engine, *, calibration: bool = True, chunk: int = DEFAULT_CHUNK, reference: int | None = None,
                 name: str | None = None, correction: bool = False):
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
        # features stay engine-native (numpy, or device tensors of a GPU engine): concat_batch
        return concat_batch([self.engine.encode(np.concatenate(ys[i:i + per_call], axis=0))
                             for i in range(0, len(ys), per_call)])

    def _decide(self, feats: np.ndarray, ys: list[np.ndarray], h: int, w: int):
        """One pass of the joint (or decision) graph -> (logits (M, H, W), weights (M, H, W),
        luminance correction (H, W) or None)."""
        y = np.concatenate(ys, axis=0)
        if not self.correction:
            logit, wts, _ = self.engine.decide_stack(feats, y, fused=False)
            return crop_to(logit, h, w)[:, 0], crop_to(wts, h, w)[:, 0], None
        logit, wts, fused = self.engine.decide_stack(feats, y)
        wts = crop_to(wts, h, w)[:, 0]
        blend = np.einsum("nhw,nhw->hw", wts, crop_to(y, h, w)[:, 0])
        return crop_to(logit, h, w)[:, 0], wts, crop_to(fused, h, w)[0, 0] - blend

    def _joint(self, images: Sequence[np.ndarray], h: int, w: int, out: _SoftmaxFusion) -> np.ndarray:
        """One joint pass over all N images -> (N, H, W) weights."""
        ys = [self._prep(luminance(img)) for img in images]
        logit, wts, correction = self._decide(self._encode(ys), ys, h, w)
        out.add(range(len(images)), logit, correction)
        return wts

    def _calibrated(self, images: Sequence[np.ndarray], h: int, w: int, ref: int, chunk: int,
                    out: _SoftmaxFusion) -> None:
        # luminances are made chunk by chunk: a long stack's N float32 planes are never all held
        y_ref = self._prep(luminance(images[ref]))
        f_ref = self._encode([y_ref])
        others = [k for k in range(len(images)) if k != ref]
        for i in range(0, len(others), chunk - 1):
            part = others[i:i + chunk - 1]
            ys = [self._prep(luminance(images[k])) for k in part]
            logit, _, correction = self._decide(concat_batch([f_ref, self._encode(ys)]), [y_ref] + ys, h, w)
            rel = logit - logit[:1]  # s_k = l_k - l_ref, on the scale every chunk shares; s_ref = 0
            # the reference is scored once (0); a later chunk's correction is kept where one of its
            # own images leads (where the reference leads, the first chunk's stays)
            if i == 0:
                out.add([ref] + part, rel, correction)
            else:
                out.add(part, rel[1:], correction)

    def fuse(self, images: Sequence[np.ndarray]) -> FusionResult:
        """N >= 2 registered images (H, W) or (H, W, C), one dtype -> FusionResult (weights (H, W, N),
        or None and the index map for stacks whose weights exceed ``FULL_WEIGHTS_MAX_BYTES``)."""
        check_stack(images)
        t0 = time.perf_counter()
        n = len(images)
        h, w = images[0].shape[:2]
        ref = None
        chunk = max(2, min(self.chunk, CHUNK_PIXELS // (h * w)))
        keep = keep_full_weights((h, w), n)
        if n <= chunk or not self.calibration:
            out = _SoftmaxFusion(images, keep=False)
            weights = self._joint(images, h, w, out)
            weights = np.ascontiguousarray(np.moveaxis(weights, 0, -1)) if keep else None
            mode = "pair" if n == 2 else "joint"
        else:
            ref = n // 2 if self.reference is None else int(self.reference)
            out = _SoftmaxFusion(images, keep=keep)
            self._calibrated(images, h, w, ref, chunk, out)
            weights = out.weights()
            mode = "calibrated"
        fused = out.fused()
        desc = describe_engine(self.engine)
        stats = {"engine": desc.get("engine", "?"), "precision": desc.get("precision", "fp32"),
                 "device": desc.get("device", "cpu"), "calibration": mode, "reference": ref, "chunk": chunk,
                 "correction": self.correction,
                 "n": n, "seconds": time.perf_counter() - t0}
        return StackFusionResult(fused=fused, weights=weights, method=self.name, stats=stats,
                                 correction=out.correction, stored_index_map=None if keep else out.index)


def stack_fuser_for(name: str, *, engine: str = "auto", precision: str = "fp32", weights="default",
                    calibration: bool = True, **options) -> StackFuser | None:
    """A :class:`StackFuser` when the registered model ``name`` is stack-native (has
    ``decide_stack``), else None (a pair model: :class:`ray_mff.fusion.model_fuser.ModelFuser`)."""
    from ray_mff.engines.stack_engine import make_stack_engine
    from ray_mff.errors import EngineUnavailableError
    from ray_mff.models import is_stack_native

    if not is_stack_native(name):
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
