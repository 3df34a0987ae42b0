"""Learned adapters that map student features onto the teacher's: 1x1 channel adapters (ft, cwd, mimic, pkd) and
the masked generative adapters of MGD.

Adapters train with the student (put their parameters in the optimizer, and create them before it), but they are
not part of the student: keep them out of EMA and out of the saved student weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.torch_utils import initialize_weights


class ChannelAdapter(nn.Module):
    """1x1 convolution (no bias) + BatchNorm (eps 1e-3, momentum 0.03) mapping (bs, c_in, h, w) to (bs, c_out, h, w).

    Args:
        c_in: student channels.
        c_out: teacher channels.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        # linear gain with fan_in keeps the feature variance through the projection
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="linear")
        initialize_weights(self)  # the same BatchNorm settings as the YOLOv5 v6.0 models it sits between

    def forward(self, x):
        return self.bn(self.conv(x))


MGD_MASK_RATIO = 0.65  # share of positions MGD hides from the generator (Yang et al.'s value for detection)


class GenerativeAdapter(nn.Module):
    """The student side of masked generative distillation, MGD (Yang et al., ECCV 2022).

    The student features are projected to the teacher's channel count (a ChannelAdapter, only where the counts
    differ); in training mode a random share ``mask_ratio`` of the positions is set to zero (one draw per image
    and position, shared by all channels); two 3x3 convolutions with a ReLU between them then have to generate the
    teacher's full feature map from what is left. The loss (``mgd`` in utils.kd.losses) compares that generated
    map with the teacher's, so the student is pushed to carry, at every position, what the teacher knows about
    its neighbourhood. In eval mode nothing is masked.

    Args:
        c_in: student channels.
        c_out: teacher channels.
        mask_ratio: probability that a position is hidden, in [0, 1).
    """

    def __init__(self, c_in: int, c_out: int, mask_ratio: float = MGD_MASK_RATIO):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {mask_ratio}: choose a share of positions in [0, 1)")
        self.mask_ratio = float(mask_ratio)
        self.align = ChannelAdapter(c_in, c_out) if c_in != c_out else nn.Identity()
        self.generate = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(c_out, c_out, 3, padding=1))

    def forward(self, x):
        x = self.align(x)
        if self.training and self.mask_ratio > 0:
            keep = torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) >= self.mask_ratio
            x = x * keep.to(x.dtype)
        return self.generate(x)


def build_adapters(s_channels, t_channels, needed: bool = True, generative: bool = False) -> nn.ModuleDict:
    """Adapters for layer pairs whose channel counts differ, keyed by pair index as a string ('0', '1', ...).

    Args:
        s_channels: student channels per pair, list[int].
        t_channels: teacher channels per pair, list[int] of the same length.
        needed: False for losses that compare across channel counts (e.g. attention transfer): nothing is built;
            or one bool per pair (only pairs marked True get an adapter).
        generative: build a GenerativeAdapter (MGD) at every needed pair, equal channel counts included.

    Returns:
        nn.ModuleDict with a ChannelAdapter only at needed pairs with different counts (equal pairs have no entry),
        or a GenerativeAdapter at every needed pair.
    """
    s_channels, t_channels = list(s_channels), list(t_channels)
    if len(s_channels) != len(t_channels):
        raise ValueError(f"{len(s_channels)} student channel counts {s_channels} vs {len(t_channels)} teacher "
                         f"counts {t_channels}; pass one count per layer pair on each side")
    wanted = [bool(needed)] * len(s_channels) if isinstance(needed, bool) else [bool(n) for n in needed]
    if len(wanted) != len(s_channels):
        raise ValueError(f"needed has {len(wanted)} flags for {len(s_channels)} layer pairs")
    adapters = nn.ModuleDict()
    for i, (c_s, c_t, want) in enumerate(zip(s_channels, t_channels, wanted)):
        if want and generative:
            adapters[str(i)] = GenerativeAdapter(c_s, c_t)
        elif want and c_s != c_t:
            adapters[str(i)] = ChannelAdapter(c_s, c_t)
    return adapters


def adapt(adapters: nn.ModuleDict, i: int, x):
    """Student features x (bs, c_s, h, w) of pair i through its adapter, or x itself when the pair has none."""
    key = str(i)
    return adapters[key](x) if key in adapters else x
