"""Automatic teacher/student layer pairing read off the model structure (no hard-coded layer indices).

Backbone layers pair by stride (the last backbone layer at strides 4, 8, 16 and 32, plus 64 and 128 in P6/P7 models:
with attention blocks inserted after C3 blocks this picks the attention output), neck layers pair by detection level
(the layers feeding Detect: 3 for P5 models, 4 for P6, 5 for P7). Strides are measured by a small probe forward, not
assumed.
"""
from __future__ import annotations

from typing import NamedTuple

import math

import torch
import torch.nn as nn

from utils.kd.recorder import FeatureRecorder
from utils.torch_utils import de_parallel

BACKBONE_STRIDES = (4, 8, 16, 32, 64, 128)  # those a model has; 64 and 128 only exist in P6/P7 backbones
MIN_PROBE = 64  # default probe size in pixels, raised to the largest stride of a P7 model
GROUPS = ("backbone", "neck")


class LayerPair(NamedTuple):
    """One distillation pair; unpacks as (s_name, t_name, s_channels, t_channels, stride)."""

    s_name: str
    t_name: str
    s_channels: int
    t_channels: int
    stride: int


def _check_model(model):
    model = de_parallel(model)
    if not hasattr(model, "yaml") or not isinstance(getattr(model, "model", None), nn.Sequential):
        raise TypeError(f"expected a models.yolo.Model (with .yaml and .model), got {type(model).__name__}; "
                        f"pass explicit layer names for other architectures")
    return model


def _max_stride(model) -> int:
    return int(getattr(de_parallel(model), "stride", torch.tensor([32])).max())


def default_probe_size(*models) -> int:
    """The smallest probe size (pixels) that is a multiple of every model's largest stride, at least MIN_PROBE."""
    size = MIN_PROBE
    for model in models:
        size = math.lcm(size, _max_stride(model))
    return size


def probe_shapes(model: nn.Module, names, imgsz: int = 64) -> dict:
    """Output shapes of the named layers for one zero image of imgsz x imgsz pixels.

    Runs in eval mode under torch.no_grad and restores every submodule's training flag afterwards.

    Args:
        model: a model (DP/DDP unwrapped); input channels from model.yaml['ch'] when present, else 3.
        names: named_modules() names whose outputs are (1, c, h, w) feature maps.
        imgsz: probe size; must be a multiple of the model's largest stride.

    Returns:
        {name: (1, c, h, w)} as tuples of ints, in the order of names.
    """
    model = de_parallel(model)
    stride = _max_stride(model)
    if imgsz % stride:
        raise ValueError(f"probe imgsz={imgsz} must be a multiple of the largest stride {stride}")
    param = next(model.parameters())
    ch = getattr(model, "yaml", {}).get("ch", 3)
    x = torch.zeros(1, ch, imgsz, imgsz, device=param.device, dtype=param.dtype)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), FeatureRecorder(model, names, detach=True) as rec:
            model(x)
    finally:
        for m, flag in flags:
            m.training = flag
    shapes = {}
    for name, out in zip(rec.names, rec.get()):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError(f"layer '{name}' does not output a (bs, c, h, w) feature map; pick another layer")
        shapes[name] = tuple(out.shape)
    return shapes


def _backbone_by_stride(model, imgsz):
    """{stride: name of the highest-index backbone layer with that output stride}, strides in BACKBONE_STRIDES."""
    names = [f"model.{i}" for i in range(len(model.yaml["backbone"]))]
    by_stride = {}
    for name, shape in probe_shapes(model, names, imgsz).items():  # ascending index: later layers overwrite
        stride = imgsz // shape[2]
        if stride in BACKBONE_STRIDES and shape[2] * stride == imgsz:
            by_stride[stride] = name
    return dict(sorted(by_stride.items()))


def _neck_names(model):
    detect = model.model[-1]
    sources = [detect.f] if isinstance(detect.f, int) else list(detect.f)
    return [f"model.{j if j >= 0 else detect.i + j}" for j in sources]


def kd_layer_names(model: nn.Module, imgsz: int | None = None) -> dict:
    """Distillation layers of a models.yolo.Model.

    Args:
        model: the model (DP/DDP unwrapped).
        imgsz: probe size; None: default_probe_size(model).

    Returns:
        {'backbone': names of the last backbone layer at each of BACKBONE_STRIDES the model has (ascending),
         'neck': names of the layers feeding Detect, in detection-level order}.
    """
    model = _check_model(model)
    imgsz = imgsz or default_probe_size(model)
    return {"backbone": list(_backbone_by_stride(model, imgsz).values()), "neck": _neck_names(model)}


def _auto_names(student, teacher, groups, imgsz):
    """Automatically paired (student names, teacher names) for the chosen groups."""
    s_names, t_names = [], []
    if "backbone" in groups:
        s_map, t_map = _backbone_by_stride(student, imgsz), _backbone_by_stride(teacher, imgsz)
        if list(s_map) != list(t_map):
            raise ValueError(f"backbone strides differ: student {s_map}, teacher {t_map}; pass explicit "
                             f"s_names/t_names")
        s_names += list(s_map.values())
        t_names += list(t_map.values())
    if "neck" in groups:
        s_neck, t_neck = _neck_names(student), _neck_names(teacher)
        if len(s_neck) != len(t_neck):
            raise ValueError(f"student Detect reads {s_neck}, teacher Detect reads {t_neck}: the detection level "
                             f"counts differ; pass explicit s_names/t_names")
        s_names += s_neck
        t_names += t_neck
    return s_names, t_names


def _counterparts(names, auto_given, auto_other, given_side, other_side) -> list:
    """The other side's automatic partner of each given layer name (explicit names on one side only)."""
    partner = dict(zip(auto_given, auto_other))
    missing = [n for n in names if n not in partner]
    if missing:
        raise ValueError(f"{given_side} layers {missing} have no automatic {other_side} partner (automatic "
                         f"{given_side} layers: {list(auto_given)}); give the {other_side} layers explicitly")
    return [partner[n] for n in names]


def pair_layers(student: nn.Module, teacher: nn.Module, s_names=None, t_names=None, imgsz: int | None = None,
                groups=GROUPS) -> list:
    """Pair student and teacher layers for feature distillation.

    Automatic pairing (a side whose names are None): backbone layers by stride, then neck layers by detection
    level. Explicit name lists override either side and must match the other side's length; with names on one side
    only, the other side takes each name's automatic partner.

    Args:
        student, teacher: models.yolo.Model instances (DP/DDP unwrapped); only probed, never changed.
        s_names, t_names: optional explicit named_modules() names.
        imgsz: probe size; None: default_probe_size(student, teacher) (64 px for P5 and P6 models).
        groups: which automatic groups to use, a subset of ('backbone', 'neck'), in that order.

    Returns:
        list of LayerPair(s_name, t_name, s_channels, t_channels, stride).

    Raises:
        ValueError: lengths differ, or a pair's spatial sizes differ (the message lists both sides).
    """
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown layer groups {sorted(unknown)}; choose from {GROUPS}")
    student, teacher = de_parallel(student), de_parallel(teacher)
    imgsz = imgsz or default_probe_size(student, teacher)
    if s_names is None or t_names is None:
        auto_s, auto_t = _auto_names(_check_model(student), _check_model(teacher), groups, imgsz)
        if s_names is None and t_names is None:
            s_names, t_names = auto_s, auto_t
        elif t_names is None:
            s_names, t_names = list(s_names), _counterparts(s_names, auto_s, auto_t, "student", "teacher")
        else:
            t_names, s_names = list(t_names), _counterparts(t_names, auto_t, auto_s, "teacher", "student")
    if len(s_names) != len(t_names):
        raise ValueError(f"{len(s_names)} student layers {list(s_names)} vs {len(t_names)} teacher layers "
                         f"{list(t_names)}; give both sides the same number of layers")
    s_shapes, t_shapes = probe_shapes(student, s_names, imgsz), probe_shapes(teacher, t_names, imgsz)
    pairs = []
    for s_name, t_name in zip(s_names, t_names):
        s_shape, t_shape = s_shapes[s_name], t_shapes[t_name]
        if s_shape[2:] != t_shape[2:]:
            raise ValueError(f"spatial sizes differ at {imgsz} px: student '{s_name}' {s_shape} vs teacher "
                             f"'{t_name}' {t_shape}; pair layers of the same stride")
        pairs.append(LayerPair(s_name, t_name, s_shape[1], t_shape[1], imgsz // s_shape[2]))
    return pairs
