"""Attention blocks (models/attention.py) and the model YAMLs in models/ and models/hub/."""
import logging
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.attention import (ASCBAM, CABlock, ChannelAttention, Conv1_1, SELayer, SpatialAttention,
                              softmax_pool)
from models.common import C3, Conv
from models.yolo import Detect, Model
from utils.general import LOGGER, make_divisible, yaml_load

ROOT = Path(__file__).resolve().parents[1]
BASE_YAMLS = sorted((ROOT / "models").glob("*.yaml"))
# the attention variants among models/hub (the rest are YOLOv5 v6.0's own hub models: tests/test_hub_models.py)
HUB_YAMLS = sorted(p for p in (ROOT / "models" / "hub").glob("yolov5[nsmlx]-*.yaml")
                   if p.stem.split("-")[1] in ("SE", "CBAM", "CA"))
ATTENTION_NAMES = {"SELayer", "ASCBAM", "CBAM", "CABlock"}
INP, OUP = 16, 24
KINDS = ["SE", "CBAM", "CBAM-AS", "CA"]
MODES = [(False, False), (True, False), (True, True)]  # (need11, reverse)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Fixed seed; one torch thread, because several threads on a shared 2-core machine spin-wait for each other
    and make these tests several times slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_block(kind, need11=False, reverse=False, inp=INP, oup=OUP):
    """One attention block of the given kind with small channel counts and ratio 4."""
    if kind == "SE":
        return SELayer(inp, oup, 4, need11, reverse)
    if kind == "CA":
        return CABlock(inp, oup, 4, need11, reverse)
    return ASCBAM(inp, oup, 4, need11, reverse, as_variant=(kind == "CBAM-AS"))


@pytest.mark.parametrize("need11,reverse", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_block_shape_and_every_parameter_gets_gradient(kind, need11, reverse):
    block = make_block(kind, need11, reverse).train()
    x = torch.randn(2, INP, 8, 6)
    out = block(x)
    assert out.shape == (2, OUP if need11 else INP, 8, 6)
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient (would break DDP): {missing}"
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("as_variant", [False, True])
@pytest.mark.parametrize("part", ["channel", "spatial"])
def test_cbam_parts_shape_and_gradients(part, as_variant):
    m = ChannelAttention(INP, 4, as_variant) if part == "channel" else SpatialAttention(7, as_variant)
    x = torch.randn(2, INP, 8, 8)
    out = m(x)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert hasattr(m, "temperature") == as_variant  # AS adds exactly the learned pooling temperature


@pytest.mark.parametrize("kind", KINDS)
def test_channel_map_exists_only_when_used(kind):
    plain = make_block(kind, need11=False)
    assert plain.cv is None
    assert not any(isinstance(m, Conv1_1) for m in plain.modules())
    assert not any(isinstance(m, nn.Conv2d) and m.out_channels == OUP for m in plain.modules())
    # with reverse the attention still sees INP channels, so the only extra parameters are the 1x1 map's
    mapped = make_block(kind, need11=True, reverse=True)
    extra = sum(p.numel() for p in mapped.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(p.numel() for p in Conv1_1(INP, OUP).parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_channel_map_order(kind, reverse):
    """need11 without reverse maps first and attends after; with reverse it attends first and maps last."""
    block = make_block(kind, need11=True, reverse=reverse).eval()
    seen = {}
    hook = block.cv.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    x = torch.rand(2, INP, 8, 8) + 0.5
    with torch.no_grad():
        out = block(x)
    hook.remove()
    assert torch.equal(seen["inp"], x) != reverse  # the map sees the raw input only when it runs first
    assert torch.equal(seen["out"], out) == reverse  # and produces the block output only when it runs last


def test_need11_without_oup_raises():
    with pytest.raises(ValueError, match="oup"):
        SELayer(INP, None, 4, need11=True)


def test_ignored_oup_is_warned():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    LOGGER.addHandler(handler)
    try:
        block = CABlock(INP, 2 * INP, 4)
    finally:
        LOGGER.removeHandler(handler)
    assert block(torch.randn(1, INP, 4, 4)).shape[1] == INP
    assert any("need11" in r.getMessage() for r in records)


def gate(block, x):
    """Elementwise factor the block multiplies x by (x strictly positive)."""
    with torch.no_grad():
        return block(x) / x


@pytest.mark.parametrize("make", [lambda: SELayer(INP, INP, 4), lambda: ChannelAttention(INP, 4),
                                  lambda: ChannelAttention(INP, 4, True)], ids=["SE", "channel", "channel-AS"])
def test_channel_gates_are_per_channel(make):
    # built inside the test, after conftest's per-test seed: with 4 hidden ReLU units some random inits (~4%) leave
    # them all dead and every gate at exactly 0.5, so an unseeded init made this test fail by chance
    g = gate(make().eval(), torch.rand(2, INP, 6, 5) + 0.5)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(g, g[:, :, :1, :1].expand_as(g))
    assert g[0, :, 0, 0].std() > 0  # but differs between channels


@pytest.mark.parametrize("as_variant", [False, True])
def test_spatial_gate_is_per_pixel(as_variant):
    g = gate(SpatialAttention(7, as_variant).eval(), torch.rand(2, INP, 6, 5) + 0.5)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(g, g[:, :1].expand_as(g))
    assert g[0, 0].std() > 0


def test_coordinate_attention_gate_factorises_into_rows_and_columns():
    block = CABlock(INP, INP, 4).eval()
    g = gate(block, torch.rand(2, INP, 6, 5) + 0.5)  # g[c, y, x] = a_h[c, y] * a_w[c, x]
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(g * g[:, :, :1, :1], g[:, :, :, :1] * g[:, :, :1, :], rtol=1e-4, atol=1e-6)
    assert g[0, 0].std() > 0
    assert any(isinstance(m, nn.Hardswish) for m in block.modules())
    assert block.conv1.out_channels == 8 and CABlock(64, None, 4).conv1.out_channels == 16  # max(8, c // r)


def test_softmax_pool_spans_average_to_max():
    x = torch.randn(2, 3, 5, 4)
    zero, big = torch.zeros(1), torch.full((1,), 200.0)
    torch.testing.assert_close(softmax_pool(x, zero, (2, 3)), x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(softmax_pool(x, big, (2, 3)), x.amax((2, 3), keepdim=True), atol=1e-3, rtol=0)
    torch.testing.assert_close(softmax_pool(x, zero, 1), x.mean(1, keepdim=True))
    torch.testing.assert_close(softmax_pool(x, big, 1), x.amax(1, keepdim=True), atol=1e-3, rtol=0)
    t = torch.ones(1, 3, 1, 1, requires_grad=True)
    softmax_pool(x, t, (2, 3)).sum().backward()
    assert t.grad.abs().sum() > 0


def test_as_variant_differs_from_plain_and_reaches_both_parts():
    plain, adaptive = ASCBAM(INP, None, 4), ASCBAM(INP, None, 4, as_variant=True)
    assert not plain.ca.as_variant and not plain.sa.as_variant
    assert adaptive.ca.as_variant and adaptive.sa.as_variant
    adaptive.load_state_dict(plain.state_dict(), strict=False)  # same MLP and conv weights
    x = torch.rand(2, INP, 8, 8) + 0.5
    with torch.no_grad():
        assert not torch.allclose(plain(x), adaptive(x))


ACTIVATIONS = (nn.SiLU, nn.ReLU, nn.Hardswish, nn.LeakyReLU)  # those the blocks use, all with an inplace switch


def activations(module):
    return [m for m in module.modules() if isinstance(m, ACTIVATIONS)]


def batchnorms(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("need11,reverse", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_standalone_blocks_use_v60_batchnorm_and_inplace_activations(kind, need11, reverse):
    """YOLOv5 v6.0 builds BatchNorm2d with eps 1e-3, momentum 0.03 and runs activations in place; a block built
    outside a model must match, and working in place must change neither values nor gradients."""
    block = make_block(kind, need11, reverse).train()
    assert len(batchnorms(block)) == (kind == "CA") + need11  # CA's bottleneck, the 1x1 map's Conv
    assert all(m.eps == 1e-3 and m.momentum == 0.03 for m in batchnorms(block))
    assert activations(block) and all(m.inplace for m in activations(block))
    out_of_place = deepcopy(block)
    for m in activations(out_of_place):
        m.inplace = False
    x = torch.randn(2, INP, 8, 6)
    outs = []
    for b in (block, out_of_place):
        out = b(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    for (name, p), q in zip(block.named_parameters(), out_of_place.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for a, b in zip(batchnorms(block), batchnorms(out_of_place)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


def test_conv1_1_is_a_fusable_channel_adapter():
    m = Conv1_1(INP, OUP).eval()
    assert isinstance(m, Conv) and m.conv.kernel_size == (1, 1)
    assert m(torch.randn(2, INP, 5, 5)).shape == (2, OUP, 5, 5)


def tiny_cfg(gw):
    """A small model dict exercising every attention name, need11, reverse and the fifth AS argument."""
    return {
        "nc": 2, "depth_multiple": 1.0, "width_multiple": gw, "anchors": 3,
        "backbone": [[-1, 1, "Conv", [32, 3, 2]],  # 0
                     [-1, 1, "SELayer", [100, 4, True]],  # 1: map to oup, attend over oup
                     [-1, 1, "CABlock", [64, 8, True, True]],  # 2: attend, then map to oup
                     [-1, 1, "CBAM", [64, 4, False, False, True]],  # 3: keeps channels, AS variant
                     [-1, 1, "Conv1_1", [40]]],  # 4
        "head": [],
    }


@pytest.mark.parametrize("gw", [0.25, 0.5, 1.0])
def test_parse_model_scales_attention_channels(gw):
    model = Model(tiny_cfg(gw))
    layers = model.model
    c0, c1, c2, c4 = (make_divisible(c * gw, 8) for c in (32, 100, 64, 40))
    assert layers[1].cv.conv.in_channels == c0 and layers[1].cv.conv.out_channels == c1
    assert layers[1].fc[0].in_features == c1  # SE attends over the mapped channels
    assert layers[2].conv1.in_channels == c1 and layers[2].cv.conv.out_channels == c2  # CA attends before mapping
    assert layers[3].cv is None and layers[3].ca.as_variant and layers[3].ca.mlp[0].in_channels == c2
    assert layers[4].conv.in_channels == c2 and layers[4].conv.out_channels == c4
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, c4, 16, 16)


def full_model(path):
    """The model a YAML describes, at its own width and depth, in eval mode."""
    return Model(path).eval()


def sgd_step(model, imgsz=64, lr=0.01):
    """One train-mode SGD step on a 'sum of outputs' loss.

    Returns the names of parameters that got no gradient and whether any weight moved. The update is written out
    instead of using torch.optim.SGD, whose first construction imports torch._dynamo (seconds of test time).
    """
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    out = model(torch.rand(2, 3, imgsz, imgsz))
    loss = sum(o.float().mean() for o in out)  # mean, not sum: keeps the step small at any model size
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return no_grad, moved


@pytest.mark.parametrize("path", BASE_YAMLS + HUB_YAMLS, ids=lambda p: p.name)
def test_every_yaml_builds_runs_and_trains(path):
    model = full_model(path)
    detect = model.model[-1]
    assert isinstance(detect, Detect) and detect.stride.tolist() == [8.0, 16.0, 32.0]
    with torch.no_grad():
        decoded, raw = model(torch.rand(1, 3, 64, 64))
    assert decoded.shape == (1, detect.na * (8 * 8 + 4 * 4 + 2 * 2), detect.no)
    assert [r.shape[2:4] for r in raw] == [(8, 8), (4, 4), (2, 2)]
    # train a slim build of the same file: which parameters are used does not depend on the width
    slim = Model({**deepcopy(model.yaml), "width_multiple": 0.25, "depth_multiple": 0.33})
    assert [type(m) for m in slim.model] == [type(m) for m in model.model]
    no_grad, moved = sgd_step(slim)
    assert not no_grad, f"{path.name}: parameters without gradient: {no_grad[:5]}"
    assert moved


def strip_attention(cfg):
    """Rows of backbone + head with attention rows removed and 'from' indices renumbered to match."""
    rows = cfg["backbone"] + cfg["head"]
    old_of_new, kept = {}, []
    for i, (f, n, name, args) in enumerate(rows):
        if name in ATTENTION_NAMES:
            assert f == -1, f"attention row {i} must follow the layer it attends to"
            old_of_new[i] = len(kept) - 1  # the attended output stands in for the layer it attends to
        else:
            attended = i + 1 < len(rows) and rows[i + 1][2] in ATTENTION_NAMES
            # a direct reference to an attended layer bypasses its attention: make it mismatch the base config
            old_of_new[i] = f"layer {i}, bypassing attention" if attended else len(kept)
            kept.append((f, n, name, args))

    def renumber(f):
        return f if f == -1 else old_of_new[f]

    return [[[renumber(x) for x in f] if isinstance(f, list) else renumber(f), n, name, args]
            for f, n, name, args in kept]


@pytest.mark.parametrize("path", HUB_YAMLS, ids=lambda p: p.name)
def test_hub_config_is_its_base_network_plus_attention_after_every_c3(path):
    cfg = yaml_load(path)
    size, variant = path.stem.split("-")[0], path.stem.split("-")[1]
    base = yaml_load(ROOT / "models" / f"{size}.yaml")
    for key in ("nc", "depth_multiple", "width_multiple", "anchors"):
        assert cfg[key] == base[key], key
    assert strip_attention(cfg) == base["backbone"] + base["head"]
    rows = cfg["backbone"] + cfg["head"]
    expected = {"SE": {"SELayer"}, "CBAM": {"CBAM", "ASCBAM"}, "CA": {"CABlock"}}[variant]
    for i, row in enumerate(rows):
        if row[2] == "C3":
            assert rows[i + 1][2] in expected, f"{path.name}: layer {i} (C3) is not followed by {expected}"
    assert sum(r[2] in expected for r in rows) == sum(r[2] == "C3" for r in rows) == 8


def test_m_se_layout_and_detect_inputs():
    model = full_model(ROOT / "models" / "hub" / "yolov5m-SE.yaml")
    types = [type(m).__name__ for m in model.model]
    assert types[:14] == ["Conv", "Conv", "C3", "SELayer", "Conv", "C3", "SELayer", "Conv", "C3", "SELayer",
                          "Conv", "C3", "SELayer", "SPPF"]
    detect = model.model[-1]
    assert detect.f == [23, 27, 31]
    assert all(isinstance(model.model[i], SELayer) and isinstance(model.model[i - 1], C3) for i in detect.f)
    sizes = {}
    hooks = [model.model[i].register_forward_hook(lambda m, a, o, i=i: sizes.update({i: o.shape[-1]}))
             for i in detect.f]
    try:
        with torch.no_grad():
            _, raw = model(torch.zeros(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert [sizes[i] for i in detect.f] == [64 // 8, 64 // 16, 64 // 32]  # P3, P4, P5 in Detect's order
    assert [r.shape[2] for r in raw] == [8, 4, 2] and detect.stride.tolist() == [8.0, 16.0, 32.0]


def test_need11_config_and_fuse():
    model = full_model(ROOT / "models" / "hub" / "yolov5s-CA-need11.yaml")
    block, sppf = model.model[12], model.model[13]
    assert isinstance(block, CABlock) and block.need11 and block.reverse
    c_in, c_out = make_divisible(1024 * 0.5, 8), make_divisible(512 * 0.5, 8)
    assert (block.cv.conv.in_channels, block.cv.conv.out_channels) == (c_in, c_out)
    assert block.conv_h.out_channels == c_in  # attends before mapping
    assert sppf.cv1.conv.in_channels == c_out and sppf.cv2.conv.out_channels == c_in
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)[0]
        fused = model.fuse()(x)[0]
    assert not hasattr(block.cv, "bn")  # the adapter's BatchNorm was folded like any Conv
    torch.testing.assert_close(fused, expected, rtol=1e-3, atol=1e-3)
