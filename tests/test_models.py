"""Model zoo: YOLOv5 v6.0 parameter/layer/FLOP figures, Detect outputs, fuse(), YAML parsing."""
import math
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.yolo import Detect, Model, main, parse_model
from utils.general import yaml_load
from utils.kd.adapters import ChannelAdapter
from utils.kd.recorder import FeatureRecorder
from utils.torch_utils import count_flops

ROOT = Path(__file__).resolve().parents[1]

# (layers, parameters, GFLOPs at 640) published by YOLOv5 v6.0 for nc=20
V60_NC20 = {"n": (270, 1790977, 4.3), "s": (270, 7073569, 16.0), "m": (369, 20948097, 48.3),
            "l": (468, 46240609, 108.3), "x": (567, 86345665, 204.6)}


def tiny_cfg(nc=3, gw=0.125, gd=0.33):
    d = yaml_load(ROOT / "models/yolov5n.yaml")
    d.update(nc=nc, width_multiple=gw, depth_multiple=gd)
    return d


@pytest.mark.parametrize("size", ["n", "s", "m", "l", "x"])
def test_v60_counts_nc20(size):
    layers, params, gflops = V60_NC20[size]
    model = Model(ROOT / f"models/yolov5{size}.yaml", nc=20)
    assert len(list(model.modules())) == layers
    assert sum(p.numel() for p in model.parameters()) == params
    if size in "ns":  # FLOP counting of the big models costs seconds; the summary test covers m
        assert abs(count_flops(model, 640) - gflops) <= 0.3


@pytest.mark.parametrize("size,params", [("s", 7235389), ("m", 21190557)])
def test_v60_counts_nc80(size, params):
    model = Model(ROOT / f"models/yolov5{size}.yaml")
    assert sum(p.numel() for p in model.parameters()) == params


def test_summary_script_line(capsys):
    line = main(["--cfg", str(ROOT / "models/yolov5m.yaml"), "--nc", "20", "--imgsz", "640"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == line
    assert line.startswith("yolov5m summary: 369 layers, 20948097 parameters, 20948097 gradients, ")
    gflops = float(line.split(", ")[-1].split()[0])
    assert abs(gflops - 48.3) <= 0.3


def test_output_shapes_train_and_eval():
    model = Model(tiny_cfg(nc=3))
    x = torch.rand(2, 3, 64, 96)
    model.train()
    raw = model(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 12, 8), (2, 3, 4, 6, 8), (2, 3, 2, 3, 8)]
    model.eval()
    decoded, raw_eval = model(x)
    assert decoded.shape == (2, 3 * (96 + 24 + 6), 8)
    assert len(raw_eval) == 3
    assert torch.all((decoded[..., 4:] >= 0) & (decoded[..., 4:] <= 1))


def test_strides_anchors_and_bias_priors():
    model = Model(tiny_cfg(nc=3))
    m = model.model[-1]
    assert isinstance(m, Detect)
    assert m.stride.tolist() == [8.0, 16.0, 32.0]
    # anchors are stored in grid units: the P3 anchor 10x13 px at stride 8
    assert torch.allclose(m.anchors[0, 0], torch.tensor([10 / 8, 13 / 8]))
    # priors on top of PyTorch's default init (|b| <= 1/sqrt(fan_in)): objectness log(8 / (640/s)^2),
    # classes log(0.6 / (nc - 0.99))
    for conv, s in zip(m.m, m.stride.tolist()):
        b = conv.bias.detach().view(m.na, -1)
        bound = 1 / conv.weight[0].numel() ** 0.5
        assert torch.all((b[:, 4] - math.log(8 / (640 / s) ** 2)).abs() <= bound)
        assert torch.all((b[:, 5:] - math.log(0.6 / (3 - 0.99))).abs() <= bound)


def test_anchor_order_is_fixed_against_strides():
    cfg = tiny_cfg()
    cfg["anchors"] = list(reversed(cfg["anchors"]))  # largest anchors on the stride-8 level
    m = Model(cfg).model[-1]
    area = (m.anchors * m.stride.view(-1, 1, 1)).prod(-1).mean(-1)
    assert area[0] < area[1] < area[2]


def test_fuse_gives_same_outputs():
    model = Model(tiny_cfg(nc=4)).eval()
    for mod in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        fused = deepcopy(model).fuse()
        after = fused(x)[0]
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fused.modules())
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_nc_and_anchor_override():
    model = Model(ROOT / "models/yolov5n.yaml", nc=7)
    assert model.nc == 7 and model.yaml["nc"] == 7 and model.model[-1].no == 12
    assert len(model.names) == 7


def test_unknown_module_name_lists_valid_names():
    cfg = tiny_cfg()
    cfg["backbone"][1] = [-1, 1, "NotALayer", [32]]
    with pytest.raises(ValueError, match="valid names: .*C3"):
        Model(cfg)


def test_yaml_cannot_run_code():
    cfg = tiny_cfg()
    cfg["backbone"][1] = [-1, 1, "__import__('os').system", ["true"]]
    with pytest.raises(ValueError):
        parse_model(cfg, ch=[3])


def test_every_model_yaml_builds():
    for path in sorted((ROOT / "models").glob("yolov5*.yaml")):
        d = yaml_load(path)
        d.update(width_multiple=0.125)  # plumbing only
        model = Model(d, nc=2)
        assert model.stride.tolist() == [8.0, 16.0, 32.0], path.name


def test_model_moves_grids_with_dtype():
    model = Model(tiny_cfg()).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
        model.double()
        out = model(torch.rand(1, 3, 64, 64, dtype=torch.float64))[0]
    assert out.dtype == torch.float64


ACTIVATIONS = (nn.SiLU, nn.ReLU, nn.Hardswish, nn.LeakyReLU)


def attention_cfg():
    """A slim yolov5s with coordinate attention (Hard-swish, an extra BatchNorm) after every C3."""
    d = yaml_load(ROOT / "models/hub/yolov5s-CA.yaml")
    d.update(nc=3, width_multiple=0.125, depth_multiple=0.33)
    return d


@pytest.mark.parametrize("build", [lambda: Model(tiny_cfg()), lambda: Model(attention_cfg()),
                                   lambda: ChannelAdapter(8, 16)], ids=["yolov5n", "yolov5s-CA", "adapter"])
def test_v60_batchnorm_settings_and_inplace_activations(build):
    """YOLOv5 v6.0 builds every BatchNorm2d with eps 1e-3 and momentum 0.03 (PyTorch: 1e-5, 0.1), and its
    activations work in place; official checkpoints reproduce their outputs only with the same eps."""
    module = build()
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    acts = [m for m in module.modules() if isinstance(m, ACTIVATIONS)]
    assert all(m.inplace for m in acts)
    assert acts or isinstance(module, ChannelAdapter)


def test_inplace_activations_keep_values_and_gradients():
    model = Model(attention_cfg()).train()
    out_of_place = deepcopy(model)
    for m in out_of_place.modules():
        if isinstance(m, ACTIVATIONS):
            m.inplace = False
    x = torch.rand(2, 3, 64, 64)
    results = []
    for m in (model, out_of_place):
        out = m(x)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out).backward()
        results.append([o.detach() for o in out])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for (name, p), q in zip(model.named_parameters(), out_of_place.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_recorded_block_outputs_are_never_changed_in_place():
    """Distillation records layer outputs with forward hooks; an in-place activation running on a recorded tensor
    afterwards would silently change the features. Every layer and block output (Conv, C3, attention, ...)
    keeps its values through forward and backward. (A bare BatchNorm or a fused conv inside a Conv is followed
    by the in-place activation, so record the enclosing Conv instead, as the layer pairing does.)"""
    model = Model(attention_cfg()).train()
    modules = {n: m for n, m in model.named_modules() if n.count(".") == 1 and n.startswith("model.")
               or m.__class__.__module__.startswith("models.")}
    assert {"model.3", "model.15", "model.2.cv1", "model.2.m.0"} <= set(modules)
    snapshots = {}

    def snapshot(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                snapshots[name] = (output._version, output.detach().clone())
        return hook

    handles = [m.register_forward_hook(snapshot(n)) for n, m in modules.items()]
    try:
        with FeatureRecorder(model, list(modules)) as rec:
            out = model(torch.rand(2, 3, 64, 64))
        sum(o.sum() for o in out).backward()
    finally:
        for h in handles:
            h.remove()
    assert len(snapshots) > 50
    changed = [n for n, (version, values) in snapshots.items()
               if rec.outputs[n]._version != version or not torch.equal(rec.outputs[n].detach(), values)]
    assert not changed
