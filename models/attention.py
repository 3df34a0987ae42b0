"""Attention blocks usable from model YAMLs: SE, CBAM (channel + spatial), coordinate attention, 1x1 adapters.

Every attention block takes ``(inp, oup, ratio_or_reduction, need11=False, reverse=False)``:

* ``need11=False``: attend over the ``inp`` input channels and return them unchanged in number (``oup`` is
  ignored, and no 1x1 convolution is built);
* ``need11=True, reverse=False``: map ``inp -> oup`` with a 1x1 conv first, then attend over ``oup`` channels;
* ``need11=True, reverse=True``: attend over ``inp`` channels first, then map ``inp -> oup`` with a 1x1 conv.

Every block is built with YOLOv5 v6.0's BatchNorm settings (eps 1e-3, momentum 0.03) and in-place activations,
also when it is used outside a model (``utils.torch_utils.initialize_weights``).

The 1x1 channel map exists only when it is used, so every parameter of a block receives a gradient on every step
(DistributedDataParallel fails on parameters that never do).

In a model YAML the row arguments are ``[oup, ratio, need11, reverse]``; parse_model scales ``oup`` with the
width multiple and passes the input channel count in front, see ``models.yolo._layer_args``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.common import Conv
from utils.general import LOGGER
from utils.torch_utils import initialize_weights


class Conv1_1(Conv):
    """1x1 channel adapter: Conv2d 1x1 (no bias) -> BatchNorm2d -> SiLU, mapping (bs, c1, h, w) -> (bs, c2, h, w).

    A subclass of ``Conv`` so that ``Model.fuse()`` folds its BatchNorm like any other Conv.

    Args:
        c1: input channels.
        c2: output channels.
        act: True for SiLU, an ``nn.Module`` to use instead, or anything else for no activation.
    """

    def __init__(self, c1, c2, act=True):
        super().__init__(c1, c2, 1, 1, act=act)
        initialize_weights(self)


def softmax_pool(x: torch.Tensor, temperature: torch.Tensor, dims) -> torch.Tensor:
    """Pool ``x`` over ``dims`` with weights softmax(temperature * x) taken over those dims.

    temperature = 0 gives the plain mean; a large temperature approaches the maximum, so a learned temperature lets
    the network choose anything between average and max pooling.

    Args:
        x: (bs, c, h, w) features.
        temperature: a tensor broadcastable against x (a scalar, or (1, c, 1, 1) for one value per channel).
        dims: int or tuple of dims to pool over.

    Returns:
        x pooled over ``dims`` with those dims kept as size 1.
    """
    logits = x * temperature
    # softmax over several dims at once; subtracting the (constant) max only guards exp() against overflow
    weights = (logits - logits.amax(dims, keepdim=True).detach()).exp()
    weights = weights / weights.sum(dims, keepdim=True)
    return (x * weights).sum(dims, keepdim=True)


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al., ECCV 2018): x * sigmoid(MLP(avg_pool(x)) + MLP(second_pool(x))).

    The shared MLP is two 1x1 convs ``c -> c // ratio -> c`` with ReLU between.

    AS variant (``as_variant=True``), "adaptive softmax pooling": the hand-crafted global max pool is replaced by
    ``softmax_pool`` with a learned temperature per channel (initialised to 1), which can move between average
    pooling (temperature 0) and max pooling (large temperature) channel by channel. The yolov5-kd repository that
    introduced the name never spelled out "AS"; its AS branch replaced max pooling by global pooling of an extra
    3x3 convolution, which costs about 9 * c^2 parameters per block and, once globally averaged, is close to a
    linear map of the average descriptor that the other branch already sees. This variant keeps the idea (a learned
    descriptor instead of max pooling) at the cost of c parameters.

    Args:
        channels: c, input and output channels.
        ratio: reduction ratio of the MLP's hidden layer (at least one hidden channel is kept).
        as_variant: use adaptive softmax pooling instead of max pooling for the second descriptor.
    """

    def __init__(self, channels, ratio=16, as_variant=False):
        super().__init__()
        hidden = max(channels // ratio, 1)
        self.as_variant = as_variant
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(),
                                 nn.Conv2d(hidden, channels, 1, bias=False))
        if as_variant:
            self.temperature = nn.Parameter(torch.ones(1, channels, 1, 1))
        initialize_weights(self)

    def forward(self, x):
        """(bs, c, h, w) -> (bs, c, h, w), each channel scaled by a weight in (0, 1)."""
        avg = x.mean((2, 3), keepdim=True)  # (bs, c, 1, 1)
        if self.as_variant:
            second = softmax_pool(x, self.temperature, (2, 3))
        else:
            second = x.amax((2, 3), keepdim=True)
        return x * torch.sigmoid(self.mlp(avg) + self.mlp(second))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: x * sigmoid(conv_kxk([mean_c(x), second_c(x)])), one weight per pixel.

    AS variant (``as_variant=True``): the max over channels is replaced by ``softmax_pool`` over channels with a
    single learned temperature (initialised to 1), i.e. a learned position between channel-mean and channel-max.
    See ``ChannelAttention`` for what "AS" meant in the original repository and why this variant differs.

    Args:
        kernel_size: odd size of the convolution over the two pooled maps (7 in the paper).
        as_variant: use adaptive softmax pooling instead of max pooling over channels.
    """

    def __init__(self, kernel_size=7, as_variant=False):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SpatialAttention kernel_size must be odd to keep the map size, got {kernel_size}")
        self.as_variant = as_variant
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        if as_variant:
            self.temperature = nn.Parameter(torch.ones(1))
        initialize_weights(self)

    def forward(self, x):
        """(bs, c, h, w) -> (bs, c, h, w), each pixel scaled by a weight in (0, 1) shared by all channels."""
        avg = x.mean(1, keepdim=True)  # (bs, 1, h, w)
        second = softmax_pool(x, self.temperature, 1) if self.as_variant else x.amax(1, keepdim=True)
        return x * torch.sigmoid(self.conv(torch.cat((avg, second), 1)))


class _AttentionBlock(nn.Module):
    """Wraps an attention core with the optional 1x1 channel map described in the module docstring.

    Subclasses call ``_setup`` and implement ``attend(x)``; ``self.channels`` is the number of channels the
    attention sees, ``self.cv`` the 1x1 map (None when need11 is False), ``self.c2`` the output channels.
    """

    def _setup(self, inp, oup, need11, reverse):
        name = type(self).__name__
        if need11 and oup is None:
            raise ValueError(f"{name}: need11=True needs an output channel count, got oup=None")
        if not need11 and oup is not None and oup != inp:
            LOGGER.warning(f"WARNING: {name}: oup={oup} is ignored because need11=False; the block keeps the "
                           f"{inp} input channels. Set need11=True to map {inp}->{oup} with a 1x1 conv.")
        self.need11, self.reverse = bool(need11), bool(reverse)
        self.cv = Conv1_1(inp, oup) if self.need11 else None
        self.channels = oup if self.need11 and not self.reverse else inp
        self.c2 = oup if self.need11 else inp
        return self.channels

    def attend(self, x):
        raise NotImplementedError

    def forward(self, x):
        """(bs, inp, h, w) -> (bs, oup if need11 else inp, h, w)."""
        if self.cv is None:
            return self.attend(x)
        if self.reverse:
            return self.cv(self.attend(x))
        return self.attend(self.cv(x))


class SELayer(_AttentionBlock):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): channel weights from an MLP over global average pooling.

    Args:
        inp: input channels.
        oup: output channels when need11 is True (ignored otherwise).
        ratio: reduction ratio of the MLP's hidden layer (at least one hidden channel is kept).
        need11: add a 1x1 conv mapping inp -> oup.
        reverse: with need11, attend first and map afterwards (default: map first).
    """

    def __init__(self, inp, oup=None, ratio=16, need11=False, reverse=False):
        super().__init__()
        c = self._setup(inp, oup, need11, reverse)
        hidden = max(c // ratio, 1)
        self.fc = nn.Sequential(nn.Linear(c, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, c, bias=False))
        initialize_weights(self)

    def attend(self, x):
        weights = torch.sigmoid(self.fc(x.mean((2, 3))))  # (bs, c)
        return x * weights[:, :, None, None]


class ASCBAM(_AttentionBlock):
    """CBAM (Woo et al., ECCV 2018): channel attention, then spatial attention.

    ``as_variant`` selects the "AS" (adaptive softmax pooling) variant of both parts, see ``ChannelAttention``.
    It defaults to False, which is plain CBAM, as the original repository's ASCBAM built it; the YAML name
    ``CBAM`` is an alias. A YAML row can still ask for the AS variant with a fifth argument:
    ``[oup, ratio, need11, reverse, as_variant]``.

    Args:
        inp: input channels.
        oup: output channels when need11 is True (ignored otherwise).
        ratio: reduction ratio of the channel attention MLP.
        need11: add a 1x1 conv mapping inp -> oup.
        reverse: with need11, attend first and map afterwards (default: map first).
        as_variant: use the AS variant of channel and spatial attention.
        kernel_size: kernel of the spatial attention convolution.
    """

    def __init__(self, inp, oup=None, ratio=16, need11=False, reverse=False, as_variant=False, kernel_size=7):
        super().__init__()
        c = self._setup(inp, oup, need11, reverse)
        self.ca = ChannelAttention(c, ratio, as_variant)
        self.sa = SpatialAttention(kernel_size, as_variant)
        initialize_weights(self)

    def attend(self, x):
        return self.sa(self.ca(x))


class CABlock(_AttentionBlock):
    """Coordinate attention (Hou et al., CVPR 2021): direction-aware weights a_h(c, y) * a_w(c, x).

    The input is average-pooled along each spatial axis, the two strips share a 1x1 conv + BatchNorm + hard-swish
    bottleneck of ``max(8, c // reduction)`` channels, then separate 1x1 convs and sigmoids give one weight per
    (channel, row) and per (channel, column).

    Args:
        inp: input channels.
        oup: output channels when need11 is True (ignored otherwise).
        reduction: channel reduction of the shared bottleneck (32 in the paper).
        need11: add a 1x1 conv mapping inp -> oup.
        reverse: with need11, attend first and map afterwards (default: map first).
    """

    def __init__(self, inp, oup=None, reduction=32, need11=False, reverse=False):
        super().__init__()
        c = self._setup(inp, oup, need11, reverse)
        mip = max(8, c // reduction)
        self.conv1 = nn.Conv2d(c, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mip, c, 1)
        self.conv_w = nn.Conv2d(mip, c, 1)
        initialize_weights(self)

    def attend(self, x):
        h, w = x.shape[2:]
        x_h = x.mean(3, keepdim=True)  # (bs, c, h, 1)
        x_w = x.mean(2, keepdim=True).transpose(2, 3)  # (bs, c, w, 1)
        y = self.act(self.bn1(self.conv1(torch.cat((x_h, x_w), 2))))  # (bs, mip, h + w, 1)
        y_h, y_w = y.split((h, w), 2)
        a_h = torch.sigmoid(self.conv_h(y_h))  # (bs, c, h, 1)
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))  # (bs, c, 1, w)
        return x * a_h * a_w
