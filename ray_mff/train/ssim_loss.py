"""SSIM losses for training fusion networks without ground truth (no all-in-focus target).

The fused image F is compared with the two *sources* window by window, and a per-window rule says
which source (or which mix) F must resemble:

- :func:`std_selected_ssim_loss` (Yan, Gilani, Qin, Mian, "Structural similarity loss for
  learning to fuse multi-focus images", Sensors 20(22) 6647, 2020, Sec. 3.2): the local standard
  deviation is the focus cue; in each window the source with the larger standard deviation is the
  one F must be structurally similar to, ``loss = mean_w 1 - SSIM(S_w*, F_w)`` with
  ``S* = A if sigma_A(w) >= sigma_B(w) else B``. ``mode="weight"`` replaces the hard choice by the
  weight ``sigma_A^p / (sigma_A^p + sigma_B^p)``.

  Ties: where the two standard deviations are within ``tie`` (relative) of each other the std
  carries no focus information (flat or noise-only windows: the choice would follow the noise),
  and the window instead asks F to resemble *either* source, ``max(SSIM(A, F), SSIM(B, F))``,
  the rule Yang et al.'s Q_Y applies to windows where the sources differ. Without it the
  network settles on a 50/50 blend there (the loss is indifferent between the random choices),
  which averages the two sources' noise and lowers F's similarity to both: in a 220-step run
  Lytro Q_Y was 0.948 with soft selections vs 0.969 with the same selections made hard.
- :func:`multiscale_ssim_loss` (for Mustafa, Yang, Zareapoor, "Multi-scale convolutional neural
  network for multi-focus image fusion", Image and Vision Computing 85, 2019): the same loss
  applied to the reconstruction at every scale, each scale against the sources average-pooled to
  it. (The soft ``"weight"`` form lets the optimum blend a sharp and a defocused window, which
  costs edge strength: in a 160-step CPU run it left mscnn at Q_G 0.69 on five Lytro pairs; the
  hard choice, with mscnn's antisymmetric selection, reached 0.75, so the objective uses ``"select"``.)

SSIM is Wang et al. 2004 (Eq. 13) with a 7 x 7 Gaussian window (sigma 1.5, the window of
Yang's Q_Y in :mod:`ray_mff.metrics`), C1 = (0.01)^2, C2 = (0.03)^2 for images in [0, 1], 'valid'
windows only (no padding artefacts at the border of training crops).

Example:
    >>> import torch
    >>> a = torch.rand(2, 1, 32, 32)
    >>> b = torch.nn.functional.avg_pool2d(a, 5, stride=1, padding=2)  # a defocused copy
    >>> round(float(std_selected_ssim_loss(a, b, a)["loss"]), 4), float(std_selected_ssim_loss(a, b, b)["loss"]) > 0.5
    (0.0, True)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

C1 = 0.01 ** 2
C2 = 0.03 ** 2


def gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Normalised (1, 1, size, size) Gaussian window."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, window.to(x), padding=0)


def local_moments(x: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and variance over the window, (B, 1, H, W) -> two (B, 1, H-k+1, W-k+1)."""
    mu = _filter(x, window)
    var = (_filter(x * x, window) - mu * mu).clamp_min(0.0)
    return mu, var


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, moments_x=None) -> torch.Tensor:
    """Wang et al. 2004 SSIM per window, (B, 1, H, W) pair -> (B, 1, H-k+1, W-k+1)."""
    mu_x, var_x = moments_x if moments_x is not None else local_moments(x, window)
    mu_y, var_y = local_moments(y, window)
    cov = _filter(x * y, window) - mu_x * mu_y
    return ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x * mu_x + mu_y * mu_y + C1) * (var_x + var_y + C2))


def std_selected_ssim_loss(y_a: torch.Tensor, y_b: torch.Tensor, fused: torch.Tensor, *, mode: str = "select",
                           power: float = 2.0, tie: float = 0.1,
                           window: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Yan et al. 2020's loss: 1 - SSIM of F with the source whose window has the larger std.

    y_a, y_b, fused: (B, 1, H, W) in [0, 1], H, W >= 7.
    mode: ``"select"`` (the paper: hard choice per window) or ``"weight"`` (soft choice with
          weight ``sigma_A^power / (sigma_A^power + sigma_B^power)``; power 2 is Q_Y's lambda).
    tie:  windows with ``|sigma_A - sigma_B| <= tie * max(sigma_A, sigma_B)`` use
          ``max(SSIM(A, F), SSIM(B, F))`` (see the module docstring); 0 disables.
    Returns ``loss`` (scalar to minimise), ``ssim_a`` and ``ssim_b`` (mean SSIM of F with each
    source, for the log) and ``chosen_a`` (fraction of windows where A was chosen / A's mean weight).
    """
    window = gaussian_window() if window is None else window
    mom_a, mom_b = local_moments(y_a, window), local_moments(y_b, window)
    s_a = ssim_map(y_a, fused, window, mom_a)
    s_b = ssim_map(y_b, fused, window, mom_b)
    sd_a, sd_b = mom_a[1].sqrt(), mom_b[1].sqrt()
    if mode == "select":
        lam = (sd_a >= sd_b).to(fused.dtype)  # a per-window choice, not differentiated through
    elif mode == "weight":
        pa, pb = sd_a.pow(power), sd_b.pow(power)
        lam = (pa / (pa + pb + 1e-12)).detach()
    else:
        raise ValueError(f"mode must be 'select' or 'weight', got {mode!r}")
    target = lam * s_a + (1.0 - lam) * s_b
    out = {}
    if tie > 0:
        tied = ((sd_a - sd_b).abs() <= tie * torch.maximum(sd_a, sd_b)).to(fused.dtype)
        target = (1.0 - tied) * target + tied * torch.maximum(s_a, s_b)
        out["tied"] = tied.mean().detach()
    return {"loss": 1.0 - target.mean(), "ssim_a": s_a.mean().detach(), "ssim_b": s_b.mean().detach(),
            "chosen_a": lam.mean().detach(), **out}


def multiscale_ssim_loss(y_a: torch.Tensor, y_b: torch.Tensor, fused_scales: Sequence[torch.Tensor], *,
                         weights: Sequence[float] | None = None, mode: str = "select",
                         power: float = 2.0, tie: float = 0.1) -> dict[str, torch.Tensor]:
    """Sum over scales of :func:`std_selected_ssim_loss`, each F_s against the sources pooled to F_s's size.

    fused_scales: full resolution first, then coarser reconstructions (B, 1, H_s, W_s).
    weights: per-scale weights (default 1, 0.5, 0.25, ...), normalised to sum to 1.
    Returns ``loss`` plus ``loss_s<k>`` per scale and ``ssim_a``/``ssim_b`` at full resolution.
    """
    weights = list(weights) if weights is not None else [0.5 ** k for k in range(len(fused_scales))]
    total_w = float(sum(weights[: len(fused_scales)]))
    out: dict[str, torch.Tensor] = {}
    loss = 0.0
    for k, f in enumerate(fused_scales):
        if f.shape[-2:] != y_a.shape[-2:]:
            a = F.adaptive_avg_pool2d(y_a, f.shape[-2:])
            b = F.adaptive_avg_pool2d(y_b, f.shape[-2:])
        else:
            a, b = y_a, y_b
        terms = std_selected_ssim_loss(a, b, f, mode=mode, power=power, tie=tie)
        loss = loss + weights[k] / total_w * terms["loss"]
        out[f"loss_s{k}"] = terms["loss"].detach()
        if k == 0:
            out["ssim_a"], out["ssim_b"] = terms["ssim_a"], terms["ssim_b"]
    out["loss"] = loss
    return out
