"""YOLOv5 model: the Detect head, the YAML-driven Model and parse_model.

Usage as a script prints a summary line, e.g.::

    python models/yolo.py --cfg models/yolov5m.yaml --nc 20
"""
from __future__ import annotations

import argparse
import math
import sys
from copy import deepcopy
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from models import attention
from models.common import (C3, C3SPP, C3TR, SPP, SPPF, Bottleneck, BottleneckCSP, C3Ghost, Concat, Contract, Conv,
                           CrossConv, DWConv, Expand, Focus, GhostBottleneck, GhostConv)
from utils.general import LOGGER, make_divisible, set_logging, yaml_load
from utils.torch_utils import fuse_conv_and_bn, initialize_weights, model_info


class Detect(nn.Module):
    """Detection head: one 1x1 conv per level predicting ``na`` anchors x (xywh, obj, nc classes).

    Train mode returns the raw maps, a list of ``nl`` tensors shaped (bs, na, ny, nx, nc + 5). Eval mode returns
    ``(decoded, raw_maps)`` where decoded is (bs, sum(na * ny * nx), nc + 5) with xywh in input pixels and
    sigmoid scores; with ``decode = False`` (a distillation teacher, which only needs the raw maps) it returns
    ``(None, raw_maps)``.
    """

    stride = None  # filled in by Model after a dry forward pass
    decode = True  # eval mode: build the decoded boxes (set False on an instance to skip that work)

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        self.anchor_grid = [torch.zeros(1)] * self.nl
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))  # (nl, na, 2)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.inplace = inplace

    def forward(self, x):
        decoded = []
        for i in range(self.nl):
            x[i] = self._head(i, x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training and self.decode:
                if self.grid[i].shape[2:4] != x[i].shape[2:4] or self.grid[i].device != x[i].device:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                decoded.append(self._decode(x[i], i).view(bs, -1, self.no))
        if self.training:
            return x
        return (torch.cat(decoded, 1) if decoded else None), x

    def _head(self, i, x):
        """Level i's 1x1 prediction conv, outside autocast: under mixed precision it runs in its weights' dtype
        (float32 for a training model), so box, objectness and class logits keep float32 resolution where the
        losses read them. A model cast to fp16/bf16 outright (a KD teacher) stays in that dtype."""
        conv = self.m[i]
        if not _autocast_on(x.device.type):
            return conv(x)
        with torch.autocast(x.device.type, enabled=False):
            return conv(x.to(conv.weight.dtype))

    def _decode(self, raw, i):
        """Sigmoid scores and pixel-space xywh for level i; raw is (bs, na, ny, nx, no).

        Computed in float32 whatever raw's dtype: under bf16 autocast the raw maps are bf16, whose 8-bit mantissa
        would round pixel coordinates above 256 to whole pixels or worse."""
        y = raw.float().sigmoid()
        xy = (y[..., 0:2] * 2 - 0.5 + self.grid[i]) * self.stride[i]
        wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
        return torch.cat((xy, wh, y[..., 4:]), -1)

    def _make_grid(self, nx, ny, i):
        """Cell offsets (1, na, ny, nx, 2) and anchor sizes in pixels (1, na, ny, nx, 2) for level i."""
        d, t = self.anchors.device, self.anchors.dtype
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t),
                                indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2)
        anchor_grid = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).expand(1, self.na, ny, nx, 2)
        return grid, anchor_grid


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


# Names usable in model YAMLs. An explicit table instead of eval(): a YAML can only name these.
MODULES = {
    "Conv": Conv, "DWConv": DWConv, "GhostConv": GhostConv, "Bottleneck": Bottleneck,
    "GhostBottleneck": GhostBottleneck, "CrossConv": CrossConv, "BottleneckCSP": BottleneckCSP, "C3": C3,
    "C3TR": C3TR, "C3SPP": C3SPP, "C3Ghost": C3Ghost, "SPP": SPP, "SPPF": SPPF, "Focus": Focus,
    "Concat": Concat, "Contract": Contract, "Expand": Expand, "Detect": Detect,
    "nn.Upsample": nn.Upsample, "nn.BatchNorm2d": nn.BatchNorm2d, "nn.Identity": nn.Identity,
    "nn.MaxPool2d": nn.MaxPool2d, "nn.ZeroPad2d": nn.ZeroPad2d,
    "SELayer": attention.SELayer, "ASCBAM": attention.ASCBAM, "CBAM": attention.ASCBAM,
    "CABlock": attention.CABlock, "Conv1_1": attention.Conv1_1,
}
CONV_LIKE = (Conv, DWConv, GhostConv, Bottleneck, GhostBottleneck, CrossConv, BottleneckCSP, C3, C3TR, C3SPP,
             C3Ghost, SPP, SPPF, Focus)  # YAML: [c2, *rest] -> (c1, scaled c2, *rest)
REPEATED_INSIDE = (BottleneckCSP, C3, C3TR, C3Ghost)  # depth multiple goes into their 'n' argument
ATTENTION = (attention.SELayer, attention.ASCBAM, attention.CABlock)
ARG_WORDS = {"None": None, "True": True, "False": False}


def _resolve_module(name):
    if name not in MODULES:
        raise ValueError(f"unknown module '{name}' in model YAML; valid names: {', '.join(sorted(MODULES))}")
    return MODULES[name]


def _layer_args(m, args, f, n, ch, nc, no, gw):
    """Constructor arguments and output channels of one YAML row. Returns (args, c2, n)."""
    if m in CONV_LIKE:
        c1, c2 = ch[f], args[0]
        if c2 != no:
            c2 = make_divisible(c2 * gw, 8)
        args = [c1, c2, *args[1:]]
        if m in REPEATED_INSIDE:
            args.insert(2, n)
            n = 1
        return args, c2, n
    if m in ATTENTION:  # YAML: [oup, ratio, need11=False, reverse=False]
        c1 = ch[f]
        oup = make_divisible(args[0] * gw, 8)
        need11 = bool(args[2]) if len(args) > 2 else False
        return [c1, oup, *args[1:]], (oup if need11 else c1), n
    if m is attention.Conv1_1:  # YAML: [oup]
        c2 = make_divisible(args[0] * gw, 8)
        return [ch[f], c2, *args[1:]], c2, n
    if m is nn.BatchNorm2d:
        return [ch[f]], ch[f], n
    if m is Contract:  # YAML: [gain]
        return args, ch[f] * args[0] ** 2, n
    if m is Expand:
        return args, ch[f] // args[0] ** 2, n
    if m is Concat:
        return args, sum(ch[x] for x in f), n
    if m is Detect:
        args = [*args, [ch[x] for x in f]]
        if isinstance(args[1], int):  # anchors given as a count: placeholder sizes, AutoAnchor fixes them
            args[1] = [list(range(args[1] * 2))] * len(f)
        return args, no, n
    return args, ch[f], n


def parse_model(d, ch):
    """Build (nn.Sequential, save_list) from a model dict; ch is [input_channels]."""
    anchors, nc, gd, gw = d["anchors"], d["nc"], d["depth_multiple"], d["width_multiple"]
    na = len(anchors[0]) // 2 if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    words = {**ARG_WORDS, "nc": nc, "anchors": anchors}
    layers, save, ch = [], [], list(ch)
    LOGGER.debug(f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    for i, (f, n, name, args) in enumerate(d["backbone"] + d["head"]):
        m = _resolve_module(name)
        args = [words.get(a, a) if isinstance(a, str) else a for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        args, c2, n = _layer_args(m, args, f, n, ch, nc, no, gw)
        block = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        block.i, block.f, block.type = i, f, f"{m.__module__}.{m.__name__}"
        block.np = sum(p.numel() for p in block.parameters())
        LOGGER.debug(f"{i:>3}{str(f):>18}{n:>3}{block.np:10.0f}  {block.type:<40}{str(args):<30}")
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(block)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


class Model(nn.Module):
    """A YOLOv5 detector described by a model YAML (path or dict)."""

    def __init__(self, cfg="yolov5s.yaml", ch=3, nc=None, anchors=None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = deepcopy(cfg)
        else:
            self.yaml_file = Path(cfg).name
            self.yaml = yaml_load(_find_cfg(cfg))
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            LOGGER.info(f"Overriding model.yaml anchors with anchors={anchors}")
            self.yaml["anchors"] = anchors if isinstance(anchors, list) else round(anchors)
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch])
        self.nc = self.yaml["nc"]
        self.names = [str(i) for i in range(self.nc)]
        self.inplace = self.yaml.get("inplace", True)
        initialize_weights(self)  # v6.0's BatchNorm eps/momentum and in-place activations
        self._build_strides(ch)

    def _build_strides(self, ch):
        m = self.model[-1]
        if not isinstance(m, Detect):
            return
        # any multiple of the largest stride works (P6: 64, P7: 128); two images because the train-mode
        # BatchNorm of a P7 model's 1x1 stride-128 map needs more than one value per channel
        probe = 128
        m.inplace = self.inplace
        with torch.no_grad():
            outs = self.forward(torch.zeros(2, ch, probe, probe))
        m.stride = torch.tensor([probe / x.shape[-2] for x in outs])
        check_anchor_order(m)
        m.anchors /= m.stride.view(-1, 1, 1)  # anchors live in grid units from here on
        self.stride = m.stride
        self._initialize_biases()

    def forward(self, x, augment=False, profile=False, visualize=False):
        """Run the network, or with ``augment`` (eval mode only) YOLOv5 v6.0's test-time augmentation, which
        returns ``(decoded, None)``. ``profile`` and ``visualize`` exist for YOLOv5 API compatibility and are
        unused (detect.py --visualize records layer outputs with hooks instead)."""
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x)

    def _forward_once(self, x):
        outputs = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    def _forward_augment(self, x):
        """Test-time augmentation: the images at scales TTA_SCALES with flips TTA_FLIPS, predictions mapped
        back to x's pixel frame and pooled for one NMS pass.

        The full-size pass drops its coarsest level (the largest objects, which the downscaled passes see at a
        more comfortable size) and the smallest pass its finest level (objects the full-size pass sees better).

        Args:
            x: images (bs, 3, h, w), h and w multiples of the largest stride.

        Returns:
            (decoded (bs, n, nc + 5) with xywh in x's pixels, None).
        """
        if self.training:
            raise ValueError("augment=True is for inference; call model.eval() first")
        size, gs = x.shape[-2:], int(self.stride.max())
        preds, level_sizes = [], []
        for scale, flip in zip(TTA_SCALES, TTA_FLIPS):
            decoded, raw = self._forward_once(scale_img(x.flip(flip) if flip else x, scale, gs))
            preds.append(_descale_pred(decoded, flip, scale, size))
            level_sizes.append([r.shape[1:4].numel() for r in raw])  # boxes per level: na * ny * nx
        if len(level_sizes[0]) > 1:
            preds[0] = preds[0][:, :-level_sizes[0][-1]]
            preds[-1] = preds[-1][:, level_sizes[-1][0]:]
        return torch.cat(preds, 1), None

    def _initialize_biases(self):
        """Priors: about 8 objects per 640x640 image at each level, and classes equally likely (0.6 total)."""
        m = self.model[-1]
        with torch.no_grad():
            for conv, s in zip(m.m, m.stride):
                b = conv.bias.view(m.na, -1)  # (na, no)
                b[:, 4] += math.log(8 / (640 / float(s)) ** 2)
                b[:, 5:] += math.log(0.6 / (m.nc - 0.99))

    @torch.no_grad()
    def fuse(self):
        """Fold every Conv's BatchNorm into its convolution (inference only); returns self."""
        for m in self.model.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self

    def info(self, imgsz=640, verbose=False):
        return model_info(self, imgsz=imgsz, verbose=verbose, name=Path(getattr(self, "yaml_file", "") or "model").stem)

    def _apply(self, fn, *args, **kwargs):
        """Also move/cast Detect's stride, a plain attribute, not a buffer; drop its grid caches.

        The grids are 5-D caches rebuilt on the next eval forward; passing them through fn would fail for
        ``.to(memory_format=torch.channels_last)``, which only takes 4-D tensors.
        """
        self = super()._apply(fn, *args, **kwargs)
        m = self.model[-1]
        if isinstance(m, Detect):
            m.stride = fn(m.stride)
            m.grid = [torch.zeros(1, device=m.anchors.device)] * m.nl
            m.anchor_grid = [torch.zeros(1, device=m.anchors.device)] * m.nl
            self.stride = m.stride
        return self


DetectionModel = Model  # name used by YOLOv5 v7.0 checkpoints


TTA_SCALES = (1, 0.83, 0.67)  # YOLOv5 v6.0's test-time augmentation: image scales ...
TTA_FLIPS = (None, 3, None)  # ... and flips (3: the width axis, a left-right mirror)


def scale_img(img, ratio: float, gs: int = 32):
    """Resize images (bs, c, h, w) by ratio (bilinear), then pad right and bottom with 0.447 (a mid grey, the
    ImageNet mean) up to multiples of gs. Returns img itself for ratio 1."""
    if ratio == 1:
        return img
    h, w = img.shape[2:]
    new_h, new_w = int(h * ratio), int(w * ratio)
    img = nn.functional.interpolate(img, size=(new_h, new_w), mode="bilinear", align_corners=False)
    pad_h, pad_w = math.ceil(h * ratio / gs) * gs - new_h, math.ceil(w * ratio / gs) * gs - new_w
    return nn.functional.pad(img, [0, pad_w, 0, pad_h], value=0.447)


def check_augment(model) -> bool:
    """Whether model can run test-time augmentation (a single YAML-built Model); warns once when it cannot
    (an Ensemble or an exported backend), so the caller runs without it."""
    if isinstance(model, Model):
        return True
    LOGGER.warning(f"WARNING: --augment needs a single PyTorch checkpoint, not a {type(model).__name__}; "
                   f"running without test-time augmentation")
    return False


def _descale_pred(p, flip, scale: float, size):
    """Map decoded predictions (bs, n, no) of a scaled (and flipped) image back to the original (h, w) frame:
    divide xywh by scale, then mirror x (flip 3) or y (flip 2)."""
    xy, wh, rest = p[..., 0:2] / scale, p[..., 2:4] / scale, p[..., 4:]
    if flip == 3:
        xy = torch.stack((size[1] - xy[..., 0], xy[..., 1]), -1)
    elif flip == 2:
        xy = torch.stack((xy[..., 0], size[0] - xy[..., 1]), -1)
    return torch.cat((xy, wh, rest), -1)


def check_anchor_order(m: Detect) -> None:
    """Reverse the anchor order when it runs against the stride order (small anchors belong to small strides)."""
    area = m.anchors.prod(-1).mean(-1).view(-1)  # mean anchor area per level
    da, ds = area[-1] - area[0], m.stride[-1] - m.stride[0]
    if da and ds and (da.sign() != ds.sign()):
        LOGGER.info("AutoAnchor: reversing anchor order to match strides")
        m.anchors[:] = m.anchors.flip(0)


def _find_cfg(cfg) -> Path:
    """A model YAML by path, or by bare name inside models/ or models/hub/."""
    p = Path(cfg)
    if p.exists():
        return p
    here = Path(__file__).resolve().parent
    for candidate in (here / p.name, here / "hub" / p.name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"model config '{cfg}' not found; pass a path or a name from models/ or models/hub/")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build a YOLOv5 model from its YAML and print a summary")
    parser.add_argument("--cfg", type=str, default="yolov5s.yaml", help="model.yaml")
    parser.add_argument("--nc", type=int, default=None, help="override the YAML's class count")
    parser.add_argument("--imgsz", type=int, default=640, help="image size for the forward pass and GFLOPs")
    opt = parser.parse_args(argv)
    model = Model(opt.cfg, nc=opt.nc).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, opt.imgsz, opt.imgsz))
    line = model.info(imgsz=opt.imgsz)
    print(line)
    return line


if __name__ == "__main__":
    set_logging()
    main()
