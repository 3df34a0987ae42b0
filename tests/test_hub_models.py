"""YOLOv5 v6.0's models/hub configs and the blocks they need (GhostConv, C3Ghost, C3TR, nn.MaxPool2d, ...).

Expected figures come from summaries YOLOv5 (and ultralytics/yolov3, which shares its YAMLs and parse_model) printed,
or from such a summary plus a difference worked out by hand from layer shapes; never from this code base.
"""
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.common import (C3SPP, C3TR, SPP, C3Ghost, Contract, Conv, CrossConv, Expand, GhostBottleneck, GhostConv,
                           TransformerBlock, TransformerLayer)
from models.yolo import Model, main
from utils.general import yaml_load
from utils.torch_utils import count_flops

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / "models" / "hub"
ATTENTION_VARIANTS = ("-SE", "-CBAM", "-CA")  # this project's own hub additions (tested in test_attention.py)
V60_HUB = sorted(p for p in HUB.glob("*.yaml")
                 if p.name != "anchors.yaml" and not any(k in p.stem for k in ATTENTION_VARIANTS))

# Detection strides of every v6.0 hub model
STRIDES = {"yolov3-tiny": [16, 32], "yolov5-p2": [4, 8, 16, 32], "yolov5-p7": [8, 16, 32, 64, 128]}
STRIDES.update({name: [8, 16, 32, 64] for name in ("yolov5-p6", "yolov5n6", "yolov5s6", "yolov5m6", "yolov5l6",
                                                    "yolov5x6")})

# Printed summaries (layers, parameters, GFLOPs at 640 px), nc=80 unless noted:
# - yolov3*: "Model Summary" lines of ultralytics/yolov3 v9.5.0's train.py for the same three YAMLs YOLOv5 v6.0
#   ships in models/hub (a published training log; the nc=1 builds printed 8669876 / 61523734 / 62573334).
# - yolov5n6 (nc=1): YOLOv5 v6.0-era train.py log fine-tuning yolov5n6.pt: "355 layers, 3094312 parameters, 4.3 GFLOPs".
PRINTED = {
    ("yolov3-tiny", 80): (59, 8852366, 13.3), ("yolov3-tiny", 1): (59, 8669876, 13.0),
    ("yolov3", 80): (333, 61949149, 156.4), ("yolov3-spp", 80): (342, 62998749, 157.3),
}
# Fused models (Conv + BatchNorm folded, as val.py/detect.py print them): the official yolov5s6.pt printed
# "280 layers, 12612508 parameters, 16.8 GFLOPs"; yolov5l6.pt printed 76726332 parameters (its layer count there
# follows a later YOLOv5's counting rule, so only the parameters are compared).
FUSED = {"yolov5s6": (280, 12612508, 16.8), "yolov5l6": (None, 76726332, None)}
# YOLOv5 v6.0 README table (params in millions rounded to 0.1, GFLOPs at 640 of the fused model) and the
# yolov5s-ghost table of PR #4412 (3.9 M, 8.8 GFLOPs).
README_PARAMS_M = {"yolov5n6": 3.2, "yolov5s6": 12.6, "yolov5m6": 35.7, "yolov5l6": 76.8, "yolov5x6": 140.7,
                   "yolov5s-ghost": 3.9}

# v5.0's printed yolov5s (283 layers, 7276605 parameters; quoted in ultralytics/yolov5 issue #3059) and yolov5l
# (499 layers, 47056765 parameters); the hub variants differ from them in one place each, counted by hand below.
V50_S, V50_L = (283, 7276605), (499, 47056765)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _layers(model):
    return len(list(model.modules()))


def tiny(path, nc=3, width=0.125, depth=0.33):
    """The hub model with small width/depth multiples (structure only)."""
    d = yaml_load(path)
    d.update(nc=nc, width_multiple=width, depth_multiple=depth)
    return Model(d)


def test_hub_list_is_v60s():
    names = {p.stem for p in V60_HUB} | {"anchors"}
    assert names == {"anchors", "yolov3-spp", "yolov3-tiny", "yolov3", "yolov5-bifpn", "yolov5-fpn", "yolov5-p2",
                     "yolov5-p6", "yolov5-p7", "yolov5-panet", "yolov5l6", "yolov5m6", "yolov5n6", "yolov5s6",
                     "yolov5x6", "yolov5s-ghost", "yolov5s-transformer"}
    anchors = yaml_load(HUB / "anchors.yaml")
    assert anchors["anchors_p6_1280"] == yaml_load(HUB / "yolov5s6.yaml")["anchors"]
    assert [len(anchors[f"anchors_p{p}_640"]) for p in (5, 6, 7)] == [3, 4, 5]


@pytest.mark.parametrize("path", V60_HUB, ids=lambda p: p.stem)
def test_hub_model_builds_with_its_levels(path):
    model = tiny(path).eval()
    strides = STRIDES.get(path.stem, [8, 16, 32])
    detect = model.model[-1]
    assert detect.stride.tolist() == strides
    with torch.no_grad():
        decoded, raw = model(torch.zeros(1, 3, 128, 128))
    assert [tuple(r.shape[2:4]) for r in raw] == [(128 // s, 128 // s) for s in strides]
    assert decoded.shape == (1, sum(3 * (128 // s) ** 2 for s in strides), 8)
    assert all(m.eps == 1e-3 and m.momentum == 0.03 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name,nc", sorted(PRINTED))
def test_printed_yolov3_counts(name, nc):
    layers, params, gflops = PRINTED[(name, nc)]
    model = Model(HUB / f"{name}.yaml", nc=nc)
    assert (_layers(model), _params(model)) == (layers, params)
    if name == "yolov3-tiny":  # the big two take seconds to count
        assert abs(count_flops(model, 640) - gflops) <= 0.1


def test_yolov5n6_summary_line_matches_v60(capsys):
    line = main(["--cfg", "yolov5n6.yaml", "--nc", "1"])
    assert line.startswith("yolov5n6 summary: 355 layers, 3094312 parameters, 3094312 gradients, ")
    assert abs(float(line.split(", ")[-1].split()[0]) - 4.3) <= 0.1


@pytest.mark.parametrize("name", ["yolov5s6", "yolov5l6"])
def test_fused_p6_counts(name):
    layers, params, gflops = FUSED[name]
    model = Model(HUB / f"{name}.yaml").fuse()
    assert _params(model) == params
    if layers is not None:
        assert _layers(model) == layers
    if gflops is not None:
        assert abs(count_flops(model, 640) - gflops) <= 0.1


@pytest.mark.parametrize("name", ["yolov5m6", "yolov5x6", "yolov5s-ghost"])
def test_readme_params(name):
    model = Model(HUB / f"{name}.yaml")
    assert abs(_params(model) / 1e6 - README_PARAMS_M[name]) <= 0.1
    if name == "yolov5s-ghost":
        assert abs(count_flops(model.fuse(), 640) - 8.8) <= 0.1


def test_transformer_is_v50_yolov5s_with_c3tr():
    # Layer 9 of v5.0 yolov5s is C3(512, 512, n=1) with hidden width 256. Its inner m was Sequential(Bottleneck):
    # a 1x1 and a 3x3 Conv 256 -> 256 with BatchNorm: 256*256 + 512 + 9*256*256 + 512 parameters, 10 modules
    # (Sequential, Bottleneck, 2 x (Conv, Conv2d, BatchNorm2d, SiLU)).
    bottleneck = (256 * 256 + 512 + 9 * 256 * 256 + 512, 10)
    # C3TR's m is TransformerBlock(256, 256, 4 heads, 1 layer): position Linear 256*256 + 256; one layer of q, k, v,
    # fc1, fc2 (256*256 each, no bias) and MultiheadAttention (in-projection 3*256*256 + 3*256, out-projection
    # 256*256 + 256). 11 modules: block, linear, tr, layer, 5 linears, attention, its out_proj.
    transformer = (256 * 256 + 256 + 5 * 256 * 256 + 3 * 256 * 256 + 3 * 256 + 256 * 256 + 256, 11)
    model = Model(HUB / "yolov5s-transformer.yaml")
    assert isinstance(model.model[9], C3TR)
    assert _params(model) == V50_S[1] - bottleneck[0] + transformer[0]
    assert _layers(model) == V50_S[0] - bottleneck[1] + transformer[1]


def test_bifpn_is_v50_yolov5l_with_one_extra_input():
    # The bottom-up P4 Concat (layer 19) also reads backbone layer 6 (512 channels), so layer 20's C3 gets
    # 1024 input channels instead of 512: its cv1 and cv2 (1x1 convs to 256) gain 2 * 512 * 256 weights.
    model = Model(HUB / "yolov5-bifpn.yaml")
    assert model.model[19].f == [-1, 14, 6]
    assert _params(model) == V50_L[1] + 2 * 512 * 256
    assert _layers(model) == V50_L[0]


def _conv_params(c1, c2, k, g=1):
    return c1 // g * c2 * k * k + 2 * c2  # weights (no bias) + BatchNorm weight and bias


def test_ghost_blocks_by_hand():
    conv = GhostConv(16, 32, 3, 2)
    assert _params(conv) == _conv_params(16, 16, 3) + _conv_params(16, 16, 5, g=16)
    x = torch.rand(2, 16, 8, 8)
    y = conv.eval()(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], conv.cv1(x)) and torch.equal(y[:, 16:], conv.cv2(conv.cv1(x)))
    block = GhostBottleneck(32, 32).eval()
    assert isinstance(block.shortcut, nn.Identity)
    z = torch.rand(1, 32, 8, 8)
    assert torch.allclose(block(z), block.conv(z) + z)
    down = GhostBottleneck(32, 64, 3, 2).eval()
    assert down(z).shape == (1, 64, 4, 4)
    assert _params(down.shortcut) == _conv_params(32, 32, 3, g=32) + _conv_params(32, 64, 1)
    c3 = C3Ghost(32, 64, n=2)
    assert [type(m) for m in c3.m] == [GhostBottleneck, GhostBottleneck]
    assert c3(torch.rand(1, 32, 8, 8)).shape == (1, 64, 8, 8)


def test_transformer_block_token_order():
    torch.manual_seed(0)
    block = TransformerBlock(8, 16, 4, 2).eval()
    assert isinstance(block.conv, Conv) and len(block.tr) == 2 and block.c2 == 16
    assert _params(TransformerLayer(16, 4)) == 5 * 16 * 16 + (3 * 16 * 16 + 3 * 16) + (16 * 16 + 16)
    x = torch.rand(2, 8, 3, 5)
    with torch.no_grad():
        y = block(x)
        f = block.conv(x)
        # tokens built pixel by pixel in row-major order, (h*w, b, c): the layout nn.MultiheadAttention expects
        p = torch.stack([f[:, :, i, j] for i in range(3) for j in range(5)])
        out = block.tr(p + block.linear(p))
    expected = torch.stack([torch.stack([out[i * 5 + j] for j in range(5)], -1) for i in range(3)], -2)
    assert y.shape == (2, 16, 3, 5)
    assert torch.allclose(y, expected, atol=1e-6)


def test_contract_expand_by_loops():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    y = Contract(2)(x)
    assert y.shape == (2, 12, 2, 3)
    for a in range(2):  # row offset inside each 2x2 cell
        for b in range(2):  # column offset
            for c in range(3):
                assert torch.equal(y[:, (a * 2 + b) * 3 + c], x[:, c, a::2, b::2])
    assert torch.equal(Expand(2)(y), x)


def test_crossconv_and_c3spp():
    cross = CrossConv(16, 16, 3, 1, shortcut=True)
    assert _params(cross) == (16 * 16 * 3 + 32) * 2
    assert cross.add and cross(torch.rand(1, 16, 8, 8)).shape == (1, 16, 8, 8)
    c3spp = C3SPP(32, 32, k=(3, 5))
    assert isinstance(c3spp.m, SPP) and len(c3spp.m.m) == 2


def test_parse_model_argument_handling():
    base = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25, "anchors": [[10, 13, 16, 30, 33, 23]]}
    rows = [[-1, 1, Conv, [64, 3, 2]], [-1, 1, nn.ZeroPad2d, [[0, 1, 0, 1]]], [-1, 1, nn.MaxPool2d, [2, 1, 0]],
            [-1, 1, Contract, [2]], [-1, 1, Expand, [2]], [-1, 9, C3TR, [64]], [-1, 9, C3Ghost, [64]],
            [-1, 1, Conv, [64, 3, 2]], [-1, 1, Conv, [64, 3, 2]], [[-1], 1, "Detect", ["nc", "anchors"]]]
    names = {Conv: "Conv", nn.ZeroPad2d: "nn.ZeroPad2d", nn.MaxPool2d: "nn.MaxPool2d", Contract: "Contract",
             Expand: "Expand", C3TR: "C3TR", C3Ghost: "C3Ghost"}
    cfg = {**base, "backbone": [[f, n, names.get(m, m), a] for f, n, m, a in rows[:7]],
           "head": [[f, n, names.get(m, m), a] for f, n, m, a in rows[7:]]}
    model = Model(deepcopy(cfg))
    pad, pool, contract, expand, c3tr, c3ghost = (model.model[i] for i in range(1, 7))
    assert pad.padding == (0, 1, 0, 1) and (pool.kernel_size, pool.stride) == (2, 1)
    assert contract.gain == 2 and c3tr.cv1.conv.in_channels == 16  # Expand undid Contract's 4x channels
    assert len(c3tr.m.tr) == 3 and len(c3ghost.m) == 3  # round(9 * 0.33) repeats inside one block
    assert model.model[-1].stride.tolist() == [8]  # three stride-2 convs; Contract/Expand cancel out
