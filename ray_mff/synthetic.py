"""Synthetic focus stacks with a known all-in-focus truth, for tests and a ground-truth benchmark.

Scene model (layered depth): an all-in-focus picture is cut into 2..L layers at distinct depths:
a background plane and smooth star-shaped objects in front of it. Image i of the stack is focused
at depth z_i; a layer at depth z is blurred by a disk (pillbox) PSF of radius
``max_radius * |z - z_i|``, the thin-lens circle of confusion when z is measured in dioptres
(inverse distance). Layers are composited back to front with their blurred alpha, so a blurred
near object spreads over the sharp background at its boundary and a blurred background is hidden
behind a sharp near object (the "layered" defocus model of Hasinoff & Kutulakos, "A layer-based
restoration framework for variable-aperture photography", ICCV 2007; Asada et al., "Seeing behind
the scene", 1998). Gaussian sensor noise is added last, then values are quantised to the dtype.

This is deliberately unlike the training data in ``ray_mff.train`` (Gaussian blur of a masked
region, no occlusion spill): a disk PSF has a sharp spectral zero crossing and a hard rim, and
the occlusion band where neither source is sharp is realistic, so fusing these stacks tests
generalisation, not memorisation of the training blur.
"""
from __future__ import annotations

import cv2
import numpy as np

from ray_mff.fusion.luminance import from_unit_float, to_unit_float


def _subsample_grid(radius: float, supersample: int) -> tuple[int, int, np.ndarray]:
    """(R, s, coordinates): kernel half-size R = ceil(radius - 0.5), sub-samples per pixel s, and
    the (2R+1)*s sub-sample centres along one axis, for anti-aliased aperture kernels."""
    half = int(np.ceil(radius - 0.5))
    s = int(supersample)
    offs = (np.arange(s) + 0.5) / s - 0.5
    c = np.arange(-half, half + 1, dtype=np.float64)
    return half, s, (c[:, None] + offs[None, :]).ravel()


def disk_psf(radius: float, supersample: int = 8) -> np.ndarray:
    """Pillbox PSF of the given radius (pixels), anti-aliased at its rim, summing to 1.

    Each kernel pixel holds the fraction of its area inside the disk (``supersample`` x
    ``supersample`` sub-samples). Radii below 0.5 give a single-pixel (identity) kernel.
    Returns (2R+1, 2R+1) float32 with R = ceil(radius - 0.5).
    """
    if radius < 0.5:
        return np.ones((1, 1), dtype=np.float32)
    half, s, sub = _subsample_grid(radius, supersample)
    inside = (sub[:, None] ** 2 + sub[None, :] ** 2) <= radius * radius
    k = inside.reshape(2 * half + 1, s, 2 * half + 1, s).mean(axis=(1, 3))
    return (k / k.sum()).astype(np.float32)


def gaussian_psf(radius: float) -> np.ndarray:
    """Gaussian PSF with sigma = radius / 2 (the common blur-circle-to-sigma rule), summing to 1."""
    sigma = radius / 2.0
    if sigma < 0.25:
        return np.ones((1, 1), dtype=np.float32)
    half = int(np.ceil(3 * sigma))
    g = cv2.getGaussianKernel(2 * half + 1, sigma, cv2.CV_32F)
    return (g @ g.T).astype(np.float32)


def polygon_psf(radius: float, blades: int = 6, rotation: float = 0.0, supersample: int = 8) -> np.ndarray:
    """PSF of a polygonal aperture (a lens iris of ``blades`` straight blades) of circumradius
    ``radius`` px, rotated by ``rotation`` radians, anti-aliased at its rim, summing to 1.

    Defocus blur is the aperture's image scaled by the circle of confusion (geometric optics), so
    a real lens stopped down gives a pentagon-to-nonagon, not a disk. Radii below 0.5 give the
    identity kernel. Returns (2R+1, 2R+1) float32 with R = ceil(radius - 0.5).
    """
    if radius < 0.5:
        return np.ones((1, 1), dtype=np.float32)
    half, s, sub = _subsample_grid(radius, supersample)
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    # inside a regular polygon: the projection on every edge normal is below the apothem
    inside = np.ones(yy.shape, bool)
    apothem = radius * np.cos(np.pi / blades)
    for k in range(blades):
        a = rotation + (2 * k + 1) * np.pi / blades
        inside &= xx * np.cos(a) + yy * np.sin(a) <= apothem
    k = inside.reshape(2 * half + 1, s, 2 * half + 1, s).mean(axis=(1, 3))
    if k.sum() == 0:
        return np.ones((1, 1), dtype=np.float32)
    return (k / k.sum()).astype(np.float32)


_PSFS = {"disk": disk_psf, "gaussian": gaussian_psf, "polygon": polygon_psf}


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve (H, W) or (H, W, C) float32 with a symmetric kernel, mirrored borders."""
    if kernel.size == 1:
        return x.copy()
    if x.ndim == 2 or x.shape[2] <= 4:
        out = cv2.filter2D(x, cv2.CV_32F, kernel, borderType=cv2.BORDER_REFLECT)
        return out.reshape(x.shape)
    return np.stack([_blur(np.ascontiguousarray(x[..., c]), kernel) for c in range(x.shape[2])], axis=2)


def _blob_alpha(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 alpha of one smooth star-shaped object, anti-aliased at its outline.

    Outline r(theta) = r0 (1 + sum_k a_k cos(k theta + phi_k)), k = 2..5, a random low-order
    Fourier series, so the object is one connected, smooth, non-convex region.
    """
    h, w = shape
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    r0 = rng.uniform(0.16, 0.30) * min(h, w)
    ks = np.arange(2, 6)
    amps = rng.normal(0.0, 0.18, ks.size) / np.sqrt(ks - 1)
    phases = rng.uniform(0, 2 * np.pi, ks.size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    dist = np.sqrt(dy * dy + dx * dx)
    r = r0 * (1.0 + np.sum(amps[:, None, None] * np.cos(ks[:, None, None] * theta + phases[:, None, None]), axis=0))
    r = np.maximum(r, 0.2 * r0)
    return np.clip(r - dist + 0.5, 0.0, 1.0).astype(np.float32)  # ~1-pixel anti-aliased rim


def _thin_alpha(shape: tuple[int, int], rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
    """(H, W) float32 alpha of thin structures (twigs, grass blades, legs): 3-12 random polylines
    1-3 px wide, drawn anti-aliased on a ``supersample``-times finer canvas and averaged down."""
    h, w = shape
    s = int(supersample)
    canvas = np.zeros((h * s, w * s), np.uint8)
    for _ in range(int(rng.integers(3, 13))):
        pts = [rng.uniform(0, 1, 2) * (w * s, h * s)]
        step = rng.uniform(0.1, 0.35) * min(h, w) * s
        ang = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(2, 6))):
            ang += rng.normal(0.0, 0.5)
            pts.append(pts[-1] + step * np.array([np.cos(ang), np.sin(ang)]))
        width = max(1, int(round(rng.uniform(1.0, 3.0) * s)))
        cv2.polylines(canvas, [np.round(np.array(pts)).astype(np.int32)], False, 255, width, cv2.LINE_AA)
    return cv2.resize(canvas.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_AREA)


def render_focus_stack(
    image: np.ndarray,
    n_images: int,
    *,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    psf: str = "disk",
    max_radius: float = 8.0,
    noise_sigma: float = 0.003,
    layers: int | None = None,
    dtype: np.dtype | None = None,
    psf_options: dict | None = None,
    thin_prob: float = 0.0,
    depth_jitter: float = 0.0,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Render an N-image focus stack of ``image`` with known ground truth.

    image:       (H, W) or (H, W, C) all-in-focus picture (uint8, uint16 or float in [0, 1]).
    n_images:    N >= 2 images, focused at depths z_i = i / (N - 1), i = 0..N-1 (dioptres, 0..1).
    rng / seed:  randomness for the layer shapes, depths and noise (``rng`` wins if both given).
    psf:         "disk" (pillbox, default) or "gaussian" (sigma = radius / 2).
    max_radius:  blur radius in pixels for a depth difference of 1 (the whole stack's range):
                 adjacent images of a 3-stack differ by max_radius / 2 = 4 px by default, about
                 the defocus in the Lytro pairs.
    noise_sigma: standard deviation of additive Gaussian sensor noise, in units of full scale
                 (0.003 = 0.8 DN at 8 bits, about a clean sensor at base ISO).
    layers:      number of depth layers L, 2 <= L <= N (default min(N, 5)): the background plus
                 L - 1 objects, each at its own focus depth, so every layer is sharp in one image.
    dtype:       output dtype (default: the input's); e.g. render a uint16 stack from a uint8 picture.
    psf_options: keyword arguments of the PSF (e.g. ``{"blades": 6, "rotation": 0.3}`` for "polygon").
    thin_prob:   probability that an object layer is thin structures (:func:`_thin_alpha`) instead of
                 a smooth blob (default 0: the benchmark's scenes).
    depth_jitter: layers sit up to this fraction of the focus spacing off their image's focal plane
                 (default 0: every layer is perfectly sharp in one image), so the sharpest image
                 of a layer is itself slightly blurred, as with a real focus sweep.

    Returns (stack, truth, depth_index_map):
      stack:           N arrays shaped like ``image``, of the output dtype;
      truth:           the all-in-focus image in the output dtype (the input, converted);
      depth_index_map: (H, W) uint16 index of the stack image in which each pixel's front-most
                       layer is in focus (the ideal decision map).
    """
    n = int(n_images)
    if n < 2:
        raise ValueError(f"a focus stack needs n_images >= 2, got {n}")
    if psf not in _PSFS:
        raise ValueError(f"unknown psf {psf!r}; choose from {sorted(_PSFS)}")
    n_layers = min(n, 5) if layers is None else int(layers)
    if not 2 <= n_layers <= n:
        raise ValueError(f"layers must lie in [2, n_images={n}], got {n_layers}")
    if rng is None:
        rng = np.random.default_rng(seed)
    out_dtype = np.dtype(image.dtype if dtype is None else dtype)
    if out_dtype.kind == "f":
        out_dtype = np.dtype(np.float32)
    src = to_unit_float(np.asarray(image))
    h, w = src.shape[:2]

    # Layer 0 is the background (farthest); layer l > 0 is an object in front of layers < l.
    # Each layer sits at a distinct focus depth, farther layers at larger z.
    focus_z = np.arange(n) / (n - 1)
    layer_focus = np.sort(rng.choice(n, size=n_layers, replace=False))[::-1]
    layer_z = focus_z[layer_focus].astype(np.float64)
    if depth_jitter > 0:
        layer_z = layer_z + rng.uniform(-depth_jitter, depth_jitter, n_layers) / (n - 1)
    alphas = [np.ones((h, w), dtype=np.float32)]
    for _ in range(1, n_layers):
        if thin_prob and rng.random() < thin_prob:
            alphas.append(_thin_alpha((h, w), rng))
            continue
        a = _blob_alpha((h, w), rng)
        if rng.random() < 0.35:  # some layers hold two objects at the same depth
            a = np.maximum(a, _blob_alpha((h, w), rng))
        alphas.append(a)

    depth_index = np.full((h, w), layer_focus[0], dtype=np.uint16)
    for a, f in zip(alphas[1:], layer_focus[1:]):
        depth_index[a >= 0.5] = f

    make_psf = _PSFS[psf]
    stack = []
    for i in range(n):
        acc = None
        for a, z in zip(alphas, layer_z):
            k = make_psf(max_radius * abs(z - focus_z[i]), **(psf_options or {}))
            if acc is None:  # opaque background
                acc = _blur(src, k)
                continue
            a_blur = _blur(a, k)
            premult = src * (a if src.ndim == 2 else a[..., None])
            c_blur = _blur(premult, k)  # blurred colour x alpha (premultiplied)
            if src.ndim == 3:
                a_blur = a_blur[..., None]
            acc = acc * (1.0 - a_blur) + c_blur  # "over" with the blurred alpha
        if noise_sigma > 0:
            acc = acc + rng.normal(0.0, noise_sigma, acc.shape).astype(np.float32)
        stack.append(from_unit_float(np.clip(acc, 0.0, 1.0), out_dtype))
    truth = from_unit_float(src, out_dtype)
    return stack, truth, depth_index



def render_misregistered_stack(
    image: np.ndarray,
    n_images: int,
    *,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    max_shift: float = 0.03,
    max_scale_change: float = 0.02,
    max_rotation_deg: float = 0.0,
    supersample: int = 2,
    optics_sigma: float = 0.7,
    noise_sigma: float = 0.003,
    dtype: np.dtype | None = None,
    **render_options,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """A focus stack as a moving camera (or focus breathing) records it, with known transforms.

    Every plane but the reference (the middle one, N // 2) is moved by a random similarity about
    the image centre: scale 1 +- ``max_scale_change``, shift up to ``max_shift`` x width per axis,
    rotation up to ``max_rotation_deg``. To sample the moved scene afresh rather than resample a
    finished plane (which would blur it before any aligner sees it), the stack is rendered at
    ``supersample`` x the resolution (:func:`render_focus_stack`, blur radii scaled alike), moved
    there, and area-averaged down; sensor noise and quantisation come last, the same noise for a
    plane in both versions. ``optics_sigma`` (output pixels) is the camera's in-focus PSF, a
    Gaussian applied to the picture before anything else (a real lens and demosaicing never
    deliver detail right up to the pixel pitch); the truth is the picture through that PSF.

    Returns (registered, moved, truth, transforms): the stack without and with the motion, the
    all-in-focus truth (reference frame) and, per plane, the 3x3 map from reference pixel
    coordinates to that plane's pixel coordinates (what :mod:`ray_mff.align` estimates).
    """
    if rng is None:
        rng = np.random.default_rng(seed)
    s = int(supersample)
    src = to_unit_float(np.asarray(image))
    if optics_sigma > 0:
        src = cv2.GaussianBlur(src, (0, 0), optics_sigma).reshape(src.shape)
    h, w = src.shape[:2]
    big = cv2.resize(src, (w * s, h * s), interpolation=cv2.INTER_CUBIC).reshape((h * s, w * s) + src.shape[2:])
    radius = float(render_options.pop("max_radius", 8.0)) * s
    planes, _, _ = render_focus_stack(np.clip(big, 0, 1), n_images, rng=rng, max_radius=radius, noise_sigma=0.0,
                                      dtype=np.float32, **render_options)
    out_dtype = np.dtype(image.dtype if dtype is None else dtype)
    n = len(planes)
    ref = n // 2
    up = np.array([[s, 0, 0.5 * s - 0.5], [0, s, 0.5 * s - 0.5], [0, 0, 1.0]])  # pixel centres, x -> s x
    centre = np.array([[1.0, 0, (w - 1) / 2], [0, 1.0, (h - 1) / 2], [0, 0, 1]])
    registered, moved, transforms = [], [], []

    def finish(x: np.ndarray, noise: np.ndarray) -> np.ndarray:
        small = cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA).reshape(src.shape)
        return from_unit_float(np.clip(small + noise, 0, 1), out_dtype)

    for i, plane in enumerate(planes):
        noise = rng.normal(0.0, noise_sigma, src.shape).astype(np.float32) if noise_sigma > 0 else 0.0
        registered.append(finish(plane, noise))
        if i == ref:
            moved.append(registered[-1].copy())
            transforms.append(np.eye(3))
            continue
        k = 1.0 + rng.uniform(-max_scale_change, max_scale_change)
        theta = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
        tx, ty = rng.uniform(-max_shift, max_shift, 2) * w
        linear = np.array([[k * np.cos(theta), -k * np.sin(theta), 0], [k * np.sin(theta), k * np.cos(theta), 0],
                           [0, 0, 1.0]])
        t = np.array([[1.0, 0, tx], [0, 1.0, ty], [0, 0, 1]]) @ centre @ linear @ np.linalg.inv(centre)
        t_big = up @ t @ np.linalg.inv(up)
        # the scene point at reference pixel x lands on pixel t @ x of the moved plane
        chans = [plane] if plane.ndim == 2 or plane.shape[2] <= 4 else [plane[..., c] for c in range(plane.shape[2])]
        warped = [cv2.warpAffine(np.ascontiguousarray(c), t_big[:2], (w * s, h * s), flags=cv2.INTER_CUBIC,
                                 borderMode=cv2.BORDER_REPLICATE) for c in chans]
        warped = warped[0].reshape(plane.shape) if len(warped) == 1 else np.stack(warped, axis=2)
        moved.append(finish(warped, noise))
        transforms.append(t)
    truth = from_unit_float(src, out_dtype)
    return registered, moved, truth, transforms
