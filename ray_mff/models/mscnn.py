"""MSCNN: Siamese multi-scale feature extraction, feature fusion, multi-scale reconstruction.

After H. T. Mustafa, J. Yang, M. Zareapoor, "Multi-scale convolutional neural network for
multi-focus image fusion", Image and Vision Computing 85 (2019) 26-35: an unsupervised,
end-to-end network whose three parts are learnt together,

1. **Siamese multi-scale feature extraction** (:meth:`MSCNN.encode`, shared weights, once per
   image): two multi-scale blocks, each three parallel convolutions of kernel 3, 5 and 7
   (Inception-like, Szegedy et al. 2015) concatenated and mixed by a 1 x 1 convolution, with skip
   connections (the second block is residual, and the luminance is carried as channel 0);
2. **feature fusion**: the two feature sets are concatenated and mixed by convolutions (run for
   (A, B) and (B, A), whose selection logits are subtracted: swapping the sources swaps the
   selection exactly, and the network learns the comparison much faster than from concatenation
   alone);
3. **reconstruction at several scales**: a small encoder-decoder over the fused features
   reconstructs the fused image at 1/4, 1/2 and full resolution, each scale refining the
   upsampled coarser one (coarse-to-fine, as the paper's multi-scale restoration); every scale is
   trained with the SSIM-based loss (:func:`ray_mff.train.ssim_loss.multiscale_ssim_loss`),
   so the coarse scales settle large regions and the fine scale the details.

Each reconstruction predicts a soft selection between the sources (pooled to that scale) and a
bounded residual; the full-resolution result is the network's output, the fused luminance. No
ground truth and no post-processing.

Pooling uses ceil mode and upsampling goes to the exact size of the finer level, so any H and W
works (``stride = 1``).

Example:
    >>> import torch
    >>> net = MSCNN().eval()
    >>> fused, half, quarter = net(torch.rand(1, 1, 37, 53), torch.rand(1, 1, 37, 53))
    >>> fused.shape, half.shape, quarter.shape
    (torch.Size([1, 1, 37, 53]), torch.Size([1, 1, 19, 27]), torch.Size([1, 1, 10, 14]))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_mff.models.registry import register_model


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


def _conv(cin: int, cout: int, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)


class MultiScaleBlock(nn.Module):
    """Parallel 3x3, 5x5, 7x7 convolutions, concatenated, mixed by a 1x1: (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, branch: int, cout: int, kernels: tuple[int, ...] = (3, 5, 7)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(cin, branch, k, padding=k // 2) for k in kernels)
        self.mix = nn.Conv2d(branch * len(kernels), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.mix(torch.cat([_act(b(x)) for b in self.branches], dim=1)))


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2, stride=2, ceil_mode=True)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ScaleHead(nn.Module):
    """Reconstruction at one scale: features -> (selection logit, residual); refines the coarser logit."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        self.c1 = _conv(cin + 1, width)
        self.c2 = _conv(width, width)
        self.out = nn.Conv2d(width, 2, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, coarse_logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = _act(self.c1(torch.cat([x, coarse_logit], dim=1)))
        h = _act(self.c2(h))
        o = self.out(h)
        return coarse_logit + o[:, :1], o[:, 1:]


@register_model("mscnn")
class MSCNN(nn.Module):
    """Siamese multi-scale encoder -> concatenation fusion -> coarse-to-fine reconstruction (3 scales).

    Inputs are luminances (B, 1, H, W) in [0, 1]; any H, W. See the module docstring.

    Args:
        branch: channels of each parallel convolution; features: channels of a multi-scale block;
        fusion: channels after the fusion convolutions; widths: channels at full, 1/2 and 1/4
        resolution in the reconstruction; residual_scale: bound of each scale's residual.
    """

    registry_name = "mscnn"
    output = "fused"
    training_objective = "ssim_multiscale"
    stride = 1

    def __init__(self, branch: int = 8, features: int = 16, fusion: int = 24, widths: tuple[int, int, int] = (16, 24, 32),
                 residual_scale: float = 0.05):
        super().__init__()
        self._config = dict(branch=branch, features=features, fusion=fusion, widths=list(widths),
                            residual_scale=residual_scale)
        self.ms1 = MultiScaleBlock(1, branch, features)
        self.ms2 = MultiScaleBlock(features, branch, features)
        feats = 1 + 2 * features
        self.feature_channels = feats
        self.fuse1 = nn.Conv2d(2 * feats, fusion, 1)
        self.fuse2 = _conv(fusion, fusion)
        w0, w1, w2 = widths
        self.enc1 = _conv(fusion, w1)
        self.enc2 = _conv(w1, w2)
        self.ctx2 = nn.ModuleList(_conv(w2, w2, d) for d in (1, 2, 4))
        self.head2 = ScaleHead(w2, w2)
        self.dec1 = _conv(w1 + w2, w1)
        self.head1 = ScaleHead(w1, w1)
        self.dec0 = _conv(fusion + w1, w0)
        self.head0 = ScaleHead(w0, w0)
        # slope of the selection sigmoids (learnt, init 4): the loss asks each window to follow one
        # source, so selections should be near-hard from the start
        self.log_slope = nn.Parameter(torch.tensor(1.386294))
        self.residual_scale = residual_scale

    def config(self) -> dict:
        return dict(self._config)

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Luminance (B, 1, H, W) -> features (B, 1 + 2 * features, H, W); channel 0 is y itself."""
        m1 = self.ms1(y)
        m2 = m1 + self.ms2(m1)  # skip connection around the second multi-scale block
        return torch.cat([y, m1, m2], dim=1)

    def reconstruct(self, feats_a: torch.Tensor, feats_b: torch.Tensor, y_a: torch.Tensor,
                    y_b: torch.Tensor) -> list[torch.Tensor]:
        """Fused luminance at full, 1/2 and 1/4 resolution (full first), each (B, 1, H_s, W_s).

        Fusion and reconstruction run on (A, B) and on (B, A) in one batch; the selection logits
        are subtracted and the residuals averaged, so swapping the sources gives the same image.
        """
        pair = torch.cat([torch.cat([feats_a, feats_b], dim=1), torch.cat([feats_b, feats_a], dim=1)], dim=0)
        x0 = _act(self.fuse2(_act(self.fuse1(pair))))  # feature fusion by concatenation
        x1 = _act(self.enc1(_down(x0)))
        x2 = _act(self.enc2(_down(x1)))
        for conv in self.ctx2:
            x2 = x2 + _act(conv(x2))
        logit2, r2 = self.head2(x2, torch.zeros_like(x2[:, :1]))
        d1 = _act(self.dec1(torch.cat([x1, _up(x2, x1)], dim=1)))
        logit1, r1 = self.head1(d1, _up(logit2, x1))
        d0 = _act(self.dec0(torch.cat([x0, _up(d1, x0)], dim=1)))
        logit0, r0 = self.head0(d0, _up(logit1, x0))
        ya1, yb1 = _down(y_a), _down(y_b)
        ya2, yb2 = _down(ya1), _down(yb1)
        slope = self.log_slope.exp()
        outs = []
        for logit, r, a, b in ((logit0, r0, y_a, y_b), (logit1, r1, ya1, yb1), (logit2, r2, ya2, yb2)):
            la, lb = logit.chunk(2, dim=0)
            ra, rb = r.chunk(2, dim=0)
            g = torch.sigmoid(slope * (la - lb))
            outs.append(g * a + (1.0 - g) * b + self.residual_scale * torch.tanh(0.5 * (ra + rb)))
        return outs

    def decide(self, feats_a: torch.Tensor, feats_b: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """Engine protocol pair sub-graph: features of A and B -> fused luminance (B, 1, H, W) (see ``output``)."""
        return self.reconstruct(feats_a, feats_b, y_a, y_b)[0]

    def forward(self, y_a: torch.Tensor, y_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) luminances -> fused luminance at full, 1/2 and 1/4 resolution."""
        feats = self.encode(torch.cat([y_a, y_b], dim=0))
        fa, fb = feats.chunk(2, dim=0)
        return tuple(self.reconstruct(fa, fb, y_a, y_b))
