"""CascadeNet: end-to-end decision-map network for multi-focus image fusion.

After B. Ma, Y. Zhu, X. Yin, X. Ban, H. Huang, M. Mukeshimana, "SESF-Fuse" and its successor
B. Ma, X. Yin, D. Wu, H. Shen, X. Ban, Y. Wang, "End-to-end learning for simultaneously
generating decision map and multi-focus image fusion result", Neurocomputing 470 (2022),
arXiv 2010.08751 (GACN). A compact version sized to train on a CPU in minutes:

1. **Siamese feature extractor** (shared weights): a stem convolution and a small dense block
   (Huang et al. 2017) whose output is recalibrated by squeeze-and-excitation channel attention
   (Hu et al. 2018) pooled over local windows rather than the whole image (so the network is
   local: a tile of a large image gets the same result as the whole image), on the luminance
   (B, 1, H, W).
2. **Activity comparison**: per-channel spatial frequency of the features over a local window
   (GACN Sec. 3.2, SF = mean of squared row/column differences), compared between the two sources
   as a normalised difference and made near-binary by a steep sigmoid with a learnt slope.
   Step 1 and the activity depend on one image: together they are :meth:`CascadeNet.encode`,
   run once per image; everything after is :meth:`CascadeNet.decide`, run once per pair. The
   activity, a 7x7 local mean, is kept at half resolution, so the per-pair path up to the
   boundary filter runs on a quarter of the pixels.
3. **Decision head**, light on purpose (GACN's balance: the encoder runs once per image and
   carries the weight, the head runs once per pair, so decision calibration of an N-image stack
   saves almost half the work of serial fusion). A thin path at the activities' resolution plus a
   context branch at a quarter of it of dilated convolutions (flat, texture-less regions take the
   decision of the focused edges around them), then CBAM spatial attention (Woo et al. 2018) and a
   1x1 logit. The head is an odd function of the centred comparison, so the decision is exactly
   antisymmetric, D(A, B) = 1 - D(B, A), in one pass (pairwise decisions of a stack agree).
4. **Boundary-aware guided filter** (GACN Sec. 3.3; He et al. 2013, Alg. 1 with box filters):
   the near-binary map is guided-filtered with the initial fused luminance as guide, and the
   filtered value replaces the raw one only in a band around focus boundaries, so interiors stay
   hard (no contrast loss) and boundaries follow image edges (no seams or halos).
5. fused = D * A + (1 - D) * B  (GACN Eq. 1), applied to every colour channel by the fuser.

Every operation is convolutional with "same" padding; :meth:`CascadeNet.encode` and
:meth:`CascadeNet.decide` take sides that are multiples of ``stride = 16`` (the engines pad by edge
replication and crop back, as :meth:`CascadeNet.forward` does), so any H and W works.

Example:
    >>> import torch
    >>> net = CascadeNet().eval()
    >>> ya, yb = torch.rand(1, 1, 37, 53), torch.rand(1, 1, 37, 53)
    >>> d, f = net(ya, yb)
    >>> d.shape, f.shape
    (torch.Size([1, 1, 37, 53]), torch.Size([1, 1, 37, 53]))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_mff.models.registry import register_model


def box_filter(x: torch.Tensor, radius: int, stride: int = 1) -> torch.Tensor:
    """Mean over a (2r+1)^2 window centred on every ``stride``-th pixel, (B, C, H, W) ->
    (B, C, ceil(H/s), ceil(W/s)); borders average the valid pixels only.

    Separable (a row pass, then a column pass): 2 (2r+1) adds per pixel instead of (2r+1)^2. It is
    exact at the borders too, because the valid part of a window is a rectangle, so the mean over
    it is the mean over its valid rows of the means over its valid columns.
    """
    if radius <= 0:
        return x
    k = 2 * radius + 1
    x = F.avg_pool2d(x, (1, k), stride=(1, stride), padding=(0, radius), count_include_pad=False)
    return F.avg_pool2d(x, (k, 1), stride=(stride, 1), padding=(radius, 0), count_include_pad=False)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Differentiable grey guided filter (He et al. 2013, Alg. 1), (B, 1, H, W) guide and source.

    The four window means of step 1 are one box filter over four stacked channels, and the two of
    step 4 one over two: the same arithmetic in fewer, larger operations (cheaper per call).
    """
    means = box_filter(torch.cat([guide, src, guide * guide, guide * src], dim=1), radius)
    mean_i, mean_p, corr_i, corr_ip = means.chunk(4, dim=1)
    var_i = (corr_i - mean_i * mean_i).clamp_min(0.0)
    cov_ip = corr_ip - mean_i * mean_p
    a = cov_ip / (var_i + eps)  # Alg. 1 step 3
    b = mean_p - a * mean_i
    mean_a, mean_b = box_filter(torch.cat([a, b], dim=1), radius).chunk(2, dim=1)
    return mean_a * guide + mean_b  # steps 4-5


def spatial_frequency(feats: torch.Tensor, radius: int, stride: int = 1) -> torch.Tensor:
    """Per-channel local spatial frequency (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s)) (GACN Sec. 3.2;
    Eskicioglu 1995).

    RF^2 + CF^2 with replicate-padded first differences, averaged over a (2r+1)^2 window centred
    on every ``stride``-th pixel (separable, borders average the valid pixels only).
    """
    dx = feats - F.pad(feats, (1, 0, 0, 0), mode="replicate")[..., :, :-1]
    dy = feats - F.pad(feats, (0, 0, 1, 0), mode="replicate")[..., :-1, :]
    return box_filter(dx * dx + dy * dy, radius, stride)


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear upsampling by an exact integer ``factor`` (half-pixel centres).

    Inputs are multiples of :attr:`CascadeNet.stride`, so every pooled grid divides evenly and an
    exact factor restores the size. An upsample *to a size* would stretch the grid across an input
    off the pooling grid, and a crop of an image would put a coarse cell at other pixels than the
    whole image does; with exact factors the mapping is a pure translation, so a tile whose origin
    is a multiple of the stride sees exactly the values of the whole image (:mod:`ray_mff.tiling`).
    """
    return F.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=False)


class LocalSqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018) over a local window: x * sigmoid(W2 relu(W1 mean_win(x))).

    Squeeze-and-excitation pools each channel over the *whole* input, so the result of a pixel
    depends on every other pixel of the image, and a tile of a large image (:mod:`ray_mff.tiling`)
    gets other weights than the whole image: measured, up to 2.4 grey levels tiled vs untiled.
    Here the squeeze is a mean over ``cell`` x ``cell`` cells, smoothed over 3 x 3 cells (a
    ~3 ``cell`` px window), the excitation runs on that coarse grid and its weights are
    upsampled bilinearly: the same channel recalibration by local image content, with a bounded
    receptive field (~2.5 ``cell`` px), at 1/``cell``^2 of the cost of a full-resolution MLP.
    """

    def __init__(self, channels: int, reduction: int = 4, cell: int = 16):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.cell = cell
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.avg_pool2d(x, self.cell, stride=self.cell, ceil_mode=True, count_include_pad=False)
        s = F.avg_pool2d(s, 3, stride=1, padding=1, count_include_pad=False)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * upsample(w, self.cell)


class DenseBlock(nn.Module):
    """Dense block (Huang et al. 2017): each 3x3 conv sees the concatenation of all earlier outputs."""

    def __init__(self, channels: int, growth: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels + i * growth, growth, 3, padding=1) for i in range(layers))
        self.out_channels = channels + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(F.leaky_relu(conv(torch.cat(feats, dim=1)), 0.1))
        return torch.cat(feats, dim=1)


class OddSpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al. 2018) with an even gate: x * sigmoid(conv7x7([mean_c|x|, max_c|x|])).

    The gate sees only |x|, so it is the same for x and -x, and the block stays odd: f(-x) = -f(x).
    """

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.abs()
        s = torch.cat([a.mean(dim=1, keepdim=True), a.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(s))


def _odd_conv(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Conv2d:
    """A bias-free convolution with zero padding: linear, hence odd."""
    return nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False)


class DecisionHead(nn.Module):
    """(B, C, H, W) comparison x in [-1, 1] -> (B, 1, H, W) decision logit, an odd function of x.

    Swapping the two sources negates x (x = 2c - 1 and c(B, A) = 1 - c(A, B)), so an odd head gives
    logit(B, A) = -logit(A, B) exactly: D(A, B) = 1 - D(B, A) in a single pass. It is odd because
    it is built only from bias-free convolutions, average pooling, bilinear upsampling, tanh and an
    attention gate that depends on |x|.

    The head is deliberately light (GACN's balance: the Siamese encoder carries the weight, it runs
    once per image; this runs once per pair). A thin path at the input's resolution keeps
    boundaries precise; a context path at a quarter of it, of dilated residual convolutions, sees
    about 4 x 2 x sum(dilations) input pixels (x 2 in image pixels for ``cascade``'s half-resolution
    activities), so the interior of a flat region inherits the decision of the focused edges
    around it.
    """

    def __init__(self, channels: int, width: int, context_width: int, context_dilations: tuple[int, ...]):
        super().__init__()
        self.inp = _odd_conv(channels, width, kernel=1)
        self.local = _odd_conv(width, width)
        self.down = _odd_conv(width, context_width, kernel=1)
        self.context = nn.ModuleList(_odd_conv(context_width, context_width, dilation=d) for d in context_dilations)
        # merge = W [p; up(g)] = W_p p + up(W_g g): the context half is applied before upsampling
        self.merge_local = _odd_conv(width, width, kernel=1)
        self.merge_context = _odd_conv(context_width, width, kernel=1)
        self.attention = OddSpatialAttention()
        self.out = _odd_conv(width, 1, kernel=1)
        # the tanh layers bound the features by 1, so the logit gets a learnt gain (init 8) to reach
        # near-binary decisions (|logit| ~ 5-10) without first growing every output weight
        self.log_gain = nn.Parameter(torch.tensor(2.0794415))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.inp(x)
        p = p + torch.tanh(self.local(torch.tanh(p)))
        g = self.down(F.avg_pool2d(p, 4, stride=4, ceil_mode=True, count_include_pad=False))
        for conv in self.context:
            g = g + torch.tanh(conv(g))
        g = upsample(self.merge_context(g), 4)
        m = torch.tanh(self.merge_local(p) + g)
        return self.log_gain.exp() * self.out(self.attention(m))


@register_model("cascade")
class CascadeNet(nn.Module):
    """Siamese dense/SE encoder -> spatial-frequency comparison -> decision head -> boundary-aware GF.

    Inputs are luminances (B, 1, H, W) in [0, 1]; any H, W. See the module docstring.

    Args:
        stem: stem channels; growth, layers: dense block growth rate and depth;
        features: channels of the encoded features (``encode`` output);
        width: decision head width (at the activities' half resolution); context_width,
        context_dilations: width and dilations of its context branch (a quarter of that resolution);
        sf_radius: spatial-frequency window radius; gf_radius, gf_eps: guided filter window and
        regulariser; band_radius: half-width of the boundary band where the guided filter applies.
    """

    registry_name = "cascade"
    #: encode/decide take H, W that are multiples of 16 (the channel attention's cell; the context
    #: branch's grid is 8): engines pad the luminance by edge replication and crop the decision back,
    #: and :meth:`forward` does the same, so any H, W works from the outside
    stride = 16
    #: ``encode`` returns activities at 1/2 resolution, (B, C, ceil(H/2), ceil(W/2))
    feature_downsample = 2

    def __init__(self, stem: int = 24, growth: int = 16, layers: int = 4, features: int = 16, width: int = 16,
                 context_width: int = 32, context_dilations: tuple[int, ...] = (1, 2, 4), sf_radius: int = 3,
                 gf_radius: int = 4, gf_eps: float = 1e-3, band_radius: int = 4, se_cell: int = 16):
        super().__init__()
        self._config = dict(stem=stem, growth=growth, layers=layers, features=features, width=width,
                            context_width=context_width, context_dilations=list(context_dilations), sf_radius=sf_radius,
                            gf_radius=gf_radius, gf_eps=gf_eps, band_radius=band_radius, se_cell=se_cell)
        self.stem = nn.Conv2d(1, stem, 3, padding=1)
        self.dense = DenseBlock(stem, growth, layers)
        self.se = LocalSqueezeExcitation(self.dense.out_channels, cell=se_cell)
        self.project = nn.Conv2d(self.dense.out_channels, features, 1)
        # slope of the steep sigmoid that turns the SF comparison near-binary (learnt, init 10)
        self.log_slope = nn.Parameter(torch.tensor(2.302585))
        self.head = DecisionHead(features, width, context_width, tuple(context_dilations))
        self.sf_radius, self.gf_radius, self.gf_eps, self.band_radius = sf_radius, gf_radius, gf_eps, band_radius

    def config(self) -> dict:
        """Constructor arguments (stored in the safetensors metadata by ``save_weights``)."""
        return dict(self._config)

    def features(self, y: torch.Tensor) -> torch.Tensor:
        """Siamese branch: luminance (B, 1, H, W) in [0, 1] -> learnt features (B, C, H, W)."""
        x = F.leaky_relu(self.stem(y), 0.1)
        x = self.se(self.dense(x))
        return self.project(x)

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Luminance (B, 1, H, W) in [0, 1] -> per-channel activity (B, C, ceil(H/2), ceil(W/2)).

        Run once per image. The activity (local spatial frequency of each feature channel over a
        7x7 window) depends on one image only, so it is computed here rather than in
        :meth:`decide`: a stack of N images pays it N times, not 2 (N - 1) times. Being a 7x7 mean
        it carries no detail finer than about 4 px, so it is sampled at every second pixel: the
        whole per-pair path up to the boundary filter then runs on a quarter of the pixels.
        """
        return spatial_frequency(self.features(y), self.sf_radius, stride=self.feature_downsample)

    def decision_logits(self, act_a: torch.Tensor, act_b: torch.Tensor) -> torch.Tensor:
        """Raw (pre-sigmoid, pre-filter) decision logit (B, 1, H, W) from two activities; > 0 where A is sharper."""
        # normalised difference in [-1, 1]: scale-free; 0 (undecided) where both are flat
        diff = (act_a - act_b) / (act_a + act_b + 1e-4)
        # steep sigmoid, centred: 2 sigmoid(k diff) - 1 = tanh(k diff / 2), odd in diff
        x = torch.tanh(0.5 * self.log_slope.exp() * diff)
        return self.head(x)  # odd head: logit(B, A) = -logit(A, B)

    def refine(self, d0: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """Boundary-aware guided filter (GACN Sec. 3.3): soften D only in a band around its boundaries."""
        guide = d0 * y_a + (1.0 - d0) * y_b  # initial fused luminance
        filtered = guided_filter(guide, d0, self.gf_radius, self.gf_eps).clamp(0.0, 1.0)
        m = box_filter(d0, self.band_radius)
        band = (4.0 * m * (1.0 - m)).clamp(0.0, 1.0)  # 1 where the window straddles a boundary, 0 inside
        return band * filtered + (1.0 - band) * d0

    def decide(self, feats_a: torch.Tensor, feats_b: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
        """Decision map D (B, 1, H, W) in [0, 1]: probability that source A is in focus.

        feats_a, feats_b: :meth:`encode` outputs (B, C, H/2, W/2); y_a, y_b: luminances (B, 1, H, W).
        The half-resolution logit is upsampled before the boundary filter, which runs at full
        resolution with the image as guide, so boundaries follow image edges to the pixel.
        """
        logit = upsample(self.decision_logits(feats_a, feats_b), self.feature_downsample)
        return self.refine(torch.sigmoid(logit), y_a, y_b)

    def forward(self, y_a: torch.Tensor, y_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) luminances, any H, W -> (D, fused luminance), both (B, 1, H, W).

        Pads to multiples of :attr:`stride` by edge replication (as the engines do) and crops back.
        """
        h, w = y_a.shape[-2:]
        pad = (0, (-w) % self.stride, 0, (-h) % self.stride)
        ya, yb = (F.pad(y, pad, mode="replicate") if any(pad) else y for y in (y_a, y_b))
        feats = self.encode(torch.cat([ya, yb], dim=0))  # Siamese: one pass, shared weights
        fa, fb = feats.chunk(2, dim=0)
        d = self.decide(fa, fb, ya, yb)[..., :h, :w]
        return d, d * y_a + (1.0 - d) * y_b
