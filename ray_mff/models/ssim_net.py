"""SSIMFuseNet: an end-to-end network that predicts the fused luminance, trained with an SSIM loss.

After X. Yan, S. Z. Gilani, H. Qin, A. Mian, "Structural similarity loss for learning to fuse
multi-focus images", Sensors 20(22) 6647 (2020): a feed-forward, fully convolutional network maps
the source pair straight to the all-in-focus image, and is trained *without* ground truth by an
SSIM loss in which the local standard deviation of each source decides, window by window, which
source the fused window must resemble (:func:`ray_mff.train.ssim_loss.std_selected_ssim_loss`;
where the two stds tie, F must resemble either source, as in Yang's Q_Y). No decision map leaves
the network and there is no post-processing. Colour images: the fuser transfers the fused
luminance to colour (:mod:`ray_mff.fusion.luminance_transfer`); stacks of N > 2 fuse serially.

A compact version sized to train on a CPU in minutes:

1. **Siamese feature extractor** (:meth:`SSIMFuseNet.encode`, shared weights, once per image):
   three 3 x 3 convolutions (the third dilated) with dense connections; the features keep the
   luminance itself as channel 0, so the network can reproduce source pixels exactly.
2. **Feature fusion**: a comparison head looks at both feature sets (and their difference) and
   gives a per-pixel soft selection g in [0, 1]; it is evaluated on (A, B) and (B, A) and the two
   logits subtracted, so swapping the sources swaps the selection. The fused features are
   ``g * feats_A + (1 - g) * feats_B``.
3. **Reconstruction**: the luminance channel of the fused features plus a bounded residual
   predicted from the fused features by three convolutions (initialised to zero, so training
   starts from a pure selection and the residual learns what selection cannot do, e.g. halos).

Fully convolutional with "same" padding: any H and W (``stride = 1``).

Example:
    >>> import torch
    >>> net = SSIMFuseNet().eval()
    >>> fused = net(torch.rand(1, 1, 37, 53), torch.rand(1, 1, 37, 53))
    >>> fused.shape
    torch.Size([1, 1, 37, 53])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_mff.models.registry import register_model


def _conv(cin: int, cout: int, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


@register_model("ssim")
class SSIMFuseNet(nn.Module):
    """Siamese encoder -> soft feature fusion -> residual reconstruction of the fused luminance.

    Inputs are luminances (B, 1, H, W) in [0, 1]; any H, W. See the module docstring.

    Args:
        width: channels of each encoder convolution (the features have 1 + 3 * width channels);
        head: width of the comparison head; head_dilations: its dilated 3 x 3 layers (receptive field);
        recon: width of the reconstruction convolutions; residual_scale: bound of the residual.
    """

    registry_name = "ssim"
    #: what ``decide`` returns: the fused luminance itself (not a decision map)
    output = "fused"
    #: training objective in :mod:`ray_mff.train.objectives`
    training_objective = "ssim_select"
    stride = 1

    def __init__(self, width: int = 16, head: int = 16, head_dilations: tuple[int, ...] = (1, 2, 4, 8),
                 recon: int = 16, residual_scale: float = 0.05):
        super().__init__()
        self._config = dict(width=width, head=head, head_dilations=list(head_dilations), recon=recon,
                            residual_scale=residual_scale)
        self.c1 = _conv(1, width)
        self.c2 = _conv(1 + width, width)
        self.c3 = _conv(1 + 2 * width, width, dilation=2)
        feats = 1 + 3 * width
        self.feature_channels = feats
        # comparison head on [f_a, f_b, f_a - f_b]
        self.h_in = nn.Conv2d(3 * feats, head, 1)
        self.h_convs = nn.ModuleList(_conv(head, head, d) for d in head_dilations)
        self.h_out = nn.Conv2d(head, 1, 3, padding=1)
        # slope of the selection sigmoid (learnt, init 4): a window's fused structure should come from
        # one source (the loss picks one per window), so the selection is pushed towards hard early on
        self.log_slope = nn.Parameter(torch.tensor(1.386294))
        # reconstruction on [fused feats, g]
        self.r1 = _conv(feats + 1, recon)
        self.r2 = _conv(recon, recon)
        self.r3 = _conv(recon, 1)
        nn.init.zeros_(self.r3.weight)
        nn.init.zeros_(self.r3.bias)
        self.residual_scale = residual_scale

    def config(self) -> dict:
        return dict(self._config)

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Luminance (B, 1, H, W) -> features (B, 1 + 3 * width, H, W); channel 0 is y itself."""
        x1 = _act(self.c1(y))
        x2 = _act(self.c2(torch.cat([y, x1], dim=1)))
        x3 = _act(self.c3(torch.cat([y, x1, x2], dim=1)))
        return torch.cat([y, x1, x2, x3], dim=1)

    def _head(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        x = _act(self.h_in(torch.cat([fa, fb, fa - fb], dim=1)))
        for conv in self.h_convs:
            x = x + _act(conv(x))
        return self.h_out(x)

    def selection(self, feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
        """Soft selection g (B, 1, H, W): how much of A the fused features take; g(A, B) = 1 - g(B, A)."""
        # one batched pass over (A, B) and (B, A)
        h = self._head(torch.cat([feats_a, feats_b], dim=0), torch.cat([feats_b, feats_a], dim=0))
        ha, hb = h.chunk(2, dim=0)
        return torch.sigmoid(self.log_slope.exp() * (ha - hb))

    def decide(self, feats_a: torch.Tensor, feats_b: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """Features (B, C, H, W) of A and B -> fused luminance (B, 1, H, W).

        (``decide`` is the engine protocol's name for the pair sub-graph; for this model it
        returns the fused image, see ``output``.)
        """
        g = self.selection(feats_a, feats_b)
        fused = g * feats_a + (1.0 - g) * feats_b
        r = _act(self.r1(torch.cat([fused, g], dim=1)))
        r = _act(self.r2(r))
        residual = self.residual_scale * torch.tanh(self.r3(r))
        # the selected luminance (channel 0 of the fused features, written with the graph inputs)
        return g * y_a + (1.0 - g) * y_b + residual

    def forward(self, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) luminances -> fused luminance (B, 1, H, W)."""
        feats = self.encode(torch.cat([y_a, y_b], dim=0))
        fa, fb = feats.chunk(2, dim=0)
        return self.decide(fa, fb, y_a, y_b)
