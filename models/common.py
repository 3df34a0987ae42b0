"""Building blocks of the YOLOv5 v6.0 network.

Class and attribute names (``Conv.conv/.bn/.act``, ``C3.cv1/.cv2/.cv3/.m`` ...) are checkpoint keys and the names
that pickled official checkpoints refer to, so they must not change.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def autopad(k, p=None):
    """Padding that keeps the spatial size for odd kernels ('same' padding) unless p is given."""
    if p is not None:
        return p
    return k // 2 if isinstance(k, int) else [x // 2 for x in k]


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            self.act = nn.SiLU()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        """Forward after fuse(): BatchNorm has been folded into self.conv."""
        return self.act(self.conv(x))


class DWConv(Conv):
    """Depth-wise convolution: groups = gcd(c1, c2)."""

    def __init__(self, c1, c2, k=1, s=1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), act=act)


class GhostConv(nn.Module):
    """Ghost convolution (GhostNet): a Conv makes half the output channels, a cheap 5x5 depth-wise Conv derives the
    other half from them. Output channels: 2 * (c2 // 2)."""

    def __init__(self, c1, c2, k=1, s=1, g=1, act=True):
        super().__init__()
        half = c2 // 2
        self.cv1 = Conv(c1, half, k, s, None, g, act)
        self.cv2 = Conv(half, half, 5, 1, None, half, act)

    def forward(self, x):  # (b, c1, h, w) -> (b, c2, h / s, w / s)
        primary = self.cv1(x)
        return torch.cat((primary, self.cv2(primary)), 1)


class GhostBottleneck(nn.Module):
    """Residual block of two GhostConvs; with s=2 a depth-wise conv between them halves the resolution and the
    shortcut becomes a strided depth-wise conv plus a 1x1 Conv so that the shapes still match."""

    def __init__(self, c1, c2, k=3, s=1):
        super().__init__()
        half = c2 // 2
        strided = s == 2
        self.conv = nn.Sequential(GhostConv(c1, half, 1, 1),
                                  DWConv(half, half, k, s, act=False) if strided else nn.Identity(),
                                  GhostConv(half, c2, 1, 1, act=False))  # linear output: the sum is not activated
        if strided:
            self.shortcut = nn.Sequential(DWConv(c1, c1, k, s, act=False), Conv(c1, c2, 1, 1, act=False))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return self.conv(x) + self.shortcut(x)


class CrossConv(nn.Module):
    """A k x k convolution split into a 1 x k and a k x 1 Conv, with an optional residual connection."""

    def __init__(self, c1, c2, k=3, s=1, g=1, e=1.0, shortcut=False):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, (1, k), (1, s))
        self.cv2 = Conv(hidden, c2, (k, 1), (s, 1), g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class Bottleneck(nn.Module):
    """1x1 then 3x3 conv, with a residual connection when requested and the shapes allow it."""

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class BottleneckCSP(nn.Module):
    """CSP bottleneck of YOLOv5 v1-v3 (kept so that old YAMLs and checkpoints still build)."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = nn.Conv2d(c1, hidden, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(hidden, hidden, 1, 1, bias=False)
        self.cv4 = Conv(2 * hidden, c2, 1, 1)
        self.bn = nn.BatchNorm2d(2 * hidden)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        main = self.cv3(self.m(self.cv1(x)))
        side = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((main, side), 1))))


class C3(nn.Module):
    """CSP block with three convolutions: cv3(cat(m(cv1(x)), cv2(x)))."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3TR(C3):
    """C3 whose inner bottlenecks are replaced by a TransformerBlock of n layers with 4 attention heads."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        hidden = int(c2 * e)
        self.m = TransformerBlock(hidden, hidden, 4, n)


class C3SPP(C3):
    """C3 with an SPP block (max-pool kernels k) in place of the bottlenecks."""

    def __init__(self, c1, c2, k=(5, 9, 13), n=1, shortcut=True, g=1, e=0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        hidden = int(c2 * e)
        self.m = SPP(hidden, hidden, k)


class C3Ghost(C3):
    """C3 built from n GhostBottlenecks (always residual: their shapes match)."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        hidden = int(c2 * e)
        self.m = nn.Sequential(*(GhostBottleneck(hidden, hidden) for _ in range(n)))


class TransformerLayer(nn.Module):
    """Transformer encoder layer without LayerNorm: residual multi-head self-attention, then a residual two-layer
    linear block (no activation between fc1 and fc2, as in YOLOv5).

    Input and output are sequence-first, (tokens, batch, c).
    """

    def __init__(self, c, num_heads):
        super().__init__()
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.ma = nn.MultiheadAttention(embed_dim=c, num_heads=num_heads)
        self.fc1 = nn.Linear(c, c, bias=False)
        self.fc2 = nn.Linear(c, c, bias=False)

    def forward(self, x):  # (L, b, c) -> (L, b, c)
        x = self.ma(self.q(x), self.k(x), self.v(x), need_weights=False)[0] + x
        return self.fc2(self.fc1(x)) + x


class TransformerBlock(nn.Module):
    """Vision transformer block over the pixels of a feature map: an optional 1x1 Conv to c2 channels, a learned
    linear position embedding added to every token, then num_layers TransformerLayers."""

    def __init__(self, c1, c2, num_heads, num_layers):
        super().__init__()
        self.conv = Conv(c1, c2) if c1 != c2 else None
        self.linear = nn.Linear(c2, c2)
        self.tr = nn.Sequential(*(TransformerLayer(c2, num_heads) for _ in range(num_layers)))
        self.c2 = c2

    def forward(self, x):  # (b, c1, h, w) -> (b, c2, h, w)
        if self.conv is not None:
            x = self.conv(x)
        b, _, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (h * w, b, c2), row-major pixel order
        tokens = self.tr(tokens + self.linear(tokens))
        return tokens.permute(1, 2, 0).reshape(b, self.c2, h, w)


class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools of several kernel sizes."""

    def __init__(self, c1, c2, k=(5, 9, 13)):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=size, stride=1, padding=size // 2) for size in k)

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [pool(x) for pool in self.m], 1))


class SPPF(nn.Module):
    """Fast SPP: three chained k x k max-pools, equivalent to SPP with kernels (k, 2k-1, 3k-2)."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        p1 = self.m(x)
        p2 = self.m(p1)
        return self.cv2(torch.cat((x, p1, p2, self.m(p2)), 1))


class Focus(nn.Module):
    """Space-to-depth (each 2x2 pixel block becomes 4 channels) followed by a Conv; the v5.0 stem."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act)

    def forward(self, x):  # (b, c, h, w) -> (b, 4c, h/2, w/2)
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension ``d``."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Contract(nn.Module):
    """Space-to-depth by gain: (b, c, h, w) -> (b, c * gain**2, h / gain, w / gain); Expand undoes it."""

    def __init__(self, gain=2):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        b, c, h, w = x.shape
        s = self.gain
        x = x.view(b, c, h // s, s, w // s, s)  # split rows and columns into (cell, offset) pairs
        x = x.permute(0, 3, 5, 1, 2, 4).contiguous()  # (b, row offset, column offset, c, h / s, w / s)
        return x.view(b, c * s * s, h // s, w // s)


class Expand(nn.Module):
    """Depth-to-space by gain: (b, c, h, w) -> (b, c / gain**2, h * gain, w * gain), the inverse of Contract."""

    def __init__(self, gain=2):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        b, c, h, w = x.shape
        s = self.gain
        x = x.view(b, s, s, c // s ** 2, h, w)  # (b, row offset, column offset, c / s^2, h, w)
        x = x.permute(0, 3, 4, 1, 5, 2).contiguous()  # (b, c / s^2, h, row offset, w, column offset)
        return x.view(b, c // s ** 2, h * s, w * s)
