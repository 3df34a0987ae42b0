"""Tests for utils/kd/pairing.py on real YOLOv5 structures (nc=3, 64 px probes)."""
from pathlib import Path

import pytest
import torch

from models.yolo import Model
from utils.general import make_divisible
from utils.kd.pairing import kd_layer_names, pair_layers, probe_shapes

ROOT = Path(__file__).resolve().parents[1]
BASE = {"n": 0.25, "s": 0.50, "m": 0.75, "l": 1.0}  # width multiples of the YAMLs
BACKBONE_WIDTHS = (128, 256, 512, 1024)  # YAML channels of the last backbone layer at strides 4, 8, 16, 32
NECK_WIDTHS = (256, 512, 1024)  # YAML channels of the layers feeding Detect


@pytest.fixture(scope="module")
def models():
    return {size: Model(ROOT / "models" / f"yolov5{size}.yaml", nc=3) for size in BASE}


def _widths(size):
    gw = BASE[size]
    return ([make_divisible(c * gw, 8) for c in BACKBONE_WIDTHS], [make_divisible(c * gw, 8) for c in NECK_WIDTHS])


def test_kd_layer_names_yolov5s(models):
    names = kd_layer_names(models["s"])
    assert names == {"backbone": ["model.2", "model.4", "model.6", "model.9"],
                     "neck": ["model.17", "model.20", "model.23"]}


@pytest.mark.parametrize("student,teacher", [("s", "m"), ("n", "l")])
def test_pair_layers_across_sizes(models, student, teacher):
    pairs = pair_layers(models[student], models[teacher])
    (s_back, s_neck), (t_back, t_neck) = _widths(student), _widths(teacher)
    assert [p.stride for p in pairs] == [4, 8, 16, 32, 8, 16, 32]
    assert [p.s_channels for p in pairs] == s_back + s_neck
    assert [p.t_channels for p in pairs] == t_back + t_neck
    names = ["model.2", "model.4", "model.6", "model.9", "model.17", "model.20", "model.23"]
    assert [p.s_name for p in pairs] == names and [p.t_name for p in pairs] == names
    s_name, t_name, c_s, c_t, stride = pairs[0]  # plain 5-tuple unpacking works
    assert (s_name, c_s, stride) == ("model.2", s_back[0], 4)
    assert [p.s_name for p in pair_layers(models[student], models[teacher], groups=("neck",))] == names[4:]


def test_probe_restores_flags_and_changes_nothing(models):
    model = models["s"].train()
    model.model[3].eval()  # a mixed state must survive too
    flags = [m.training for m in model.modules()]
    bn = model.model[2].cv1.bn
    running = bn.running_mean.clone()
    shapes = probe_shapes(model, ["model.4", "model.17"], imgsz=64)
    assert shapes == {"model.4": (1, _widths("s")[0][1], 8, 8), "model.17": (1, _widths("s")[1][0], 8, 8)}
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(bn.running_mean, running)  # probed in eval mode: statistics did not move
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    model.eval()


def test_explicit_override(models):
    pairs = pair_layers(models["s"], models["m"], s_names=["model.3", "model.4.cv3"], t_names=["model.4", "model.4"])
    c_s, c_t = _widths("s")[0][1], _widths("m")[0][1]  # layers 3 and 4 both end at the stride-8 width
    assert pairs == [("model.3", "model.4", c_s, c_t, 8), ("model.4.cv3", "model.4", c_s, c_t, 8)]
    auto_teacher = pair_layers(models["s"], models["m"], s_names=["model.2", "model.4", "model.6", "model.9"],
                               groups=("backbone",))
    assert [p.t_name for p in auto_teacher] == ["model.2", "model.4", "model.6", "model.9"]


def test_override_errors(models):
    with pytest.raises(ValueError) as err:
        pair_layers(models["s"], models["m"], s_names=["model.4", "model.6"], t_names=["model.4"])
    assert "model.6" in str(err.value) and "['model.4']" in str(err.value)
    with pytest.raises(ValueError) as err:
        pair_layers(models["s"], models["m"], s_names=["model.4"], t_names=["model.6"])
    text = str(err.value)
    assert "model.4" in text and "model.6" in text and "8, 8" in text and "4, 4" in text
    with pytest.raises(ValueError, match="valid|model.0"):
        pair_layers(models["s"], models["m"], s_names=["model.99"], t_names=["model.4"])


def _attention_cfg_or_skip(name):
    path = ROOT / "models" / "hub" / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    try:
        return Model(path, nc=3)
    except TypeError as e:  # models.attention still holds placeholders
        pytest.skip(f"attention blocks not implemented yet: {e}")


def _expected_attention_backbone(cfg):
    """The attention row right after each backbone C3 at strides 4, 8, 16, and the last backbone row (SPPF)."""
    rows = cfg["backbone"]
    after_c3 = [i + 1 for i, row in enumerate(rows[:-1]) if row[2] == "C3" and rows[i + 1][2] != "C3"]
    return [f"model.{i}" for i in after_c3[:3]] + [f"model.{len(rows) - 1}"]


@pytest.mark.parametrize("cfg_name,block", [("yolov5m-SE.yaml", "SELayer"), ("yolov5m-CA.yaml", "CABlock")])
def test_pair_with_attention_teacher(models, cfg_name, block):
    teacher = _attention_cfg_or_skip(cfg_name)
    names = kd_layer_names(teacher)
    expected = _expected_attention_backbone(teacher.yaml)
    assert names["backbone"] == expected
    assert all(teacher.get_submodule(n).type.endswith(block) for n in expected[:3])
    detect_from = teacher.yaml["head"][-1][0]
    assert names["neck"] == [f"model.{i}" for i in detect_from]
    pairs = pair_layers(models["s"], teacher)
    t_back, t_neck = _widths("m")
    assert [p.t_channels for p in pairs] == t_back + t_neck  # attention keeps channel counts
    assert [p.stride for p in pairs] == [4, 8, 16, 32, 8, 16, 32]


def test_p6_student_and_teacher_pair_automatically():
    """yolov5s6 <- yolov5m6: five backbone stages (strides 4-64) and the four Detect inputs (layers 23, 26, 29, 32)."""
    from utils.kd.task import check_teacher

    hub = ROOT / "models" / "hub"
    student, teacher = Model(hub / "yolov5s6.yaml", nc=3), Model(hub / "yolov5m6.yaml", nc=3)
    assert check_teacher(student, teacher) is False  # same strides and anchors: nothing to adopt
    pairs = pair_layers(student, teacher)
    names = ["model.2", "model.4", "model.6", "model.8", "model.11", "model.23", "model.26", "model.29", "model.32"]
    assert [p.s_name for p in pairs] == names and [p.t_name for p in pairs] == names
    assert [p.stride for p in pairs] == [4, 8, 16, 32, 64, 8, 16, 32, 64]
    widths = (128, 256, 512, 768, 1024, 256, 512, 768, 1024)  # YAML channels of those layers
    assert [p.s_channels for p in pairs] == [make_divisible(c * 0.50, 8) for c in widths]
    assert [p.t_channels for p in pairs] == [make_divisible(c * 0.75, 8) for c in widths]
    p5_student = Model(ROOT / "models" / "yolov5s.yaml", nc=3)
    with pytest.raises(ValueError, match=r"strides \[8.0, 16.0, 32.0, 64.0\] differ .*levels 4 vs 3"):
        check_teacher(p5_student, teacher)
    with pytest.raises(ValueError, match="backbone strides differ"):
        pair_layers(p5_student, teacher)


def test_p7_default_probe_covers_stride_128():
    """A P7 model cannot be probed at 64 px; the default probe grows to its largest stride."""
    from utils.general import yaml_load

    cfg = {**yaml_load(ROOT / "models" / "hub" / "yolov5-p7.yaml"), "nc": 3, "width_multiple": 0.125,
           "depth_multiple": 0.33}
    names = kd_layer_names(Model(cfg))
    assert names == {"backbone": ["model.2", "model.4", "model.6", "model.8", "model.10", "model.13"],
                     "neck": ["model.29", "model.32", "model.35", "model.38", "model.41"]}


def test_names_on_one_side_take_their_automatic_partners(models):
    """--kd_layers alone (student names) pairs each with the teacher layer automatic pairing would give it; a
    teacher with attention rows has other indices, so the partner is not simply the same name."""
    teacher = _attention_cfg_or_skip("yolov5m-SE.yaml")
    detect_from = [f"model.{i}" for i in teacher.yaml["head"][-1][0]]
    assert detect_from != ["model.17", "model.20", "model.23"], "the SE teacher's neck indices shift"
    pairs = pair_layers(models["s"], teacher, s_names=["model.23", "model.17"])
    assert [(p.s_name, p.t_name, p.stride) for p in pairs] == [("model.23", detect_from[2], 32),
                                                               ("model.17", detect_from[0], 8)]
    pairs = pair_layers(models["s"], teacher, t_names=[detect_from[1]])
    assert [(p.s_name, p.t_name) for p in pairs] == [("model.20", detect_from[1])]
    with pytest.raises(ValueError, match="no automatic teacher partner.*give the teacher layers explicitly"):
        pair_layers(models["s"], teacher, s_names=["model.3"])
