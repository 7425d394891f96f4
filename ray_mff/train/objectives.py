"""Training objectives: what data a model trains on and which loss it minimises, chosen per model.

The Ray Train loop (:mod:`ray_mff.train.trainer`) is one loop for every model; a model names its
objective in its ``training_objective`` attribute (default ``"gradient_aware"``), and the objective
supplies the two model-specific pieces:

- ``make_batch(images, rng, cfg) -> dict[str, np.ndarray]``: a training batch made on the fly
  from all-in-focus natural images (seeded ``rng``, so a resumed run sees the same data);
- ``loss(model, batch, cfg) -> dict[str, torch.Tensor]``: ``"loss"`` (the scalar minimised) and
  further terms reported with ``ray.train.report``. ``model`` may be DDP-wrapped: objectives only
  call it (its ``forward``), so gradients synchronise.

Objectives:

==========================  =================================================================
``gradient_aware``          synthetic focus pairs with masks; Dice + (1 - Q_G) (GACN; ``cascade``)
``ssim_select``             synthetic pairs of varying size, masks unused; Yan et al. 2020's
                            std-selected SSIM (``ssim``)
``ssim_multiscale``         synthetic pairs of varying size, masks unused; std-selected SSIM at
                            3 scales (``mscnn``)
``patch_classification``    clear / Gaussian-blurred patch pairs; binary cross-entropy (``cnn``)
``stack_truth``             focus sweeps of 2-8 images rendered with optical PSFs; supervised on
                            the all-in-focus truth (``stacknet``)
==========================  =================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

DEFAULT_OBJECTIVE = "gradient_aware"


@dataclass(frozen=True)
class Objective:
    """A model's training data and loss (see the module docstring)."""

    name: str
    make_batch: Callable[..., dict]
    loss: Callable[..., dict]
    #: the loss terms whose weights ``cfg["loss_weights"]`` may set (``--loss-weights``); none: fixed
    loss_terms: tuple[str, ...] = ()

    def check_loss_weights(self, weights: dict | None) -> None:
        """Raise ValueError naming the terms of ``weights`` this objective does not have."""
        unknown = sorted(set(weights or {}) - set(self.loss_terms))
        if unknown:
            known = ", ".join(self.loss_terms) or "none (this objective's loss has fixed weights)"
            raise ValueError(f"objective {self.name!r} has no loss term {', '.join(unknown)}; known: {known}")


# --------------------------------------------------------------------------- synthetic focus pairs


def _synthetic_pairs(images: Sequence[np.ndarray], rng: np.random.Generator, cfg: dict) -> dict:
    from ray_mff.train.synthetic_pairs import make_batch

    return make_batch(images, rng, int(cfg["patch"]))


def _variable_size_pairs(images: Sequence[np.ndarray], rng: np.random.Generator, cfg: dict) -> dict:
    """Synthetic pairs whose size changes from batch to batch (3/4 to 5/4 of ``patch``, multiples
    of 8): the fully convolutional direct-fusion networks train on variable image sizes, as Yan et
    al. 2020 do, so nothing in them tunes itself to one crop size."""
    from ray_mff.train.synthetic_pairs import make_batch

    patch = int(cfg["patch"])
    lo = max(2, (3 * patch // 4) // 8)  # in units of 8 pixels
    size = int(rng.integers(lo, max(lo, (5 * patch // 4) // 8) + 1)) * 8
    return make_batch(images, rng, size)


def _gradient_aware_loss(model, batch: dict, cfg: dict) -> dict:
    from ray_mff.train.losses import fusion_loss

    decision, fused = model(batch["y_a"], batch["y_b"])
    return fusion_loss(decision, batch["mask"], batch["y_a"], batch["y_b"], fused, qg_weight=cfg.get("qg_weight", 1.0))


def _ssim_select_loss(model, batch: dict, cfg: dict) -> dict:
    # Unsupervised (Yan et al. 2020): the synthetic masks are never looked at.
    from ray_mff.train.ssim_loss import std_selected_ssim_loss

    fused = model(batch["y_a"], batch["y_b"])
    return std_selected_ssim_loss(batch["y_a"], batch["y_b"], fused, mode="select")


def _ssim_multiscale_loss(model, batch: dict, cfg: dict) -> dict:
    from ray_mff.train.ssim_loss import multiscale_ssim_loss

    scales = model(batch["y_a"], batch["y_b"])
    return multiscale_ssim_loss(batch["y_a"], batch["y_b"], scales, mode="select")


# --------------------------------------------------------------------------- clear / blurred patch pairs

#: Liu et al. 2017, Sec. 3.2: Gaussian filter, standard deviation 2, cut off to 7 x 7, applied
#: repeatedly to make five blur levels.
BLUR_SIGMA = 2.0
BLUR_KSIZE = 7
BLUR_LEVELS = 5


def blur_levels(x: np.ndarray, levels: int = BLUR_LEVELS) -> list[np.ndarray]:
    """(H, W) float32 -> [blurred once, twice, ..., ``levels`` times] with the 7 x 7, sigma 2 Gaussian."""
    out = []
    for _ in range(levels):
        x = cv2.GaussianBlur(x, (BLUR_KSIZE, BLUR_KSIZE), BLUR_SIGMA, borderType=cv2.BORDER_REFLECT)
        out.append(x)
    return out


def blurred_patch_pairs(images: Sequence[np.ndarray], rng: np.random.Generator, patch: int = 32,
                        per_image: int = 16, noise: float = 0.01) -> dict[str, np.ndarray]:
    """Clear/blurred patch pairs (Liu et al. 2017, Sec. 3.2) from all-in-focus images.

    From each image, ``per_image`` random grey crops of ``patch`` x ``patch`` pixels; each is
    paired with a copy blurred 1-5 times (level drawn uniformly; the blur is computed on a larger
    crop so the patch border sees real pixels). Half the pairs are (clear, blurred) with label 1,
    half (blurred, clear) with label 0. Each source gets independent sensor noise of random level
    up to ``noise`` in half the pairs.

    A crop of ``patch`` > 16 pixels holds (patch/2 - 7)^2 overlapping 16 x 16 patches that all share
    its label: the dense score map sees them with real context around them, as at inference.
    Returns ``y_a``, ``y_b`` (B, 1, patch, patch) float32 in [0, 1] and ``label`` (B,) float32,
    B = len(images) * per_image.
    """
    from ray_mff.fusion.luminance import luminance

    margin = 3 * BLUR_LEVELS + 1  # the 7 x 7 kernel reaches 3 px per application
    need = patch + 2 * margin
    ya, yb, labels = [], [], []
    for img in images:
        lum = luminance(img)
        if min(lum.shape) < need:
            f = need / min(lum.shape)
            lum = cv2.resize(lum, (int(np.ceil(lum.shape[1] * f)), int(np.ceil(lum.shape[0] * f))),
                             interpolation=cv2.INTER_CUBIC)
        h, w = lum.shape
        for _ in range(per_image):
            y0, x0 = int(rng.integers(0, h - need + 1)), int(rng.integers(0, w - need + 1))
            crop = np.ascontiguousarray(lum[y0:y0 + need, x0:x0 + need], dtype=np.float32)
            if rng.random() < 0.5:
                crop = np.ascontiguousarray(crop.T)
            level = int(rng.integers(1, BLUR_LEVELS + 1))
            blurred = blur_levels(crop, level)[-1]
            clear, blurred = crop[margin:-margin, margin:-margin], blurred[margin:-margin, margin:-margin]
            if noise and rng.random() < 0.5:
                s = rng.uniform(0.0, noise)
                clear = clear + rng.normal(0.0, s, clear.shape).astype(np.float32)
                blurred = blurred + rng.normal(0.0, s, blurred.shape).astype(np.float32)
            first = rng.random() < 0.5
            ya.append(clear if first else blurred)
            yb.append(blurred if first else clear)
            labels.append(1.0 if first else 0.0)
    return {"y_a": np.clip(np.stack(ya), 0, 1)[:, None].astype(np.float32),
            "y_b": np.clip(np.stack(yb), 0, 1)[:, None].astype(np.float32),
            "label": np.asarray(labels, dtype=np.float32)}


def _patch_pairs(images: Sequence[np.ndarray], rng: np.random.Generator, cfg: dict) -> dict:
    return blurred_patch_pairs(images, rng, int(cfg["patch"]), int(cfg.get("patches_per_image", 32)))


def _patch_classification_loss(model, batch: dict, cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    logits = model(batch["y_a"], batch["y_b"])  # (B, 1, h', w'): every patch of a crop shares its label
    target = batch["label"].view(-1, 1, 1, 1).expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    with torch.no_grad():
        accuracy = ((logits > 0).to(target.dtype) == target).to(logits.dtype).mean()
    return {"loss": bce, "bce": bce.detach(), "accuracy": accuracy}


# --------------------------------------------------------------------------- focus sweeps with truth


def _synthetic_stacks(images: Sequence[np.ndarray], rng: np.random.Generator, cfg: dict) -> dict:
    from ray_mff.train.synthetic_stacks import PHOTONS, READ_NOISE, make_batch

    return make_batch(images, rng, int(cfg["patch"]), photons=tuple(cfg.get("photons") or PHOTONS),
                      read_noise=READ_NOISE if cfg.get("read_noise") is None else float(cfg["read_noise"]))


def _stack_truth_loss(model, batch: dict, cfg: dict) -> dict:
    from ray_mff.train.losses import stack_truth_loss

    weights, fused = model(batch["stack"])
    terms = {f"{k}_weight": v for k, v in (cfg.get("loss_weights") or {}).items()}
    return stack_truth_loss(weights, fused, batch["stack"], batch["truth"], batch["depth"], **terms)


# --------------------------------------------------------------------------- registry

OBJECTIVES: dict[str, Objective] = {
    "gradient_aware": Objective("gradient_aware", _synthetic_pairs, _gradient_aware_loss),
    "ssim_select": Objective("ssim_select", _variable_size_pairs, _ssim_select_loss),
    "ssim_multiscale": Objective("ssim_multiscale", _variable_size_pairs, _ssim_multiscale_loss),
    "patch_classification": Objective("patch_classification", _patch_pairs, _patch_classification_loss),
    "stack_truth": Objective("stack_truth", _synthetic_stacks, _stack_truth_loss,
                             loss_terms=("fused", "blend", "grad", "dice", "mse")),
}


def objective_for(model) -> Objective:
    """The objective a model (or DDP wrapper of one) trains with: its ``training_objective``."""
    raw = getattr(model, "module", model)
    name = getattr(raw, "training_objective", DEFAULT_OBJECTIVE)
    if name not in OBJECTIVES:
        raise KeyError(f"unknown training objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]
