"""The gradient-aware loss of Ma et al. 2022 (GACN, Sec. 3.4): Dice on the decision map + (1 - Q_G).

- :func:`dice_loss` compares the decision map with the synthetic focus mask. It is computed for
  both classes (A in focus, B in focus) and averaged, so a random A/B swap of the pair leaves the
  loss unchanged and neither class dominates.
- :func:`q_g_soft` is the Xydeas-Petrovic edge-preservation metric Q^{AB/F} (Electronics Letters
  36(4), 2000) written with differentiable operations: the hard comparison of gradient strengths
  (g_A > g_F ? g_F/g_A : g_A/g_F) is blended with a steep sigmoid, |.| is smoothed. Constants are
  the survey's (Liu et al. 2020): Gamma_g=0.9994, k_g=-15, sigma_g=0.5, Gamma_a=0.9879, k_a=-22,
  sigma_a=0.8, L=1. On hard inputs it matches ``ray_mff.metrics.q_g`` closely (see tests).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_SOBEL_Y = _SOBEL_X.t().contiguous()


def dice_loss(decision: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Two-class soft Dice loss, (B, 1, H, W) decision in [0, 1] vs 0/1 mask -> scalar in [0, 1]."""
    dims = (1, 2, 3)

    def one(p, t):
        inter = (p * t).sum(dims)
        return 1.0 - (2.0 * inter + smooth) / (p.sum(dims) + t.sum(dims) + smooth)

    return 0.5 * (one(decision, mask) + one(1.0 - decision, 1.0 - mask)).mean()


def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlation with the Sobel kernels, zero padding (MATLAB filter2 'same')."""
    k = torch.stack([_SOBEL_X, _SOBEL_Y])[:, None].to(x)
    g = F.conv2d(x, k, padding=1)
    return g[:, :1], g[:, 1:]


def _strength_angle(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gy = _sobel(x)
    g = torch.sqrt(gx * gx + gy * gy + eps * eps)
    # alpha = atan(gy / gx) in (-pi/2, pi/2) as in the survey's code; gx kept away from 0 for a finite gradient
    gx_safe = torch.where(gx.abs() < eps, torch.full_like(gx, eps), gx)
    return g, torch.atan(gy / gx_safe)


def _edge_preservation(gs, as_, gf, af, slope: float, eps: float) -> torch.Tensor:
    """Q^{SF} per pixel: strength and orientation preservation through the two sigmoids."""
    s = torch.sigmoid(slope * (gs - gf))  # ~1 where g_S > g_F (the hard test of the metric)
    g_ratio = s * gf / (gs + eps) + (1.0 - s) * gs / (gf + eps)
    d = as_ - af
    a_ratio = 1.0 - torch.sqrt(d * d + 1e-6) / (math.pi / 2)
    q_g = 0.9994 / (1.0 + torch.exp(-15.0 * (g_ratio - 0.5)))
    q_a = 0.9879 / (1.0 + torch.exp(-22.0 * (a_ratio - 0.8)))
    return q_g * q_a


def q_g_soft(y_a: torch.Tensor, y_b: torch.Tensor, fused: torch.Tensor, *, slope: float = 50.0,
             eps: float = 1e-3) -> torch.Tensor:
    """Differentiable Q_G of fused (B, 1, H, W) against sources y_a, y_b (all in [0, 1]) -> (B,) in [0, 1].

    Q = sum(Q^{AF} g_A + Q^{BF} g_B) / sum(g_A + g_B)  (Xydeas & Petrovic 2000, weights w = g^L, L = 1).
    """
    ga, aa = _strength_angle(y_a, eps)
    gb, ab = _strength_angle(y_b, eps)
    gf, af = _strength_angle(fused, eps)
    qa = _edge_preservation(ga, aa, gf, af, slope, eps)
    qb = _edge_preservation(gb, ab, gf, af, slope, eps)
    dims = (1, 2, 3)
    return (qa * ga + qb * gb).sum(dims) / (ga + gb).sum(dims).clamp_min(1e-8)


def fusion_loss(decision: torch.Tensor, mask: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
                fused: torch.Tensor | None = None, *, qg_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """GACN's gradient-aware loss: ``loss = dice + qg_weight * (1 - Q_G)``; returns every term.

    Returns dict with ``loss`` (the scalar to minimise), ``dice`` and ``qg_loss`` (= 1 - mean Q_G).
    """
    if fused is None:
        fused = decision * y_a + (1.0 - decision) * y_b
    dice = dice_loss(decision, mask)
    qg_loss = 1.0 - q_g_soft(y_a, y_b, fused).mean()
    return {"loss": dice + qg_weight * qg_loss, "dice": dice, "qg_loss": qg_loss}


def _charbonnier(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt(x * x + eps * eps).mean()


def gradient_l1(fused: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean |grad fused - grad truth| over the Sobel responses, (B, 1, H, W) -> scalar: the
    supervised counterpart of Q_G's edge preservation (a missing or doubled edge costs here)."""
    fx, fy = _sobel(fused)
    tx, ty = _sobel(truth)
    return 0.125 * ((fx - tx).abs().mean() + (fy - ty).abs().mean())  # Sobel gain 8 for a unit step


def multiclass_dice_loss(weights: torch.Tensor, onehot: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice over N classes (GACN's Dice term, Ma et al. 2022 Sec. 3.4, extended from 2 to N
    sources), (B, N, H, W) weights and one-hot target -> scalar, averaged over classes present."""
    dims = (2, 3)
    inter = (weights * onehot).sum(dims)
    denom = weights.sum(dims) + onehot.sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    present = (onehot.sum(dims) > 0).to(dice.dtype)
    return (dice * present).sum() / present.sum().clamp_min(1.0)


def stack_truth_loss(weights: torch.Tensor, fused: torch.Tensor, stack: torch.Tensor, truth: torch.Tensor,
                     onehot: torch.Tensor, *, fused_weight: float = 1.0, blend_weight: float = 0.5,
                     grad_weight: float = 1.0, dice_weight: float = 0.05,
                     mse_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Supervised loss of the stack-native network on the all-in-focus truth.

    ``loss = fused_weight charb(fused - truth) + blend_weight charb(blend - truth) + grad_weight
    gradient_l1(fused, truth) + dice_weight dice(weights, onehot) + mse_weight mse(fused, truth)``:
    the fused result must equal the truth
    (Charbonnier, a smooth L1), and so should the pure selection (the softmax-weighted blend,
    before the fused-result branch), so the decision learns to pick the sharp source and the
    residual only fixes what selection cannot; the gradient term is the gradient-aware part of
    GACN's loss (Ma et al. 2022, Sec. 3.4) written against the truth instead of Q_G against the
    sources; Dice on the weights is GACN's decision term against the ideal decision map. The
    squared error (off by default) is the fidelity PSNR measures: fine-tuning the fused-result
    branch alone on the frozen decision (``--train-only fused_net --loss-weights
    fused=0,blend=0,grad=0,dice=0,mse=1``) asks it for exactly what the benchmark scores.
    weights (B, N, 1, H, W), fused / truth (B, 1, H, W), stack (B, N, 1, H, W), onehot (B, N, H, W).
    Every term is returned (``fused_psnr`` / ``blend_psnr``: PSNR of the fused result and of the
    blend, for a branch that must beat the selection it corrects).
    """
    blend = (weights * stack).sum(dim=1)
    fused_l1 = _charbonnier(fused - truth)
    blend_l1 = _charbonnier(blend - truth)
    grad = gradient_l1(fused, truth)
    dice = multiclass_dice_loss(weights[:, :, 0], onehot)
    mse = ((fused - truth) ** 2).mean()
    loss = (fused_weight * fused_l1 + blend_weight * blend_l1 + grad_weight * grad + dice_weight * dice
            + mse_weight * mse)
    return {"loss": loss, "fused_l1": fused_l1.detach(), "blend_l1": blend_l1.detach(), "grad": grad.detach(),
            "dice": dice.detach(), "mse": mse.detach(), "psnr": _psnr(fused, truth), "blend_psnr": _psnr(blend, truth)}


def _psnr(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the PSNR (dB, peak 1) of x (B, 1, H, W) clipped to [0, 1]."""
    with torch.no_grad():
        mse = ((x.clamp(0, 1) - truth) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        return (-10.0 * torch.log10(mse)).mean()
