"""FocusCNN: Liu et al.'s Siamese focus classifier, run densely, giving a focus map.

After Y. Liu, X. Chen, H. Peng, Z. Wang, "Multi-focus image fusion with a deep convolutional
neural network", Information Fusion 36 (2017) 191-207:

- **patch classifier** (Sec. 3.1, Fig. 2): each branch of a Siamese network (shared weights) sees
  a 16 x 16 patch of one source through three 3 x 3 convolutions and one 2 x 2 max-pool
  (conv-conv-pool-conv); the two 8 x 8 feature maps are concatenated and two fully connected
  layers score "patch 1 is the focused one". Here the score is made antisymmetric,
  ``p(A, B) = sigmoid(h(A, B) - h(B, A)) = 1 - p(B, A)``, so pairwise decisions of a stack agree;
- **training data** (Sec. 3.2; :func:`ray_mff.train.objectives.blurred_patch_pairs`): clear patches
  of natural images and their blurred versions, Gaussian sigma 2 on a 7 x 7 window applied 1 to 5
  times, as (clear, blurred) -> 1 and (blurred, clear) -> 0;
- **dense prediction** (Sec. 3.3): the fully connected layers are convolutions (an 8 x 8 kernel
  on the pooled features, then 1 x 1), so the whole image gives a score map, one score per
  16 x 16 patch at stride 2; each pixel's focus value is the average of the scores of all patches
  covering it (a transposed convolution with a 16 x 16 box kernel divided by the patch count);
- **consistency verification** (Sec. 3.3-3.4): threshold 0.5, small-region removal
  (0.01 x H x W), guided filter (r = 8, eps = 0.1) with the initial fused image as guide. This is
  array code (:func:`ray_mff.fusion.consistency.verify_decision_map` / ``verify_index_map``) that
  the fuser applies to the network's focus map; see ``postprocess``.

Engine split: :meth:`FocusCNN.encode` is the first two convolutions at full resolution (features
aligned with the image, so the engines' shape profiles hold); :meth:`FocusCNN.decide` runs the
pool and third convolution of both branches, the classifier and the patch averaging. Inputs
are padded to even sizes (``stride = 2``) and need H, W >= 16. Smaller than the paper's network
(channels 64/128/256, FC 256) so that weights stay under 2 MB and it trains on a CPU.

Example:
    >>> import torch
    >>> net = FocusCNN().eval()
    >>> ya, yb = torch.rand(1, 1, 48, 64), torch.rand(1, 1, 48, 64)
    >>> net.decide(net.encode(ya), net.encode(yb), ya, yb).shape
    torch.Size([1, 1, 48, 64])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_mff.models.registry import register_model

PATCH = 16  # Liu et al.'s patch size; the classifier's input at 2x pooling is PATCH // 2 = 8


@register_model("cnn")
class FocusCNN(nn.Module):
    """Siamese patch classifier (conv-conv-pool-conv, FC as conv) -> dense focus map.

    Args:
        channels: the three branch convolutions' channels (paper: 64, 128, 256);
        hidden: the first fully connected layer's width (paper: 256).
    """

    registry_name = "cnn"
    output = "focus"
    training_objective = "patch_classification"
    #: the max-pool halves the resolution: engines pad inputs to even sizes
    stride = 2
    #: Liu et al.'s consistency verification, applied by the fuser to the focus map
    postprocess = {"kind": "consistency", "threshold": 0.5, "area_ratio": 0.01, "radius": 8, "eps": 0.1}

    def __init__(self, channels: tuple[int, int, int] = (24, 32, 48), hidden: int = 32):
        super().__init__()
        c1, c2, c3 = channels
        self._config = dict(channels=list(channels), hidden=hidden)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        half = PATCH // 2
        self.fc1 = nn.Conv2d(2 * c3, hidden, half)  # FC over the concatenated 8 x 8 maps, as a conv
        self.fc2 = nn.Conv2d(hidden, 1, 1)
        self.register_buffer("box", torch.ones(1, 1, PATCH, PATCH), persistent=False)

    def config(self) -> dict:
        return dict(self._config)

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Luminance (B, 1, H, W) -> full-resolution branch features (B, c2, H, W) (conv1, conv2)."""
        return F.relu(self.conv2(F.relu(self.conv1(y))))

    def branch_tail(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, c2, H, W) -> (B, c3, ceil(H/2), ceil(W/2)): the max-pool and conv3 of the branch."""
        return F.relu(self.conv3(F.max_pool2d(feats, 2, stride=2, ceil_mode=True)))

    def score_logits(self, feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
        """Encoded features of A and B -> antisymmetric patch logits (B, 1, ceil(H/2) - 7, ceil(W/2) - 7).

        Logit (i, j) scores the 16 x 16 patch with top-left pixel (2i, 2j): positive when A is sharper.
        """
        t = self.branch_tail(torch.cat([feats_a, feats_b], dim=0))  # Siamese: one batched pass
        ta, tb = t.chunk(2, dim=0)
        x = torch.cat([torch.cat([ta, tb], dim=1), torch.cat([tb, ta], dim=1)], dim=0)
        h = self.fc2(F.relu(self.fc1(x)))
        ha, hb = h.chunk(2, dim=0)
        return ha - hb

    def patch_average(self, scores: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Score map (B, 1, h', w') at stride 2 -> per-pixel mean of the covering patches' scores (B, 1, h, w)."""
        total = F.conv_transpose2d(scores, self.box, stride=2)
        count = F.conv_transpose2d(torch.ones_like(scores), self.box, stride=2)
        return (total / count)[..., :h, :w]

    def decide(self, feats_a: torch.Tensor, feats_b: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """Focus map (B, 1, H, W) in [0, 1]: the mean probability that A is the focused source
        over the 16 x 16 patches covering each pixel (before consistency verification)."""
        p = torch.sigmoid(self.score_logits(feats_a, feats_b))
        # crop to the sources' size, read from both luminances: the exported decider graph keeps all
        # four inputs of the engine protocol (an input no node reads is dropped by the exporter)
        return self.patch_average(p, y_a.shape[-2], y_b.shape[-1])

    def forward(self, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) patches/images -> patch logits (B, 1, ceil(H/2) - 7, ceil(W/2) - 7) (training)."""
        feats = self.encode(torch.cat([y_a, y_b], dim=0))
        fa, fb = feats.chunk(2, dim=0)
        return self.score_logits(fa, fb)
