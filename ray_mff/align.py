"""Align a focus stack before fusion: registration, exposure matching and flat-field correction.

Every fusion method assumes registered planes; real stacks are not. Focus breathing changes the
magnification from plane to plane, stages drift, exposure flickers. This stage maps every plane
into the frame of a reference plane, the same way for every method and both executors
(:func:`ray_mff.runner.process_stack` calls it between read and fuse):

1. **flat-field** (optional): ``I * mean(F) / F`` with a blank frame ``F``, in sensor coordinates,
   so vignetting neither biases registration nor survives into the fused image.
2. **registration**: ECC (Evangelidis & Psarakis, "Parametric image alignment using enhanced
   correlation coefficient maximization", IEEE TPAMI 30(10), 2008; ``cv2.findTransformECC``) on
   luminance area-averaged down to ``working_size`` px on the long side, coarse to fine over a
   Gaussian pyramid, every level lightly blurred to a common scale. Reducing the resolution is
   what makes planes of different focus comparable: a defocus of 8 px at 1600 px is ~1 px at
   256 px, so ECC sees the structure every plane shares. Each plane starts from the previous
   plane's transform at the working level (a sweep breathes smoothly); when that fails it starts
   again from the coarsest level at the identity. The estimate is then made symmetric: ECC is run
   back from the plane to the reference at the working level and the two directions averaged,
   which cancels the part of the defocus bias that changes sign with the direction (halves the
   unit test stack's loss; on the synthetic benchmark a wash: docs/alignment.md, tables 1-2).
   Motion models: ``translation``, ``similarity``
   (ECC's affine solution projected onto scale + rotation + shift at every level: ECC has no
   4-parameter model) and ``affine``. ``bench/alignment.py`` measured the choices (docs/alignment.md):
   this is as accurate as ECC at full resolution (0.09 vs 0.07 px median corner error) at a third
   of the time; gradient-magnitude and band-pass inputs fail on some planes; phase correlation,
   ORB and scikit-image miss by a pixel or more; SIFT + RANSAC reaches 0.29 px at 6x the time.
   An optional refinement at full resolution (``refine_pixels``: ECC translation in a grid of
   windows, then the model fitted to their displacements) is off by default: at full resolution
   the planes' different blur biases ECC, and it measured less accurate (0.20 px).
3. **checks**: a plane whose ECC does not converge, whose final correlation is below
   ``min_correlation`` or whose transform exceeds the limits (shift, scale, rotation, shear) is
   left exactly as read and reported; it is never half-applied. A transform that passes is
   applied only when it is evidence of motion rather than of defocus (:meth:`_Registrar.evidence`):
   it explains at least half of the identity's misfit, or the translations of the cells of a 3x3
   grid, registered on their own, follow it with a signal-to-noise ratio of at least 2.5.
   Otherwise the plane counts as registered (identity, status ``ok``): ECC drifts by up to 2 px
   between the differently focused but registered Lytro planes, and resampling them only lost
   fusion quality (docs/alignment.md, "Registered stacks").
4. **exposure matching** (optional): gain and offset per plane against the reference, fitted on
   strongly low-passed, registered, well-exposed pixels (defocus moves light around locally but
   keeps local means, so a low-pass much wider than the blur is the same in every plane).
5. **output frame**: full frame with replicated borders (default; every plane keeps the input
   size), or ``crop=True``: every plane cropped to the region valid in all of them. A plane whose
   transform moves no image corner by ``STILL_PX`` (0.05 px) is not resampled (only cropped):
   it is already registered, and resampling would only smooth it.

Reference: the middle plane, or ``chain``: each plane registered to its neighbour towards the
middle (the last plane that aligned), transforms composed. Chaining suits long sweeps whose end
planes share little sharp detail with the middle one.

Memory: estimation reads one plane at a time and keeps only the reference's small pyramid (and,
chained, the neighbour's). Applying is per plane: a list is aligned in
place (entry by entry, so peak memory is the stack plus one plane); any other sequence (a lazy
reader), or a list with ``lazy=True``, gets a view (:class:`AlignedPlanes`) that aligns plane
``i`` when it is read.

Cost: resampling is most of the stage's time (bicubic ``warpAffine``, ~40 ms per 1600x1200 RGB
plane, has no vectorised path), so the view warps only what a fuser uses. ``guided`` measures
focus on each plane as read and resamples the measure (one bilinear channel), reads the guide's
luminance only where a plane is chosen, and the colour planes only where their weight is
non-zero: on stack_v4, 65 planes, about 3 planes' worth of bicubic colour (docs/alignment.md, 4).

Example:
    >>> import numpy as np, skimage.data
    >>> from ray_mff.align import AlignOptions, align_stack
    >>> ref = skimage.data.camera()
    >>> moved = np.roll(ref, (3, -5), axis=(0, 1))
    >>> planes, alignment = align_stack([ref.copy(), ref, moved], AlignOptions(mode="translation"))
    >>> [round(float(v)) for v in alignment.transforms[2][:2, 2]]   # reference: the middle plane
    [-5, 3]
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from ray_mff.errors import StackMismatchError
from ray_mff.fusion.luminance import BT601, dtype_max
from ray_mff.planes import MappedPlanes, PlaneSequence, plane_shape

MODES = ("none", "translation", "similarity", "affine")
REFERENCES = ("middle", "chain")
# Resampling kernels of the apply step (bench/alignment.py measures each): bilinear blurs sharp
# detail, bicubic is the default, Lanczos-4 keeps the most detail at about 4x bicubic's time.
RESAMPLING = {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "lanczos4": cv2.INTER_LANCZOS4}
# A focus measure is taken on each plane as read and its map resampled bilinearly
# (AlignedPlanes.focus_maps): a windowed energy is smooth, so bilinear loses nothing there, while
# measuring focus on a resampled plane measures the kernel's blur too (bilinear luminance: -2 dB
# on the unit test stack; docs/alignment.md, section 4). One bilinear channel instead of three bicubic.
MEASURE_RESAMPLING = cv2.INTER_LINEAR
# A plane whose transform moves no image corner by this much (px) is not resampled: it is
# already registered, and resampling would only smooth it (bicubic costs ~0.1 dB against the
# truth, table 2 of docs/alignment.md) and take time. Well under the estimator's own median error.
STILL_PX = 0.05
# A registration must be evidence of motion, not of defocus (module docstring, step 3): it is
# applied when it explains at least MIN_MISFIT_REDUCTION of the identity's ECC misfit at the
# working level, or when the translations measured in the cells of a 3x3 grid follow it with a
# signal-to-noise ratio of at least MIN_MOTION_SNR (docs/alignment.md, "Registered stacks").
MIN_MISFIT_REDUCTION = 0.5
MIN_MOTION_SNR = 2.5
_EVIDENCE_GRID = 3
_ECC_MOTION = {"translation": cv2.MOTION_TRANSLATION, "similarity": cv2.MOTION_AFFINE, "affine": cv2.MOTION_AFFINE}


@dataclass(frozen=True)
class AlignOptions:
    """What the align stage does. The defaults do nothing (``mode="none"``, no photometry).

    mode:            ``none`` | ``translation`` | ``similarity`` | ``affine``.
    reference:       ``middle`` (every plane against the middle one) or ``chain`` (neighbour to
                     neighbour towards the middle, transforms composed).
    crop:            True: crop every plane to the region valid in all of them; False: keep the
                     full frame, borders replicated.
    match_exposure:  fit gain/offset per plane against the reference.
    flat_field:      uri of a blank frame (same size; grey or one channel per image channel).
    resampling:      ``cubic`` (default), ``lanczos4`` (sharper, ~4x the time) or ``linear``.
    working_size:    longest side of the reduced-resolution copy registration starts from.
    refine_pixels:   full-resolution refinement: pixels in all windows together; 0 = none.
    min_correlation: ECC correlation below which a registration counts as failed.
    max_shift:       largest accepted shift of the image centre, as a fraction of the longer side.
    max_scale_change, max_rotation_deg, max_shear: further limits on an accepted transform.
    """

    mode: str = "none"
    reference: str = "middle"
    crop: bool = False
    match_exposure: bool = False
    flat_field: str | None = None
    resampling: str = "cubic"
    working_size: int = 256
    refine_pixels: int = 0
    min_correlation: float = 0.6
    max_shift: float = 0.10
    max_scale_change: float = 0.10
    max_rotation_deg: float = 5.0
    max_shear: float = 0.05

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"align mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"align reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.resampling not in RESAMPLING:
            raise ValueError(f"align resampling must be one of {', '.join(RESAMPLING)}, got {self.resampling!r}")

    @property
    def active(self) -> bool:
        """Whether the stage changes anything (``False``: planes pass through untouched)."""
        return self.mode != "none" or self.match_exposure or bool(self.flat_field)

    def label(self) -> str | None:
        """What ran, for the manifest: e.g. ``similarity/middle+exposure+flat``; None when inactive."""
        if not self.active:
            return None
        parts = [self.mode if self.mode == "none" else f"{self.mode}/{self.reference}"]
        parts += ["crop"] if self.crop and self.mode != "none" else []
        parts += ["exposure"] if self.match_exposure else []
        parts += ["flat"] if self.flat_field else []
        return "+".join(parts)


@dataclass
class PlaneAlignment:
    """How one plane maps into the reference frame.

    transform:   3x3 float64, reference pixel coordinates -> this plane's pixel coordinates
                 (identity for the reference and for planes left unaligned).
    status:      ``reference`` | ``ok`` | ``failed`` | ``skipped`` (mode none).
    reason:      why a registration failed (None otherwise).
    correlation: final ECC correlation against the reference (or chained neighbour).
    evidence:    (misfit reduction, motion SNR) of the estimated motion (:meth:`_Registrar.evidence`);
                 a plane whose estimate is not significant keeps the identity (status ``ok``).
    gain, offset: exposure correction ``gain * I + offset`` (offset in full-scale units).
    """

    transform: np.ndarray = field(default_factory=lambda: np.eye(3))
    status: str = "skipped"
    reason: str | None = None
    correlation: float = float("nan")
    evidence: tuple[float, float] | None = None
    gain: float = 1.0
    offset: float = 0.0

    @property
    def scale(self) -> float:
        """Isotropic scale of the plane relative to the reference (sqrt of the Jacobian)."""
        return float(math.sqrt(abs(np.linalg.det(self.transform[:2, :2]))))


@dataclass
class StackAlignment:
    """Per-plane transforms and photometry of one stack, the output crop, and a manifest summary."""

    options: AlignOptions
    shape: tuple[int, int]
    reference: int
    planes: list[PlaneAlignment]
    crop_box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) in the reference frame
    flat: np.ndarray | None = None  # mean(F) / F, float32 (H, W) or (H, W, C)

    @property
    def transforms(self) -> list[np.ndarray]:
        return [p.transform for p in self.planes]

    def shift_of(self, i: int) -> float:
        """Displacement of the image centre of plane ``i`` from the reference's, in pixels."""
        h, w = self.shape
        c = np.array([(w - 1) / 2, (h - 1) / 2, 1.0])
        return float(np.hypot(*(self.planes[i].transform @ c - c)[:2]))

    @property
    def failed(self) -> list[int]:
        return [i for i, p in enumerate(self.planes) if p.status == "failed"]

    @property
    def held(self) -> list[int]:
        """Planes where ECC found motion without evidence for it (kept the identity)."""
        return [i for i, p in enumerate(self.planes) if p.evidence is not None and not _significant(p.evidence)]

    def summary(self) -> dict:
        """Manifest columns: what ran, max shift (px), scale range, worst residual, failures, planes
        held at the identity for want of evidence of motion, gains.

        ``align_residual`` is 1 - ECC correlation of the worst aligned plane against its
        reference (0 = identical after alignment, on the registration images).
        """
        opts = self.options
        row: dict = {"align": opts.label()}
        if opts.mode != "none" and self.planes:
            done = [i for i, p in enumerate(self.planes) if p.status in ("ok", "reference")]
            row["align_max_shift_px"] = round(max(self.shift_of(i) for i in done), 3)
            scales = [self.planes[i].scale for i in done]
            row["align_scale_min"], row["align_scale_max"] = round(min(scales), 5), round(max(scales), 5)
            residuals = [1.0 - p.correlation for p in self.planes if p.status == "ok"]
            row["align_residual"] = round(max(residuals), 5) if residuals else 0.0
            row["align_failed"] = len(self.failed)
            row["align_held"] = len(self.held)
        if opts.match_exposure and self.planes:
            gains = [p.gain for p in self.planes]
            row["exposure_gain_min"], row["exposure_gain_max"] = round(min(gains), 5), round(max(gains), 5)
        return row

    def warning(self) -> str | None:
        """One line naming every plane left unaligned (or unmatched) and why; None when all went well."""
        notes = [f"plane {i}: {p.reason}" for i, p in enumerate(self.planes) if p.reason]
        return "align: left as read: " + "; ".join(notes) if notes else None

    def update_row(self, row: dict) -> dict:
        """Add :meth:`summary` to a manifest row and append :meth:`warning` to its warning."""
        row.update(self.summary())
        note = self.warning()
        if note:
            row["warning"] = f"{row['warning']}; {note}" if row.get("warning") else note
        return row

    def out_shape(self) -> tuple[int, int]:
        if self.crop_box is None:
            return self.shape
        y0, y1, x0, x1 = self.crop_box
        return (y1 - y0, x1 - x0)

    def apply(self, plane: np.ndarray, i: int, window: tuple[int, int, int, int] | None = None, *,
              luminance: bool = False, measure: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Plane ``i`` as read -> the same plane in the reference frame (flat-field, exposure, warp, crop).

        window:    (y0, y1, x0, x1) of the output frame: only those pixels are resampled, from only
                   the part of the plane they map to. Equal to ``apply(plane, i)[y0:y1, x0:x1]``
                   within one grey level (OpenCV's fixed-point sample positions round a shifted map
                   differently in rare pixels); exact for planes that are not resampled.
        luminance: return the plane's (H, W) float32 luminance in [0, 1] (as
                   :func:`ray_mff.fusion.luminance.luminance`), converted *before* the warp: one
                   channel to resample instead of three.
        measure:   with ``luminance``: a map computed from the luminance *as read* (a focus
                   measure), then resampled bilinearly (``MEASURE_RESAMPLING``); whole planes only.
        """
        p = self.planes[i]
        x = np.asarray(plane)
        h, w = self.out_shape()
        y0, y1, x0, x1 = window if window is not None else (0, h, 0, w)
        oy, ox = (self.crop_box[0], self.crop_box[2]) if self.crop_box is not None else (0, 0)
        moved = corner_motion(p.transform, self.shape) >= STILL_PX
        # output pixel (u, v) is reference pixel (u + x0 + ox, v + y0 + oy); a still plane is only
        # cropped (an integer shift: its pixels are copied exactly)
        m = p.transform @ _translation(x0 + ox, y0 + oy)
        if not moved:
            box = (y0 + oy, y1 + oy, x0 + ox, x1 + ox)
        elif window is not None:
            box = _source_box(m, (y1 - y0, x1 - x0), x.shape[:2])
        else:
            box = (0, x.shape[0], 0, x.shape[1])
        sy0, sy1, sx0, sx1 = box
        src = x[sy0:sy1, sx0:sx1]
        y = self._photometric(src, p, None if self.flat is None else self.flat[sy0:sy1, sx0:sx1])
        if luminance:
            if y is not src and x.dtype.kind in "ui":  # as apply() would have clipped it
                np.clip(y, 0, dtype_max(x.dtype), out=y)
            y = _to_lum(y, x.dtype)
            if measure is not None:
                if window is not None:
                    raise ValueError("a measure is taken over whole planes, not windows")
                y = measure(y)
        if moved:
            interpolation = MEASURE_RESAMPLING if measure is not None else RESAMPLING[self.options.resampling]
            y = _warp(y, _translation(-sx0, -sy0) @ m, (x1 - x0, y1 - y0), interpolation)
        if luminance or y is src:
            return y
        if x.dtype.kind in "ui" and y.dtype != x.dtype:
            info = np.iinfo(x.dtype)
            y = np.clip(np.rint(y), info.min, info.max).astype(x.dtype)
        return y.astype(x.dtype, copy=False)

    def _photometric(self, x: np.ndarray, p: PlaneAlignment, flat: np.ndarray | None) -> np.ndarray:
        """Flat-field and exposure correction of (part of) a plane: float32, or ``x`` itself when none."""
        if flat is None and p.gain == 1.0 and p.offset == 0.0:
            return x
        y = x.astype(np.float32)
        if flat is not None:
            y *= flat
        if p.gain != 1.0 or p.offset != 0.0:
            y *= np.float32(p.gain)
            y += np.float32(p.offset) * np.float32(dtype_max(x.dtype))
        return y


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0, dx], [0, 1.0, dy], [0, 0, 1.0]])


def _source_box(m: np.ndarray, size: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the part of a plane of ``shape`` that output pixels [0, h) x [0, w) sample
    under ``m`` (output -> plane), with the bicubic kernel's support and a pixel to spare, clipped
    to the plane (never empty, so replicated borders stay the plane's own)."""
    h, w = size
    corners = m @ np.array([[0, w - 1, 0, w - 1], [0, 0, h - 1, h - 1], [1, 1, 1, 1]], float)
    ph, pw = shape
    sx0 = min(max(int(math.floor(corners[0].min())) - 3, 0), pw - 1)
    sy0 = min(max(int(math.floor(corners[1].min())) - 3, 0), ph - 1)
    sx1 = max(min(int(math.ceil(corners[0].max())) + 4, pw), sx0 + 1)
    sy1 = max(min(int(math.ceil(corners[1].max())) + 4, ph), sy0 + 1)
    return sy0, sy1, sx0, sx1


def corner_motion(transform: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest displacement (px) of the four image corners under ``transform`` (0 for the identity)."""
    h, w = shape
    p = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float).T
    return float(np.abs((transform @ p - p)[:2]).max())


def _warp(img: np.ndarray, m: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """Resample ``img`` at ``m`` @ (u, v, 1) for every output pixel (u, v) of ``size`` (w, h), replicated borders.

    OpenCV warps at most 4 channels at once: more channels go through in groups of 4.
    """
    flags = interpolation | cv2.WARP_INVERSE_MAP
    if img.ndim == 2 or img.shape[2] <= 4:
        out = cv2.warpAffine(img, m[:2], size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
        return out.reshape(size[::-1] + img.shape[2:])
    groups = [cv2.warpAffine(np.ascontiguousarray(img[..., c:c + 4]), m[:2], size, flags=flags,
                             borderMode=cv2.BORDER_REPLICATE).reshape(size[::-1] + (-1,))
              for c in range(0, img.shape[2], 4)]
    return np.concatenate(groups, axis=2)


# --------------------------------------------------------------------------------- estimation


def _lum_small(img: np.ndarray, size: tuple[int, int], flat: np.ndarray | None) -> np.ndarray:
    """Reduced-resolution luminance in [0, 1]: area-average first (cheap on big planes), then BT.601."""
    x = np.asarray(img)
    if flat is not None:
        x = x.astype(np.float32) * flat
    if x.ndim == 3 and x.shape[2] > 4:
        small = np.stack([cv2.resize(np.ascontiguousarray(x[..., c]), size, interpolation=cv2.INTER_AREA)
                          for c in range(x.shape[2])], axis=2)
    else:
        small = cv2.resize(x if x.dtype != np.float64 else x.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    return _to_lum(small, np.asarray(img).dtype)


def _to_lum(x: np.ndarray, dtype) -> np.ndarray:
    y = x.astype(np.float32) / np.float32(dtype_max(dtype))
    if y.ndim == 3:
        y = y[..., :3] @ BT601.astype(np.float32) if y.shape[2] in (3, 4) else y.mean(axis=2, dtype=np.float32)
    return np.ascontiguousarray(y, dtype=np.float32)


def _common_scale(lum: np.ndarray, sigma: float) -> np.ndarray:
    """Blur to a common scale: what defocus leaves of every plane (see the module docstring)."""
    return cv2.GaussianBlur(lum, (0, 0), sigma) if sigma > 0 else lum


def _level_matrix(f: float) -> np.ndarray:
    """Full-resolution pixel coordinates -> coordinates in an image resized by ``f`` (pixel centres)."""
    o = 0.5 * f - 0.5
    return np.array([[f, 0, o], [0, f, o], [0, 0, 1.0]])


def _to_similarity(m: np.ndarray) -> np.ndarray:
    """Nearest scale + rotation + shift to an affine 3x3 (mean of the rotation-like parts)."""
    a = (m[0, 0] + m[1, 1]) / 2
    b = (m[1, 0] - m[0, 1]) / 2
    out = m.copy()
    out[0, 0], out[0, 1], out[1, 0], out[1, 1] = a, -b, b, a
    return out


@dataclass
class _Features:
    """What registration keeps of one plane: a small pyramid and a few full-resolution windows."""

    pyramid: list[np.ndarray]  # coarse-to-fine, blurred to a common scale; [-1] is the working level
    factors: list[float]  # resize factor of each level against full resolution
    windows: list[np.ndarray]  # full-resolution luminance (blurred) in the registrar's boxes
    low: np.ndarray  # working-level luminance, unblurred (exposure fit)


class _Registrar:
    """ECC registration of planes against a template plane's features (module docstring, step 2)."""

    SIGMA = 1.0  # common-scale blur at every level, in that level's pixels
    MIN_SIDE = 48  # coarsest pyramid level's shorter side
    GRID = 3  # refinement windows: GRID x GRID, centred at 1/6, 1/2, 5/6 of each side

    def __init__(self, options: AlignOptions, shape: tuple[int, int], flat: np.ndarray | None):
        self.opts = options
        self.flat = flat
        h, w = shape
        self.shape = shape
        f = min(1.0, options.working_size / max(h, w))
        self.size = (max(8, round(w * f)), max(8, round(h * f)))
        self.f = self.size[0] / w
        levels = 1
        while min(self.size) / 2 ** levels >= self.MIN_SIDE:
            levels += 1
        self.levels = levels
        # Full-resolution refinement windows (y0, y1, x0, x1), spread over the frame so that scale
        # and rotation are measured over a long baseline; only worth it when the working level is
        # reduced.
        self.boxes: list[tuple[int, int, int, int]] = []
        if options.refine_pixels > 0 and self.f < 1.0:
            side = int(min(h, w) / (self.GRID + 1))
            side = max(16, min(side, int(math.sqrt(options.refine_pixels / self.GRID ** 2))))
            for fy in (np.arange(self.GRID) + 0.5) / self.GRID:
                for fx in (np.arange(self.GRID) + 0.5) / self.GRID:
                    y0 = int(round(fy * h - side / 2))
                    x0 = int(round(fx * w - side / 2))
                    self.boxes.append((y0, y0 + side, x0, x0 + side))
        self.motion = options.mode if options.mode != "none" else "translation"
        self.criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
        self.refine_criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 10, 1e-4)

    def _lum_crop(self, img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        y0, y1, x0, x1 = box
        crop = np.asarray(img)[y0:y1, x0:x1]
        if self.flat is not None:
            crop = crop.astype(np.float32) * self.flat[y0:y1, x0:x1]
        return _common_scale(_to_lum(crop, np.asarray(img).dtype), self.SIGMA)

    def features(self, img: np.ndarray) -> _Features:
        low = _lum_small(img, self.size, self.flat)
        pyramid = [low]
        for _ in range(self.levels - 1):
            pyramid.append(cv2.pyrDown(pyramid[-1]))
        pyramid = [_common_scale(p, self.SIGMA) for p in reversed(pyramid)]
        factors = [p.shape[1] / self.shape[1] for p in pyramid]
        windows = [self._lum_crop(img, box) for box in self.boxes]
        return _Features(pyramid, factors, windows, low)

    def _ecc(self, template: np.ndarray, moving: np.ndarray, m: np.ndarray, criteria) -> tuple[float, np.ndarray]:
        warp = m[:2].astype(np.float32)
        cc, warp = cv2.findTransformECC(template, moving, warp, _ECC_MOTION[self.motion], criteria, None, 1)
        out = np.vstack([warp.astype(np.float64), [0, 0, 1.0]])
        if self.motion == "similarity":
            out = _to_similarity(out)
        return float(cc), out

    def register(self, template: _Features, moving: _Features, img: np.ndarray,
                 init: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """3x3 map from template to moving pixel coordinates (full resolution), and its correlation.

        ``init``: a guess (the previous plane's transform: a focus sweep breathes smoothly). ECC
        then starts at the working level; when that fails it starts over from the coarsest level
        at the identity. Raises cv2.error when ECC does not converge.
        """
        m = None
        if init is not None:
            try:
                cc, m = self._level(template, moving, -1, init)
                if self.check(m, cc) is not None:
                    m = None
            except cv2.error:
                m = None
        if m is None:
            m = np.eye(3)
            for level in range(len(template.pyramid)):
                cc, m = self._level(template, moving, level, m)
        return self._refine(template, img, self._symmetric(template, moving, m), cc)

    def _symmetric(self, template: _Features, moving: _Features, m: np.ndarray) -> np.ndarray:
        """The mean of ``m`` and the inverse of the backward estimate (the moving plane as the
        template, started from ``m^-1`` at the working level).

        ECC treats its two images differently (it linearises the warped input, not the template),
        so between planes of different defocus its error has a part that changes sign with the
        direction of registration; averaging both directions cancels that part (inverse-consistent
        registration: Christensen & Johnson, IEEE TMI 20(7), 2001). Measured: the unit test's
        farthest plane 0.43 -> 0.33 px at the corners, its fusion -0.60 -> -0.29 dB against the
        unmoved stack; over the benchmark's 12 stacks the worst stack -1.33 -> -1.26 dB but the
        mean -0.36 -> -0.41 dB (docs/alignment.md, tables 1-2). Near the identity the mean of the two 3x3 maps
        is their geometric mean to second order, and stays a similarity for ``similarity``.
        """
        try:
            _, backward = self._level(moving, template, -1, np.linalg.inv(m))
        except cv2.error:
            return m
        return (m + np.linalg.inv(backward)) / 2

    def _level(self, template: _Features, moving: _Features, level: int, m: np.ndarray) -> tuple[float, np.ndarray]:
        """ECC at one pyramid level; ``m`` and the result in full-resolution coordinates."""
        s = _level_matrix(template.factors[level])
        cc, ml = self._ecc(template.pyramid[level], moving.pyramid[level], s @ m @ np.linalg.inv(s), self.criteria)
        return cc, np.linalg.inv(s) @ ml @ s

    def _refine(self, template: _Features, img: np.ndarray, m: np.ndarray, cc: float) -> tuple[np.ndarray, float]:
        """Full-resolution refinement: ECC translation of each template window against the part of
        the plane the current estimate maps it to, then the model fitted to the window centres'
        displacements (least squares). Windows without enough texture to correlate are left out;
        with too few left, the reduced-resolution estimate stands."""
        if not template.windows:
            return m, cc
        h, w = self.shape
        src, dst, ccs = [], [], []
        for box, tmpl in zip(self.boxes, template.windows):
            y0, y1, x0, x1 = box
            centre = np.array([(x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, 1.0])
            # the template window's footprint in the plane under the current estimate, plus a margin
            corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], float).T
            mapped = (m @ corners)[:2]
            bx0, by0 = int(math.floor(mapped[0].min())) - 8, int(math.floor(mapped[1].min())) - 8
            bx1, by1 = int(math.ceil(mapped[0].max())) + 8, int(math.ceil(mapped[1].max())) + 8
            if bx0 < 0 or by0 < 0 or bx1 > w or by1 > h:
                continue  # the window leaves the plane: no full-resolution evidence there
            moving = self._lum_crop(img, (by0, by1, bx0, bx1))
            # window coordinates: template (u, v) = reference (u + x0, v + y0); moving (p, q) = plane (p + bx0, q + by0)
            local = np.array([[1.0, 0, -bx0], [0, 1.0, -by0], [0, 0, 1]]) @ m @ np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1]])
            warp = local[:2].astype(np.float32)
            try:
                # translation only: the linear part of ``warp`` stays as estimated, ECC moves the window
                c, warp = cv2.findTransformECC(tmpl, moving, warp, cv2.MOTION_TRANSLATION, self.refine_criteria, None, 1)
            except cv2.error:
                continue
            if c < self.opts.min_correlation:
                continue
            shift = warp[:, 2].astype(np.float64) - local[:2, 2]
            src.append(centre[:2])
            dst.append((m @ centre)[:2] + shift)
            ccs.append(c)
        need = {"translation": 1, "similarity": 2, "affine": 3}[self.motion]
        if len(src) < max(need, min(len(self.boxes), 3)):
            return m, cc
        src, dst = np.array(src), np.array(dst)
        fitted = _fit_model(src, dst, self.motion)
        return fitted, float(np.mean(ccs))

    def evidence(self, template: _Features, moving: _Features, m: np.ndarray) -> tuple[float, float]:
        """How strongly the working level supports motion ``m`` over the identity.

        Returns (misfit reduction, motion SNR). The reduction is ``1 - (1 - rho_m) / (1 - rho_0)``
        with rho the ECC correlation (Evangelidis & Psarakis 2008, eq. 4) of the template with the
        moving plane as it is (rho_0) and warped by ``m`` (rho_m): the share of the misfit the motion
        explains. Between differently focused planes much of the misfit is defocus, which no motion
        explains; ECC still drifts in it, towards where the sharper plane's detail lies. So when the
        reduction is small, the cells of a 3x3 grid are registered by translation on their own (from
        the identity): a real motion predicts their shifts, a drift does not. SNR = RMS of the shifts
        ``m`` predicts at the cell centres / RMS of measured minus predicted (full-resolution px).
        Only computed when the reduction is under MIN_MISFIT_REDUCTION (else SNR is inf).
        """
        ref, mov = template.pyramid[-1], moving.pyramid[-1]
        h, w = ref.shape
        s = _level_matrix(template.factors[-1])
        ml = s @ m @ np.linalg.inv(s)
        inner = np.zeros((h, w), np.uint8)
        inner[4:-4, 4:-4] = 1
        warped = cv2.warpAffine(mov, ml[:2], (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REPLICATE)
        misfit_0 = 1.0 - cv2.computeECC(ref, mov, inner)
        misfit_m = 1.0 - cv2.computeECC(ref, warped, inner)
        reduction = 1.0 - misfit_m / misfit_0 if misfit_0 > 0 else 0.0
        if reduction >= MIN_MISFIT_REDUCTION:
            return float(reduction), float("inf")
        predicted, residual = [], []
        g = _EVIDENCE_GRID
        for y0, y1 in ((h * k // g, h * (k + 1) // g) for k in range(g)):
            for x0, x1 in ((w * k // g, w * (k + 1) // g) for k in range(g)):
                mask = np.zeros((h, w), np.uint8)
                mask[y0:y1, x0:x1] = 1
                centre = np.array([(x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, 1.0])
                expected = ((ml @ centre) - centre)[:2] / s[0, 0]
                try:
                    _, warp = cv2.findTransformECC(ref, mov, np.eye(2, 3, dtype=np.float32), cv2.MOTION_TRANSLATION,
                                                   self.criteria, mask, 1)
                except cv2.error:
                    continue  # a cell without texture: no evidence either way
                predicted.append(expected)
                residual.append(warp[:, 2] / s[0, 0] - expected)
        if len(predicted) < 3:
            return float(reduction), 0.0
        signal = math.sqrt(np.mean(np.sum(np.square(predicted), axis=1)))
        noise = math.sqrt(np.mean(np.sum(np.square(residual), axis=1)))
        return float(reduction), float(signal / noise) if noise > 0 else float("inf")

    def check(self, m: np.ndarray, cc: float) -> str | None:
        """Why a registration is not to be applied (None: accept)."""
        o = self.opts
        h, w = self.shape
        if not np.all(np.isfinite(m)) or not math.isfinite(cc):
            return "registration did not converge"
        if cc < o.min_correlation:
            return f"low correlation {cc:.3f} < {o.min_correlation}"
        c = np.array([(w - 1) / 2, (h - 1) / 2, 1.0])
        shift = float(np.hypot(*(m @ c - c)[:2]))
        limit = o.max_shift * max(h, w)
        if shift > limit:
            return f"shift {shift:.1f} px past the limit {limit:.1f} px"
        a = m[:2, :2]
        sv = np.linalg.svd(a, compute_uv=False)
        scale = math.sqrt(abs(np.linalg.det(a)))
        if abs(scale - 1.0) > o.max_scale_change:
            return f"scale {scale:.4f} past the limit 1 +- {o.max_scale_change}"
        rotation = math.degrees(math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1]))
        if abs(rotation) > o.max_rotation_deg:
            return f"rotation {rotation:.2f} deg past the limit {o.max_rotation_deg}"
        if sv[0] / sv[1] - 1.0 > o.max_shear:
            return f"anisotropy {sv[0] / sv[1]:.4f} past the limit 1 + {o.max_shear}"
        return None


def _significant(evidence: tuple[float, float]) -> bool:
    """Whether (misfit reduction, motion SNR) from :meth:`_Registrar.evidence` shows real motion."""
    reduction, snr = evidence
    return reduction >= MIN_MISFIT_REDUCTION or snr >= MIN_MOTION_SNR


def _fit_model(src: np.ndarray, dst: np.ndarray, motion: str) -> np.ndarray:
    """Least-squares 3x3 map of points ``src`` onto ``dst`` ((K, 2) each) for a motion model."""
    if motion == "translation":
        t = (dst - src).mean(axis=0)
        return np.array([[1.0, 0, t[0]], [0, 1.0, t[1]], [0, 0, 1]])
    k = len(src)
    if motion == "similarity":
        # x' = a x - b y + tx, y' = b x + a y + ty: linear in (a, b, tx, ty)
        rows = np.zeros((2 * k, 4))
        rows[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(k), np.zeros(k)]
        rows[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(k), np.ones(k)]
        (a, b, tx, ty), *_ = np.linalg.lstsq(rows, dst.reshape(-1), rcond=None)
        return np.array([[a, -b, tx], [b, a, ty], [0, 0, 1.0]])
    design = np.c_[src, np.ones(k)]
    coef, *_ = np.linalg.lstsq(design, dst, rcond=None)  # (3, 2)
    return np.vstack([coef.T, [0, 0, 1.0]])


# ----------------------------------------------------------------------------- photometry


def load_flat_field(uri: str, shape: tuple[int, ...], **read_kw) -> np.ndarray:
    """Blank frame at ``uri`` -> float32 correction ``mean(F) / F`` shaped to broadcast over a plane.

    The frame is smoothed lightly (Gaussian, sigma 2 px) so its own noise is not stamped onto
    every plane. Raises StackMismatchError naming the file when its size or channels do not fit,
    or when it has dark pixels (under 5% of its mean) that would be amplified beyond use.
    """
    from ray_mff import io

    frame = io.read_image(uri, **read_kw)
    h, w = shape[:2]
    c = 1 if len(shape) == 2 else shape[2]
    fc = 1 if frame.ndim == 2 else frame.shape[2]
    if frame.shape[:2] != (h, w) or fc not in (1, c):
        raise StackMismatchError(uri, f"flat-field frame is {frame.shape[1]}x{frame.shape[0]} with {fc} channel(s); "
                                      f"the stack is {w}x{h} with {c}")
    f = cv2.GaussianBlur(frame.astype(np.float32), (0, 0), 2.0).reshape(frame.shape)
    if f.ndim == 3 and fc == 1:
        f = f[..., 0]
    mean = f.reshape(-1, fc).mean(axis=0)
    if np.any(f.reshape(-1, fc) < 0.05 * mean):
        raise StackMismatchError(uri, "flat-field frame has pixels under 5% of its mean (not a blank frame?)")
    corr = (mean / f).astype(np.float32)
    if c > 1 and corr.ndim == 2:
        corr = corr[..., None]
    corr.flags.writeable = False  # shared by every stack of a run (cached)
    return corr


@functools.lru_cache(maxsize=2)
def _cached_flat_field(uri: str, shape: tuple[int, ...], read_kw: tuple) -> np.ndarray:
    """One read of the blank frame per process (a run's stacks share it)."""
    return load_flat_field(uri, shape, **dict(read_kw))


def fit_exposure(reference_low: np.ndarray, moving_low: np.ndarray, transform: np.ndarray, factor: float
                 ) -> tuple[float, float, str | None]:
    """Gain and offset with ``reference ~= gain * moving + offset`` (full-scale units).

    Both inputs are reduced-resolution luminance; the moving one is first warped into the
    reference frame with ``transform`` (full-resolution, reference -> plane). The fit uses a
    low-pass much wider than any defocus (1/32 of the longer side), where focus changes nothing
    but exposure does, restricted to pixels valid in both and well exposed (2%..95% of full scale
    before low-pass, so clipped highlights do not pull the gain). Least squares, then again
    without residuals beyond 3 MADs. When the low-passed scene has too little spread to separate
    gain from offset, the gain alone is fitted (median of ratios).
    Returns (gain, offset, reason) with reason set, and (1, 0), when no usable fit exists.
    """
    h, w = reference_low.shape
    s = _level_matrix(factor)
    m = s @ transform @ np.linalg.inv(s)
    moved = cv2.warpAffine(moving_low, m[:2], (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
    valid = (moved >= 0.02) & (moved <= 0.95) & (reference_low >= 0.02) & (reference_low <= 0.95)
    valid = cv2.erode(valid.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    sigma = max(h, w) / 32
    lp_ref = cv2.GaussianBlur(reference_low, (0, 0), sigma)
    lp_mov = cv2.GaussianBlur(np.where(moved >= 0, moved, reference_low).astype(np.float32), (0, 0), sigma)
    x, y = lp_mov[valid].astype(np.float64), lp_ref[valid].astype(np.float64)
    if x.size < 64:
        return 1.0, 0.0, "exposure not matched: too few well-exposed pixels"
    if x.std() < 0.03:
        gain = float(np.median(y / np.maximum(x, 1e-6)))
        offset = 0.0
    else:
        keep = np.ones(x.size, bool)
        for _ in range(2):
            gain, offset = np.polyfit(x[keep], y[keep], 1)
            r = y - (gain * x + offset)
            mad = np.median(np.abs(r - np.median(r))) + 1e-9
            keep = np.abs(r) <= 3 * 1.4826 * mad
    if not (0.5 <= gain <= 2.0) or abs(offset) > 0.25:
        return 1.0, 0.0, f"exposure not matched: gain {gain:.3f} offset {offset:.3f} past the limits"
    return float(gain), float(offset), None


# ----------------------------------------------------------------------------------- the stage


def estimate_alignment(planes: Sequence[np.ndarray], options: AlignOptions, *, flat: np.ndarray | None = None
                       ) -> StackAlignment:
    """Transforms and exposure of every plane against the reference, reading one plane at a time.

    planes:  N arrays (H, W) or (H, W, C) of one shape and dtype (a list or a lazy sequence).
    flat:    the flat-field correction (:func:`load_flat_field`), applied before estimation.
    Returns a StackAlignment; :meth:`StackAlignment.apply` maps a plane into the reference frame.
    """
    n = len(planes)
    ref = n // 2
    ref_img = planes[ref]
    shape = np.asarray(ref_img).shape[:2]
    records = [PlaneAlignment() for _ in range(n)]
    out = StackAlignment(options, shape, ref, records, flat=flat)
    if options.mode == "none" and not options.match_exposure:
        return out
    reg = _Registrar(options, shape, flat)
    ref_feat = reg.features(ref_img)
    records[ref].status = "reference"
    records[ref].correlation = 1.0
    del ref_img
    for side in (range(ref - 1, -1, -1), range(ref + 1, n)):
        anchor, anchor_m = ref_feat, np.eye(3)
        anchor_gain, anchor_offset = 1.0, 0.0
        guess = None  # the last accepted transform on this side: where ECC starts the next plane
        for i in side:
            img = planes[i]
            feat = reg.features(img)
            rec = records[i]
            m = np.eye(3)
            if options.mode != "none":
                try:
                    local, cc = reg.register(anchor, feat, img, init=guess)
                    reason = reg.check(local, cc)
                except cv2.error as err:
                    local, cc, reason = np.eye(3), float("nan"), f"registration did not converge ({_short(err)})"
                rec.correlation = cc
                if reason is None:
                    guess = local
                    if corner_motion(local, shape) >= STILL_PX:
                        rec.evidence = reg.evidence(anchor, feat, local)
                        if not _significant(rec.evidence):
                            local = np.eye(3)  # what ECC found is within what defocus alone explains
                    m = local @ anchor_m  # reference -> anchor -> this plane
                    rec.status, rec.transform = "ok", m
                else:
                    rec.status, rec.reason = "failed", reason
            local_gain, local_offset = 1.0, 0.0
            if options.match_exposure:
                local_m = m @ np.linalg.inv(anchor_m) if rec.status == "ok" else np.eye(3)
                local_gain, local_offset, why = fit_exposure(anchor.low, feat.low, local_m, reg.f)
                rec.gain = anchor_gain * local_gain
                rec.offset = anchor_gain * local_offset + anchor_offset
                if why:
                    rec.reason = f"{rec.reason}; {why}" if rec.reason else why
            if options.reference == "chain" and (rec.status == "ok" or options.mode == "none"):
                anchor, anchor_m = feat, m
                anchor_gain, anchor_offset = rec.gain, rec.offset
            del img, feat
    if options.crop and options.mode != "none":
        out.crop_box = common_valid_box(shape, [r.transform for r in records])
    return out


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:160]


def common_valid_box(shape: tuple[int, int], transforms: list[np.ndarray]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the largest reference-frame rectangle whose pixels every plane covers.

    Each plane covers the quadrilateral ``T^-1([0, w-1] x [0, h-1])`` of the reference frame; for
    the near-identity transforms registration accepts, the box bounded by the innermost corner
    coordinates lies inside it. One more pixel is dropped on each side (bicubic support).
    """
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float).T
    left, top, right, bottom = 0.0, 0.0, w - 1.0, h - 1.0
    for t in transforms:
        if corner_motion(t, shape) < STILL_PX:  # not resampled (StackAlignment.apply)
            continue
        p = np.linalg.inv(t) @ corners  # plane corners in the reference frame: TL, TR, BL, BR
        left = max(left, p[0, 0], p[0, 2])
        right = min(right, p[0, 1], p[0, 3])
        top = max(top, p[1, 0], p[1, 1])
        bottom = min(bottom, p[1, 2], p[1, 3])
    x0, y0 = int(math.ceil(left)) + 1, int(math.ceil(top)) + 1
    x1, y1 = int(math.floor(right)), int(math.floor(bottom))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return (0, h, 0, w)
    return (y0, y1, x0, x1)


class AlignedPlanes(PlaneSequence):
    """A lazy view: plane ``i`` of ``planes`` in the reference frame, aligned when it is read.

    Fusion that uses less than every pixel of every plane warps less ("warp what you use"):

    - :meth:`read_regions` aligns only given windows of a plane (the composite of
      :func:`ray_mff.fusion.decision.fuse_with_weights` reads a plane only where its weight is
      non-zero: on stack_v4 about 3 planes' worth of pixels out of 65);
    - :meth:`luminance_view` is the same stack as (H, W) float32 luminance, converted before the
      warp (one channel to resample; ``guided``'s decision guide reads it by region);
    - :meth:`focus_maps` measures focus on each plane as read and resamples only the measure.

    ``crop`` (tiling) aligns only the window it is asked for.
    """

    def __init__(self, planes: Sequence[np.ndarray], alignment: StackAlignment, *, luminance: bool = False):
        self._planes, self.alignment, self._luminance = planes, alignment, luminance
        base = plane_shape(planes)
        self.shape = tuple(alignment.out_shape()) + (() if luminance else tuple(base[2:]))
        dtype = getattr(planes, "dtype", None)
        self.dtype = np.dtype(np.float32 if luminance else np.asarray(planes[0]).dtype if dtype is None else dtype)

    def __len__(self) -> int:
        return len(self._planes)

    def _read(self, k: int) -> np.ndarray:
        return self.alignment.apply(self._planes[k], k, luminance=self._luminance)

    def _read_window(self, k: int, window: tuple[int, int, int, int]) -> np.ndarray:
        return self.alignment.apply(self._planes[k], k, window, luminance=self._luminance)

    def read_regions(self, k: int, windows: Sequence[tuple[int, int, int, int]]) -> list[np.ndarray]:
        """Plane ``k`` aligned over each (y0, y1, x0, x1) window of the output frame; the plane is
        read once. Each equals ``self[k][y0:y1, x0:x1]`` within one grey level (:meth:`StackAlignment.apply`)."""
        if not windows:
            return []
        plane = self._planes[k]
        return [self.alignment.apply(plane, k, tuple(win), luminance=self._luminance) for win in windows]

    def luminance_view(self) -> "AlignedPlanes":
        """The same planes as (H, W) float32 luminance in [0, 1], aligned when read."""
        return self if self._luminance else AlignedPlanes(self._planes, self.alignment, luminance=True)

    def focus_maps(self, focus_measure: Callable[[np.ndarray, int], np.ndarray], window: int,
                   scale_power: float = 0.0) -> Sequence[np.ndarray]:
        """Lazy (H, W) float32 maps ``focus_measure(luminance, window) * scale ** scale_power`` of
        each plane as read, resampled bilinearly into the output frame (``MEASURE_RESAMPLING``).

        ``scale`` is the plane's magnification against the reference (:attr:`PlaneAlignment.scale`).
        A measure built from derivatives of order m raised to the power q falls as scale^(-m q)
        when a plane is magnified (derivatives of the magnified image are 1/scale times the
        reference's; the scale normalisation of Lindeberg, "Feature detection with automatic scale
        selection", IJCV 30(2), 1998): ``scale_power = m q`` puts every plane's measure on the
        reference's footing, as measuring it after the warp does.
        """
        def measure(k: int) -> np.ndarray:
            factor = np.float32(self.alignment.planes[k].scale ** scale_power)
            fm = functools.partial(_scaled_measure, focus_measure, window, factor)
            return self.alignment.apply(self._planes[k], k, luminance=True, measure=fm)

        return MappedPlanes(range(len(self)), measure)


def _scaled_measure(focus_measure, window: int, factor: np.float32, lum: np.ndarray) -> np.ndarray:
    fm = focus_measure(lum, window)
    if factor != 1:
        fm *= factor
    return fm


def align_stack(planes: Sequence[np.ndarray], options: AlignOptions, *, flat: np.ndarray | None = None,
                lazy: bool = False, **read_kw) -> tuple[Sequence[np.ndarray], StackAlignment]:
    """Register (and photometrically match) a stack; return the aligned planes and how.

    planes:  N arrays of one shape and dtype: a list is aligned in place (each entry replaced by
             its aligned plane, so memory stays at the stack plus one plane) and returned; any
             other sequence is wrapped in :class:`AlignedPlanes` (aligned when read).
    lazy:    wrap a list in :class:`AlignedPlanes` too. For fusers that read planes by region and
             luminance (``guided``: it then warps a few planes' worth of colour pixels instead of
             all N); fusers that read every plane whole, some more than once, do better eagerly.
    options: :class:`AlignOptions`; with ``mode="none"`` and no photometry the planes come back
             untouched (the same objects).
    flat:    a precomputed flat-field correction; else ``options.flat_field`` is read
             (``read_kw`` go to :func:`ray_mff.io.read_image`).

    Example:
        >>> import numpy as np
        >>> planes, how = align_stack([np.zeros((64, 64), np.uint8)] * 2, AlignOptions())
        >>> how.summary()
        {'align': None}
    """
    if len(planes) < 2 or not options.active:
        return planes, StackAlignment(options, np.asarray(planes[0]).shape[:2] if len(planes) else (0, 0),
                                      len(planes) // 2, [PlaneAlignment() for _ in range(len(planes))])
    if flat is None and options.flat_field:
        flat = _cached_flat_field(options.flat_field, np.asarray(planes[0]).shape, tuple(sorted(read_kw.items())))
    alignment = estimate_alignment(planes, options, flat=flat)
    if isinstance(planes, list) and not lazy:
        for i in range(len(planes)):
            planes[i] = alignment.apply(planes[i], i)
        return planes, alignment
    return AlignedPlanes(planes, alignment), alignment
