"""StackNet: a stack-native fusion network -- one joint pass over all N images of a focus stack.

Third-generation default candidate (issue 13). Where ``cascade`` compares two images at a time
and leaves N-image stacks to decision calibration, StackNet looks at the whole stack at once and
predicts both a decision (per-image focus weights, softmax over N) and a fused image (a residual
correction of the weighted blend near focus boundaries), after the two outputs of GACN
(B. Ma et al., "End-to-end learning for simultaneously generating decision map and multi-focus
image fusion result", Neurocomputing 470, 2022). Pairs are N = 2 of the same network.

1. **Per-image encoder** (shared weights, run once per image): a full-resolution stem, two
   residual 3x3 blocks at 1/2 resolution and three dilated residual blocks at 1/4 resolution
   (dilations 1, 2, 4). Focus evidence is local contrast at the scale of the blur, so most work
   happens at reduced resolution. The 1/2-resolution features are folded into the 1/4 grid
   (``pixel_unshuffle``) so :meth:`StackNet.encode` returns one tensor per image.
2. **Joint comparison over the stack**: every joint layer sees each image's features next to
   the stack's maximum over N (a permutation-equivariant "DeepSets" layer, Zaheer et
   al., NeurIPS 2017), so the network compares each image with all the others at once, for any
   N >= 2, and swapping images swaps the outputs. Two joint stages at 1/4 resolution (with
   dilated context, dilations 4 and 8, so flat regions inherit the decision of the focused edges
   around them) and one at 1/2 resolution, each adding a correction to per-image focus logits
   upsampled by an exact factor 2; at full resolution the logit is a local linear model in the
   image itself (coefficients from the 1/2-resolution stage: the guided filter's form), so
   boundaries follow the image's edges to the pixel. Weights are the softmax of the logits over N.
3. **Fused-result branch** (once per stack): a small full-resolution network reads the weighted
   blend, the stack's disagreement under the weights (weighted variance) and the decision's
   uncertainty, and the stack's per-pixel extremes (all symmetric in the images), and predicts a
   residual r and a gate g; the correction is applied only in a band
   around focus boundaries (the max-pooled uncertainty, 1 - max_n w_n):
   ``fused = blend + sigmoid(g) * band * r``. Interiors stay a pure selection (no contrast loss);
   boundary pixels, where a blurred near object spreads over the sharp background and no source
   holds the truth, are synthesised.

Every operation is convolutional and local (no global pooling); strided layers and exact-factor
upsampling keep a tile whose origin is a multiple of :attr:`StackNet.stride` on the whole image's
grid, so tiles match the whole image away from their borders. About 12 kFLOP per input pixel
(:func:`flops_per_pixel`).

Shapes: a stack is ``(B, N, 1, H, W)`` luminance in [0, 1].

Example:
    >>> import torch
    >>> net = StackNet().eval()
    >>> w, fused = net(torch.rand(1, 3, 1, 37, 53))
    >>> w.shape, fused.shape
    (torch.Size([1, 3, 1, 37, 53]), torch.Size([1, 1, 37, 53]))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_mff.models.registry import register_model


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation)


def _up2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 with half-pixel centres: an exact factor keeps tiles on the image grid."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class ResidualBlock(nn.Module):
    """x + relu(conv3x3(x)), optionally dilated."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.conv = _conv(channels, channels, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.conv(x))


def stack_max(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C, H, W) -> (B, 1, C, H, W): the stack's maximum over N. Max, not mean, so an image
    compares with the *best* of the others and the answer does not dilute as N grows."""
    return x.amax(dim=1, keepdim=True)


def softmax_over_stack(logit: torch.Tensor, with_sum: bool = False):
    """Softmax over N of (B, N, 1, H, W), written out (max, exp, sum): ONNX Runtime runs a Softmax
    on a non-last axis through transposes, these element-wise passes are cheaper.
    ``with_sum``: also return S = sum_n exp(l_n - max_m l_m) (B, 1, 1, H, W), whose inverse is the
    largest weight (the largest exponent is exp(0) = 1): :func:`_unsure_from_sum`."""
    e = torch.exp(logit - logit.amax(dim=1, keepdim=True))
    total = e.sum(dim=1, keepdim=True)
    weights = e / total
    return (weights, total) if with_sum else weights


class JointLayer(nn.Module):
    """Permutation-equivariant layer over the stack (Zaheer et al. 2017, "Deep Sets", Eq. 4 with
    max pooling): x_n <- relu(W_self x_n + W_pool max_m x_m) then a (dilated) 3x3 residual block
    per image. (B, N, C, H, W) -> (B, N, C', H, W). ``W [x_n, max x]`` written as two 1x1
    convolutions added with broadcasting: no (N, 2C, H, W) concatenation in memory."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.mix_self = _conv(cin, cout, kernel=1)
        self.mix_pool = nn.Conv2d(cin, cout, 1, bias=False)
        self.block = ResidualBlock(cout, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        own = self.mix_self(x.flatten(0, 1)).unflatten(0, (b, -1))
        pool = self.mix_pool(stack_max(x).flatten(0, 1)).unflatten(0, (b, -1))
        y = F.relu(own + pool).flatten(0, 1)
        return self.block(y).unflatten(0, (b, -1))


@register_model("stacknet")
class StackNet(nn.Module):
    """Per-image encoder -> joint comparison over the stack -> softmax weights + fused-result branch.

    Args:
        stem: full-resolution stem channels; half: channels at 1/2 resolution (``half_out`` of
        them are kept for the joint stage); quarter: channels at 1/4 resolution; joint: width of
        the joint layers at 1/4 resolution; fine: width at 1/2 resolution; fused: width of the
        fused-result branch; band: max-pool size (at 1/2 resolution) of its boundary band.
    """

    registry_name = "stacknet"
    #: input sides must be multiples of 4 (two stride-2 layers); engines pad by edge replication
    stride = 4
    #: the training objective of :mod:`ray_mff.train.objectives`
    training_objective = "stack_truth"

    def __init__(self, stem: int = 8, half: int = 16, half_out: int = 8, quarter: int = 32, joint: int = 32,
                 fine: int = 16, fused: int = 8, band: int = 5, stem_stride: int = 1, half_blocks: int = 2,
                 dilations: tuple[int, ...] = (1, 2, 4), fused_stride: int = 1, coef_bound: float | None = None,
                 residual_bound: float | None = None, half_joint: bool = True, half_from_image: bool = False):
        super().__init__()
        if stem_stride not in (1, 2) or fused_stride not in (1, 2):
            raise ValueError(f"stem_stride and fused_stride must be 1 or 2, got {stem_stride}, {fused_stride}")
        dilations = tuple(int(d) for d in dilations)
        self._config = dict(stem=stem, half=half, half_out=half_out, quarter=quarter, joint=joint, fine=fine,
                            fused=fused, band=band)
        # the cheaper options (issue 13's speed bar) enter the config only when set, so the
        # config stored with weights trained before them stays what it was
        extra = dict(stem_stride=stem_stride, half_blocks=half_blocks, dilations=list(dilations),
                     fused_stride=fused_stride, coef_bound=coef_bound, residual_bound=residual_bound,
                     half_joint=half_joint, half_from_image=half_from_image)
        defaults = dict(stem_stride=1, half_blocks=2, dilations=[1, 2, 4], fused_stride=1, coef_bound=None,
                        residual_bound=None, half_joint=True, half_from_image=False)
        self._config.update({k: v for k, v in extra.items() if v != defaults[k]})
        self.half_out, self.band = half_out, band
        self.stem_stride, self.fused_stride = stem_stride, fused_stride
        self.coef_bound, self.residual_bound = coef_bound, residual_bound
        self.half_joint, self.half_from_image = bool(half_joint), bool(half_from_image)
        # 1. per-image encoder
        if stem_stride == 2:
            # a 4x4 stride-2 stem (a 2x2 conv on the image's 2x2 polyphase components): the encoder
            # works at 1/2 resolution from the start, no full-resolution feature map is written
            self.stem = nn.Conv2d(1, half, 4, stride=2, padding=1)
        else:
            self.stem = _conv(1, stem)
            self.down1 = _conv(stem, half, stride=2)
        self.half_blocks = nn.Sequential(*[ResidualBlock(half) for _ in range(half_blocks)])
        if not half_from_image:
            self.half_proj = _conv(half, half_out, kernel=1)
        self.down2 = _conv(half, quarter, stride=2)
        self.quarter_blocks = nn.Sequential(*[ResidualBlock(quarter, d) for d in dilations])
        # 2. joint comparison at 1/4 resolution, dilated context
        self.joint1 = JointLayer(quarter, joint, dilation=4)
        self.joint2 = JointLayer(joint, joint, dilation=8)
        self.logit4 = _conv(joint, 1, kernel=1)
        self.context4 = _conv(joint, fine, kernel=1)  # added to the 1/2-resolution input after upsampling
        # at 1/2 resolution: the image's own half-resolution features + the upsampled context
        # half_from_image: the 1/2-resolution detail is read from the image itself in the joint
        # graph (a 4x4 stride-2 conv of y), so the encoder returns 1/4-resolution features only and
        # no 1/2-resolution map is folded into them and unfolded again
        self.half_in = nn.Conv2d(1, fine, 4, stride=2, padding=1) if half_from_image else _conv(half_out, fine)
        if half_joint:
            self.joint_half = JointLayer(fine, fine, dilation=1)
        # logit correction and the coefficients (a, b) of a local linear model in the image
        self.head2 = _conv(fine, 3, kernel=1)
        # 3. fused-result branch (once per stack): [blend, weighted std, uncertainty]; 1x1 after the
        # first layer (ONNX Runtime runs few-channel 3x3 outputs at full resolution slowly).
        # fused_stride 2: the same three maps read by a 4x4 stride-2 conv and the two outputs of
        # each 2x2 block unfolded back (pixel_shuffle): a per-pixel output from 1/4 of the
        # full-resolution intermediate memory
        first = _conv(3, fused) if fused_stride == 1 else nn.Conv2d(3, fused, 4, stride=2, padding=1)
        self.fused_net = nn.Sequential(first, nn.ReLU(), _conv(fused, fused, kernel=1), nn.ReLU(),
                                       _conv(fused, 2 * fused_stride * fused_stride, kernel=1))

    def config(self) -> dict:
        """Constructor arguments (stored in the safetensors metadata by ``save_weights``)."""
        return dict(self._config)

    # -- per image -------------------------------------------------------------------------------------

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Luminances (M, 1, H, W), H and W multiples of 4 -> features (M, 4 half_out + quarter, H/4, W/4).

        Run once per image of a stack (the encoder sees one image only)."""
        if self.stem_stride == 2:
            h = self.half_blocks(F.relu(self.stem(y)))
        else:
            h = self.half_blocks(F.relu(self.down1(F.relu(self.stem(y)))))
        q = self.quarter_blocks(F.relu(self.down2(h)))
        if self.half_from_image:
            return q
        return torch.cat([F.pixel_unshuffle(F.relu(self.half_proj(h)), 2), q], dim=1)

    # -- per stack -------------------------------------------------------------------------------------

    def half_logits(self, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, N, C, H/4, W/4) features, (B, N, 1, H, W) luminances -> (B, N, 3, H/2, W/2): logit,
        a, b at 1/2 resolution."""
        b = feats.shape[0]
        if self.half_from_image:
            half, quarter = y.flatten(0, 1), feats
        else:
            half = F.pixel_shuffle(feats[:, :, :4 * self.half_out].flatten(0, 1), 2)
            quarter = feats[:, :, 4 * self.half_out:]
        z = self.joint2(self.joint1(quarter)).flatten(0, 1)
        u = F.relu(self.half_in(half) + _up2(self.context4(z)))
        if self.half_joint:
            u = self.joint_half(u.unflatten(0, (b, -1))).flatten(0, 1)
        out = self.head2(u)
        coef = out[:, 1:2]
        if self.coef_bound:
            # |a| <= coef_bound: image noise sigma moves the full-resolution logit by at most
            # coef_bound * sigma, so flat areas cannot speckle (model card: a defect of the unbounded a)
            coef = self.coef_bound * torch.tanh(coef / self.coef_bound)
        return torch.cat([out[:, :1] + _up2(self.logit4(z)), coef, out[:, 2:]], dim=1).unflatten(0, (b, -1))

    def logits(self, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image focus logits (B, N, 1, H, W) from features (B, N, C, H/4, W/4) and luminances
        (B, N, 1, H, W). Equivariant in N: permuting the images permutes the logits."""
        return self._logits(self.half_logits(feats, y), y)

    def _logits(self, half: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # full resolution: a local linear model in the image itself, logit = up(l2) + up(a) y + up(b)
        # (the guided filter's form, He et al. 2013, with coefficients predicted at 1/2 resolution as
        # in Wu et al., "Fast end-to-end trainable guided filter", CVPR 2018): boundaries follow the
        # image's edges to the pixel, at the cost of a few element-wise passes
        # up(l2) + up(b) = up(l2 + b) (bilinear upsampling is linear): two maps to upsample, not three
        b = half.shape[0]
        half = half.flatten(0, 1)
        up = _up2(torch.cat([half[:, :1] + half[:, 2:], half[:, 1:2]], dim=1))
        return (up[:, :1] + up[:, 1:] * y.flatten(0, 1)).unflatten(0, (b, -1))

    def fuse_result(self, weights: torch.Tensor, y: torch.Tensor, band: torch.Tensor,
                    unsure: torch.Tensor | None = None) -> torch.Tensor:
        """Fused luminance (B, 1, H, W): the weighted blend plus a residual gated to ``band``
        (``unsure``: :func:`_unsure` of the weights when the caller has it)."""
        blend = (weights * y).sum(dim=1)
        var = ((weights * y * y).sum(dim=1) - blend * blend).clamp_min(0.0)
        std = torch.sqrt(var + 1e-6)  # the sources' disagreement under the weights
        maps = torch.cat([blend, std, _unsure(weights) if unsure is None else unsure], dim=1)
        if self.fused_stride == 2:
            out = F.pixel_shuffle(self.fused_net(maps), 2)
        else:
            out = self.fused_net(maps)
        residual = out[:, :1]
        if self.residual_bound:
            residual = self.residual_bound * torch.tanh(residual / self.residual_bound)
        return blend + torch.sigmoid(out[:, 1:]) * band * residual

    def decide_weights(self, feats: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decision alone, without the fused-result branch: (logits, softmax weights), both
        (B, N, 1, H, W). Equal to the first two outputs of :meth:`decide_stack` at about 60 % of its
        cost (fusing with the weights alone, or calibrating chunks, needs no more)."""
        logit = self.logits(feats, y)
        return logit, softmax_over_stack(logit)

    def decide_stack(self, feats: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (B, N, C, H/4, W/4), luminances (B, N, 1, H, W)) -> (logits, weights, fused):
        logits and softmax weights (B, N, 1, H, W), fused luminance (B, 1, H, W)."""
        half = self.half_logits(feats, y)
        logit = self._logits(half, y)
        n = _stack_size(logit)
        weights, total = softmax_over_stack(logit, with_sum=True)
        # the boundary band, from the 1/2-resolution decision (4x fewer pixels to max-pool)
        unsure = _unsure_from_sum(softmax_over_stack(half[:, :, :1], with_sum=True)[1], n)
        band = _up2(F.max_pool2d(unsure, self.band, stride=1, padding=self.band // 2))
        return logit, weights, self.fuse_result(weights, y, band, _unsure_from_sum(total, n))

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack (B, N, 1, H, W), any H, W, N >= 2 -> (weights (B, N, 1, H, W), fused (B, 1, H, W)).

        Pads to multiples of :attr:`stride` by edge replication (as the engines do) and crops back.
        """
        b, n, _, h, w = y.shape
        if n < 2:
            raise ValueError(f"a stack needs N >= 2 images, got {n}")
        pad = (0, (-w) % self.stride, 0, (-h) % self.stride)
        yp = F.pad(y.flatten(0, 1), pad, mode="replicate") if any(pad) else y.flatten(0, 1)
        feats = self.encode(yp).unflatten(0, (b, -1))
        _, weights, fused = self.decide_stack(feats, yp.unflatten(0, (b, -1)))
        return weights[..., :h, :w], fused[..., :h, :w]


#: the cheap variant's architecture (issue 13's speed bar; see :class:`StackNetS`)
SMALL = dict(half=16, quarter=24, joint=16, fine=8, fused=8, band=5, stem_stride=2, half_blocks=1,
             dilations=(1, 2, 4), fused_stride=2, coef_bound=16.0, residual_bound=0.25, half_joint=False,
             half_from_image=True)


@register_model("stacknet_s")
class StackNetS(StackNet):
    """:class:`StackNet` built for speed on CPU: the stem reads the pixel-unshuffled image at 1/2
    resolution (no full-resolution feature map in the encoder), one residual block at 1/2
    resolution, narrower 1/4-resolution and joint layers, the fused-result branch at 1/2
    resolution on the unshuffled maps, and bounded full-resolution coefficient and residual
    (no speckle in flat areas). Same interfaces, any N; arguments as :class:`StackNet`."""

    registry_name = "stacknet_s"

    def __init__(self, **config):
        super().__init__(**{**SMALL, **config})
        self._config = {**SMALL, **config}
        self._config["dilations"] = list(self._config["dilations"])


def _stack_size(x: torch.Tensor) -> torch.Tensor:
    """N of (B, N, C, H, W) as a (B, 1, 1, 1, 1) tensor, from one pixel (keeps N dynamic in ONNX)."""
    # x * 0 + 1, not ones_like: the TorchScript exporter folds ones_like to the traced shape
    return (x[:, :, :1, :1, :1] * 0.0 + 1.0).sum(dim=1, keepdim=True)


def _unsure_from_sum(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """:func:`_unsure` from the softmax's sum S (max_n w_n = 1 / S) and N: no pass over the N
    weights. (B, 1, 1, H, W) -> (B, 1, H, W)."""
    return ((1.0 - 1.0 / total) / (1.0 - 1.0 / n)).squeeze(1)


def _unsure(weights: torch.Tensor) -> torch.Tensor:
    """(B, N, 1, H, W) weights -> (B, 1, H, W) in [0, 1]: 0 where one image is chosen, 1 where all
    tie. 1 - max w reaches 1 - 1/N; the mean of the weights over N is 1/N (they sum to 1), a
    tensor, so an exported graph keeps N dynamic."""
    return (1.0 - weights.amax(dim=1)) / (1.0 - weights.mean(dim=1))


def flops_per_pixel(model: nn.Module | None = None, n: int = 4, size: int = 128) -> float:
    """FLOPs per input pixel (per image of the stack) of one forward pass, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; 2 FLOPs per
    multiply-add) on an ``n``-image stack of ``size`` x ``size``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = (model or StackNet()).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, n, 1, size, size))
    return counter.get_total_flops() / (n * size * size)
