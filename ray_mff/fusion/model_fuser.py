"""Learned-model fuser: a decision network behind an engine -> :class:`FusionResult` for N >= 2 images.

Pipeline per stack (luminance in, decision on every channel out):

- **N = 2**: encode both luminances, one ``decide`` -> D; weights (D, 1 - D).
- **N > 2, calibrated** (default; issue 3 item 5): encode each image once; run the decision path
  of a reference image (the middle of the stack by default) against each other image; calibrate
  the N-1 maps into one per-pixel choice over all N (:mod:`ray_mff.fusion.calibration`) in a
  streaming pass, so features of at most ``batch + 1`` images are held at a time; fuse in one pass.
- **N > 2, serial** (``calibration=False``, the reference mode): F = fuse(I_0, I_1), then
  F = fuse(F, I_2), ... re-encoding the intermediate fused luminance each time. Weights are
  tracked through the chain (W_prev *= D; W_k = 1 - D), so the result is one weighted sum too.

Inputs are padded (edge replication) to the engine's ``stride`` and cropped back. The fused image
keeps the sources' dtype and channels (:func:`ray_mff.fusion.decision.fuse_with_weights`).

``consistency=True`` adds Liu et al. (2017)'s small-region removal + guided filter
(:mod:`ray_mff.fusion.consistency`) on the final index map. It is off by default: the shipped
network's maps are meant to be clean as they come (no post-processing at inference).

What ``decide`` returns is the engine's ``output`` (the model's, default ``"decision"``):

- ``"decision"``: a decision map, as above;
- ``"focus"``: a focus map that the model's ``postprocess`` (e.g. ``cnn``: Liu et al.'s consistency
  verification, r = 8, eps = 0.1) turns into the decision: the three modes above, then
  consistency verification of the final index map with the model's parameters;
- ``"fused"``: the fused luminance itself (direct-fusion networks, ``ssim`` and ``mscnn``). Pairs
  are fused once; stacks serially (F = fuse(F, I_k); calibration needs decision maps, so it does
  not apply), each step's colour made by :mod:`ray_mff.fusion.luminance_transfer` (weights solved
  from the fused luminance, plus the luminance residual); ``weights`` are the solved weights.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ray_mff.engines.base import crop_to, describe_engine, pad_to_multiple, repeat_batch
from ray_mff.fusion.calibration import DecisionCalibrator, tie_break_measure
from ray_mff.fusion.decision import check_stack, fuse_with_weights, keep_full_weights
from ray_mff.fusion.luminance import from_unit_float, luminance, to_unit_float
from ray_mff.fusion.result import FusionResult
from ray_mff.planes import mapped

#: calibrated mode batches images per engine call only up to this many pixels per call (1 MP)
BATCH_PIXELS = 1 << 20
#: :meth:`ModelFuser.fuse_batch` (GPU engines): images per encode call up to this many pixels (16 MP:
#: TensorRT's default profile at its largest, 4 x 2048 x 2048, or 16 pairs of 528 x 528 Lytro
#: luminances). BATCH_PIXELS would allow one Lytro pair per call, i.e. no batching at all.
STACK_BATCH_PIXELS = 1 << 24


class ModelFuser:
    """Fuser protocol (``name``, ``fuse``) for a decision model run by an engine.

    engine:      an engine (``encode``/``decide``, see :mod:`ray_mff.engines.base`).
    calibration: N > 2: True = decision calibration against one reference, False = serial pairs.
    reference:   index of the calibration reference; None = the middle image (N // 2).
    mode:        calibration rule, ``"argmax"`` (one-hot) or ``"softmax"`` (soft weights).
    consistency: apply small-region removal + guided filter to the index map (off by default).
    area_ratio:  small-region threshold for ``consistency`` (fraction of H x W).
    batch:       calibrated mode: other images per engine call (2, the batch of a serial pair), as
                 long as batch x H x W <= BATCH_PIXELS, else 1: on large images and 1024 px tiles
                 batching saves nothing and the second image's activations cost memory (a
                 12000 x 12000 3-image stack peaked at 6.14 GiB with batch 2).
    batch_reference: calibrated mode: encode the reference in the first engine call too (one
                 3-image call for a triple instead of a 1- and a 2-image call). None (default) =
                 on GPU engines only, within BATCH_PIXELS and the engine's ``max_batch`` (if it
                 has one: TensorRT's profile). One 528 x 528 image underfills a GPU, so a larger
                 batch should cost less per image there (not measured: no GPU here); on CPU,
                 ONNX Runtime costs the same per image at any batch (0.221 / 0.216 / 0.223 s
                 per 528 x 528 image at batch 1 / 2 / 3, 2 threads), and a 3-image call exceeds
                 the memory-arena limit (:data:`ray_mff.engines.onnx_engine.ARENA_MAX_PIXELS`).
    batch_stacks: :meth:`fuse_batch` encodes several same-shape pairs per engine call. None (default)
                 = on GPU engines only, the same rule as ``batch_reference``: on CPU ONNX Runtime
                 a call of 2 or 4 pairs costs as much per pair as one pair (see ``fuse_batch``), so
                 CPU runs keep one stack per call. Pairs per call stay within ``stack_batch_pixels``
                 (images x padded H x W, default :data:`STACK_BATCH_PIXELS`) and the engine's
                 ``max_batch`` (both images of a pair go in one encode call).

    Example::

        >>> from ray_mff.engines.torch_engine import TorchEngine          # doctest: +SKIP
        >>> from ray_mff.models import get_model                          # doctest: +SKIP
        >>> fuser = ModelFuser(TorchEngine(get_model("cascade")))        # doctest: +SKIP
        >>> result = fuser.fuse([img_a, img_b, img_c])                    # doctest: +SKIP
        >>> result.fused.shape, result.weights.shape                      # doctest: +SKIP
        ((520, 520, 3), (520, 520, 3))
    """

    def __init__(self, engine, *, calibration: bool = True, reference: int | None = None, mode: str = "argmax",
                 consistency: bool = False, area_ratio: float = 0.01, batch: int = 2,
                 batch_reference: bool | None = None, batch_stacks: bool | None = None,
                 stack_batch_pixels: int = STACK_BATCH_PIXELS, name: str | None = None):
        self.engine = engine
        self.batch = max(1, int(batch))
        on_gpu = not str(describe_engine(engine).get("device", "cpu")).startswith("cpu")
        self.batch_reference = on_gpu if batch_reference is None else bool(batch_reference)
        self.batch_stacks = on_gpu if batch_stacks is None else bool(batch_stacks)
        self.stack_batch_pixels = int(stack_batch_pixels)
        self.calibration = bool(calibration)
        self.reference = reference
        self.mode = mode
        self.consistency = bool(consistency)
        self.area_ratio = float(area_ratio)
        self.name = name or getattr(engine, "model_name", None) or "cascade"
        self.stride = int(getattr(engine, "stride", 1))
        self.output = getattr(engine, "output", "decision")
        self.gf_radius, self.gf_eps = 8, 0.1
        post = getattr(engine, "postprocess", None) or {}
        if post.get("kind") == "consistency":  # e.g. cnn: Liu et al.'s verification is part of the method
            self.consistency = True
            self.area_ratio = float(post.get("area_ratio", area_ratio))
            self.gf_radius, self.gf_eps = int(post.get("radius", 8)), float(post.get("eps", 0.1))

    # -- engine calls on padded (1, 1, H, W) luminances ------------------------------------------------

    def _prep(self, lum: np.ndarray) -> np.ndarray:
        return pad_to_multiple(np.ascontiguousarray(lum, dtype=np.float32)[None, None], self.stride)

    def _decide(self, fa, fb, ya: np.ndarray, yb: np.ndarray, h: int, w: int) -> np.ndarray:
        """One engine decide call on a batch of pairs -> (B, H, W) decision maps in [0, 1]."""
        d = self.engine.decide(fa, fb, ya, yb)
        return np.clip(crop_to(np.asarray(d, dtype=np.float32), h, w)[:, 0], 0.0, 1.0)

    # -- the three modes -------------------------------------------------------------------------------

    def _pair_maps(self, pairs: list[tuple[np.ndarray, np.ndarray]], h: int, w: int,
                   per_call: int = 1) -> list[np.ndarray]:
        """``decide`` maps (H, W) of same-shape luminance pairs, ``per_call`` pairs per engine call:
        one encode of (a_0 .. a_k-1, b_0 .. b_k-1), one decide of features [:k] against [k:]
        (contiguous slices, on the engine's device)."""
        maps: list[np.ndarray] = []
        for i in range(0, len(pairs), per_call):
            part = pairs[i:i + per_call]
            k = len(part)
            y = np.concatenate([self._prep(a) for a, _ in part] + [self._prep(b) for _, b in part], axis=0)
            f = self.engine.encode(y)
            maps.extend(self._decide(f[:k], f[k:], y[:k], y[k:], h, w))
        return maps

    def pairs_per_call(self, h: int, w: int) -> int:
        """Pairs of (h, w) images :meth:`fuse_batch` gives one engine call (1 when not batching)."""
        if not self.batch_stacks:
            return 1
        hp, wp = -(-h // self.stride) * self.stride, -(-w // self.stride) * self.stride
        k = self.stack_batch_pixels // (2 * hp * wp)
        max_batch = getattr(self.engine, "max_batch", None)
        if max_batch:
            k = min(k, int(max_batch) // 2)
        return max(1, k)

    def _pair(self, lums: list[np.ndarray], h: int, w: int, d: np.ndarray | None = None) -> np.ndarray:
        if d is None:
            d = self._pair_maps([(lums[0], lums[1])], h, w)[0]
        return np.stack([d, 1.0 - d], axis=-1)

    def _calibrated(self, lums: list[np.ndarray], h: int, w: int, ref: int) -> np.ndarray:
        n = len(lums)
        cal = DecisionCalibrator(n, ref, (h, w), mode=self.mode)
        cal.add_reference(tie_break_measure(lums[ref]))
        others = [k for k in range(n) if k != ref]
        batch = self.batch if self.batch * h * w <= BATCH_PIXELS else 1
        chunks = [others[i:i + batch] for i in range(0, len(others), batch)]
        first = len(chunks[0]) + 1  # the first call's batch if the reference goes with it
        if self.batch_reference and first * h * w <= BATCH_PIXELS and first <= getattr(self.engine, "max_batch", first):
            calls = [[ref] + chunks[0]] + chunks[1:]
        else:
            calls = [[ref]] + chunks
        # one encode call per entry of ``calls`` and one decide call per chunk of other images;
        # each image is encoded exactly once, and features of at most batch + 1 are held at a time
        for call in calls:
            y = np.concatenate([self._prep(lums[k]) for k in call], axis=0)
            f = self.engine.encode(y)
            chunk = call
            if call[0] == ref:  # the reference is encoded first, alone or with the first chunk
                y_ref, f_ref, y, f, chunk = y[:1], f[:1], y[1:], f[1:], call[1:]
                if not chunk:
                    continue
            b = len(chunk)
            # the reference's features stay where the engine keeps them (a CUDA tensor on GPU engines)
            d = self._decide(repeat_batch(f_ref, b), f, np.repeat(y_ref, b, axis=0), y, h, w)
            for j, k in enumerate(chunk):
                cal.add(k, d[j], tie_break_measure(lums[k]))
        # a deep stack keeps the calibrator (a weight source) instead of (H, W, N) weights
        return cal if self.mode == "argmax" and not keep_full_weights((h, w), n) else cal.weights()

    def _serial(self, images: Sequence[np.ndarray], lums: list[np.ndarray], h: int, w: int) -> np.ndarray:
        n = len(images)
        weights = np.zeros((h, w, n), np.float32)
        weights[..., 0] = 1.0
        fused_lum = lums[0]
        for k in range(1, n):
            ya, yb = self._prep(fused_lum), self._prep(lums[k])
            f = self.engine.encode(np.concatenate([ya, yb], axis=0))  # the intermediate is re-encoded
            d = self._decide(f[0:1], f[1:2], ya, yb, h, w)[0]
            weights[..., :k] *= d[..., None]
            weights[..., k] = 1.0 - d
            # luminance is linear in the sources, so the intermediate's luminance is the same blend
            fused_lum = d * fused_lum + (1.0 - d) * lums[k]
        return weights

    def _direct(self, images: Sequence[np.ndarray], lums: list[np.ndarray], h: int, w: int,
                first: np.ndarray | None = None):
        """Direct-fusion model: serial pairs (one pair for N = 2) -> (fused image, solved weights (H, W, N)).
        ``first``: the first pair's fused luminance when it was already computed (``fuse_batch``)."""
        from ray_mff.fusion.luminance_transfer import solve_weights, transfer_luminance

        n = len(images)
        weights = np.zeros((h, w, n), np.float32)
        weights[..., 0] = 1.0
        fused, fused_lum = to_unit_float(images[0]), lums[0]
        for k in range(1, n):
            if k == 1 and first is not None:
                y_f = first
            else:
                y_f = self._pair_maps([(fused_lum, lums[k])], h, w)[0]  # the fused luminance
            wa = solve_weights(y_f, fused_lum, lums[k])
            fused = transfer_luminance(fused, to_unit_float(images[k]), wa, y_f, fused_lum, lums[k])
            weights[..., :k] *= wa[..., None]
            weights[..., k] = 1.0 - wa
            fused_lum = y_f
        return from_unit_float(fused, images[0].dtype), weights

    def fuse(self, images: Sequence[np.ndarray]) -> FusionResult:
        """N >= 2 registered images (H, W) or (H, W, C), one dtype -> FusionResult (weights (H, W, N))."""
        check_stack(images)
        return self._fuse(images, mapped(images, luminance))  # lazy for a PlaneSequence: no N planes held

    def fuse_batch(self, stacks: Sequence[Sequence[np.ndarray]]) -> list[FusionResult]:
        """Several stacks -> one FusionResult each, the same as :meth:`fuse` on each (bit-identical
        on CPU torch and ONNX Runtime in the tests; GPU kernels may pick other algorithms per batch).

        Pairs of one shape share engine calls (:meth:`pairs_per_call` pairs per encode and per
        decide call); everything after ``decide`` (consistency, colour, weights) runs per stack.
        Stacks of N >= 3 are fused one by one. With ``batch_stacks`` False (the default on CPU
        engines) every stack is one :meth:`fuse`: ONNX Runtime on 2 CPU threads is *slower* per
        pair when batched (4 Lytro pairs, 520 x 520: 1.36 / 2.04 / 2.16 s per pair at 1 / 2 / 4
        pairs per call, best of 3 on a loaded 2-core machine; results bit-identical), so CPU runs
        gain nothing (torch on CPU: 4.26 / 3.83 / 3.49 s per pair, still 2.5x ONNX Runtime's
        unbatched time; ``batch_stacks=True`` turns batching on for it). GPU engines (TensorRT,
        torch on CUDA) are where one 528 x 528 image underfills the device;
        ``bench/gpu_check.py`` measures pairs/s at 1, 4 and 16 per call.
        A bad stack raises (the caller fuses one by one to find it)."""
        for images in stacks:
            check_stack(images)
        if not self.batch_stacks:
            return [self._fuse(images, mapped(images, luminance)) for images in stacks]
        results: list = [None] * len(stacks)
        groups: dict = {}
        for i, images in enumerate(stacks):
            if len(images) == 2:
                groups.setdefault(tuple(np.shape(images[0])[:2]), []).append(i)
            else:
                results[i] = self._fuse(images, mapped(images, luminance))
        for (h, w), idx in groups.items():
            t0 = time.perf_counter()
            lums = {i: [luminance(img) for img in stacks[i]] for i in idx}
            maps = self._pair_maps([tuple(lums[i]) for i in idx], h, w, self.pairs_per_call(h, w))
            share = (time.perf_counter() - t0) / len(idx)  # engine time, split evenly over the pairs
            for i, d in zip(idx, maps):
                results[i] = self._fuse(stacks[i], lums[i], pair_map=d, spent=share)
        return results

    def _fuse(self, images: Sequence[np.ndarray], lums, pair_map: np.ndarray | None = None,
              spent: float = 0.0) -> FusionResult:
        """:meth:`fuse` on a checked stack and its luminances; ``pair_map``: a pair's ``decide``
        output already computed (by :meth:`fuse_batch`, which spent ``spent`` seconds on it)."""
        t0 = time.perf_counter() - spent
        n = len(images)
        h, w = images[0].shape[:2]
        ref = None
        fused = None
        if self.output == "fused":
            (fused, weights), mode = self._direct(images, lums, h, w, pair_map), "pair" if n == 2 else "serial"
        elif n == 2:
            weights, mode = self._pair(lums, h, w, pair_map), "pair"
        elif self.calibration:
            ref = n // 2 if self.reference is None else int(self.reference)
            weights, mode = self._calibrated(lums, h, w, ref), "calibrated"
        else:
            weights, mode = self._serial(images, lums, h, w), "serial"
        if self.consistency and fused is None:
            from ray_mff.fusion.consistency import verify_index_map

            weights = verify_index_map(_index_of(weights), n, lums, area_ratio=self.area_ratio,
                                       radius=self.gf_radius, eps=self.gf_eps)
        if fused is None:
            fused = fuse_with_weights(images, weights)
        desc = describe_engine(self.engine)
        stats = {
            "engine": desc.get("engine", getattr(self.engine, "name", "?")),
            "precision": desc.get("precision", getattr(self.engine, "precision", "fp32")),
            "device": desc.get("device", getattr(self.engine, "device", "cpu")),
            "calibration": mode,
            "reference": ref,
            "consistency": self.consistency and self.output != "fused",
            "output": self.output,
            "n": n,
            "seconds": time.perf_counter() - t0,
        }
        if not isinstance(weights, np.ndarray):  # a weight source of a deep stack: keep its index map
            return FusionResult(fused=fused, weights=None, method=self.name, stats=stats,
                                stored_index_map=weights.index_map())
        return FusionResult(fused=fused, weights=weights, method=self.name, stats=stats)


def _index_of(weights) -> np.ndarray:
    return np.argmax(weights, axis=-1) if isinstance(weights, np.ndarray) else weights.index_map()
