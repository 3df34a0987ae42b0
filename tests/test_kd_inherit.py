"""--inherit: a student starts from evenly spaced channels of its teacher's weights (utils/kd/inherit.py)."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import train_kd
from models.yolo import Model
from tests.conftest import tiny_model_cfg
from tests.test_kd_task import kd_args, save_model, teacher_ckpt  # noqa: F401  (fixture)
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.kd.inherit import inherit_weights, select_tensor, spaced_index
from utils.kd.task import DistillationTask, load_teacher


@pytest.mark.parametrize("s,t", [(8, 16), (32, 48), (3, 3), (5, 7), (1, 4)])
def test_spaced_index_is_the_floor_of_i_t_over_s(s, t):
    expected = [int(Fraction(i * t, s)) for i in range(s)]  # exact rational floor, entry by entry
    assert spaced_index(s, t).tolist() == expected
    with pytest.raises(ValueError):
        spaced_index(t + 1, t)


def test_select_tensor_by_loops():
    src = torch.randn(6, 4, 3, 3)
    out = select_tensor(src, torch.Size((3, 2, 3, 3)))
    for a in range(3):
        for b in range(2):
            assert torch.equal(out[a, b], src[2 * a, 2 * b])


def _randomise(model: Model) -> Model:
    """Random weights and BatchNorm statistics everywhere (a fresh model's BN is the identity)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, v in model.state_dict().items():
            if v.is_floating_point() and "anchor" not in name and "stride" not in name:
                if name.endswith("running_var"):
                    v.copy_(torch.rand(v.shape, generator=g) + 0.5)
                else:
                    v.copy_(torch.randn(v.shape, generator=g) * 0.3)
    return model.eval()


def _widen(small: Model, wide: Model) -> Model:
    """wide (2x the channels of small) made to compute exactly what small computes, built by hand: wide channel a
    is a copy of small channel a // 2 (output dimension and 1-D tensors), and a layer reads only the even channels
    of its input (odd input columns are zero). The copy is exact only if every concatenation keeps the parity of
    its parts, so a student selected back from it by every second channel is small itself."""
    s_state = small.state_dict()
    new = {}
    for name, w in wide.state_dict().items():
        s = s_state[name]
        if w.shape == s.shape:
            new[name] = s.clone()
            continue
        src = s[torch.arange(w.shape[0]) // (w.shape[0] // s.shape[0])]  # rows: copies of the small model's
        if w.dim() == 4 and w.shape[1] != s.shape[1]:  # inputs: the even ones read, the odd ones zero
            src = torch.zeros_like(w).index_copy_(1, torch.arange(0, w.shape[1], 2), src)
        new[name] = src
    wide.load_state_dict(new)
    return wide.eval()


def test_student_selected_from_a_widened_copy_computes_the_same():
    small = _randomise(Model(tiny_model_cfg(3, 0.125)))
    wide = _widen(small, Model(tiny_model_cfg(3, 0.25)))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = small(x)[0]
        assert torch.allclose(wide(x)[0], want, atol=1e-4, rtol=1e-4), "the hand-built widened teacher is wrong"
        student = Model(tiny_model_cfg(3, 0.125)).eval()
        report = inherit_weights(student, wide)
        got = student(x)[0]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert report.selected > 0 and report.taken + len(report.kept) == report.total


def test_first_channels_would_not_do():
    """The test above can fail: selecting the first half of each dimension breaks the concatenations."""
    small = _randomise(Model(tiny_model_cfg(3, 0.125)))
    wide = _widen(small, Model(tiny_model_cfg(3, 0.25)))
    student = Model(tiny_model_cfg(3, 0.125)).eval()
    first = {k: v[tuple(slice(0, n) for n in student.state_dict()[k].shape)] for k, v in wide.state_dict().items()}
    student.load_state_dict(first)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(student(x)[0], small(x)[0], atol=1e-3)


def test_deeper_teacher_gives_its_first_bottlenecks_and_spaced_channels():
    teacher = _randomise(Model(tiny_model_cfg(3, 0.375, depth=0.67)))  # 24 channels where the student has 16
    student = Model(tiny_model_cfg(3, 0.25, depth=0.33))
    report = inherit_weights(student, teacher)
    s, t = student.state_dict(), teacher.state_dict()
    name = "model.2.m.0.cv1.conv.weight"
    assert "model.2.m.1.cv1.conv.weight" in t and "model.2.m.1.cv1.conv.weight" not in s
    rows, cols = spaced_index(s[name].shape[0], t[name].shape[0]), spaced_index(s[name].shape[1], t[name].shape[1])
    for i, a in enumerate(rows.tolist()):
        for j, b in enumerate(cols.tolist()):
            assert torch.equal(s[name][i, j], t[name][a, b])
    assert report.kept == [("model.24.anchors", "anchors/strides")]


def test_other_classes_keep_the_students_detect_outputs():
    teacher = _randomise(Model(tiny_model_cfg(80, 0.25)))
    student = Model(tiny_model_cfg(3, 0.125))
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    report = inherit_weights(student, teacher)
    s = student.state_dict()
    assert torch.equal(s["model.24.m.0.weight"], fresh["model.24.m.0.weight"])
    assert torch.equal(s["model.0.conv.weight"], teacher.state_dict()["model.0.conv.weight"][0::2])
    assert {n for n, why in report.kept if why == "other classes"} == {f"model.24.m.{i}.{p}" for i in range(3)
                                                                       for p in ("weight", "bias")}


def test_another_layer_graph_is_refused():
    """A student YAML with an attention block inserted has other layers under the same names."""
    student = Model(tiny_model_cfg(3, 0.125, base="hub/yolov5l-SE.yaml"))
    with pytest.raises(ValueError, match=r"--inherit needs the teacher's layer graph, but layer 3 is \('SELayer'"):
        inherit_weights(student, Model(tiny_model_cfg(3, 0.25)))
    inherit_weights(Model(tiny_model_cfg(3, 0.125, base="yolov5s.yaml")), Model(tiny_model_cfg(3, 0.25)))


def _start_of_kd_run(shapes_data, cfg, teacher, tmp_path, **extra) -> dict:
    """The student's weights right after DistillationTask.build, of a 1-epoch KD run."""
    seen = {}
    original = DistillationTask.build.__func__

    def spy(cls, model, trainer):
        task = original(cls, model, trainer)
        seen["start"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return task

    DistillationTask.build = classmethod(spy)
    try:
        train_kd.run(**kd_args(shapes_data, cfg, teacher, tmp_path, feat_loss=["at"], **extra))
    finally:
        DistillationTask.build = classmethod(original)
    return seen["start"]


@pytest.mark.parametrize("inherit", [True, None])  # None: the default, automatic
def test_kd_run_starts_the_student_from_the_teacher(inherit, shapes_data, tiny_cfgs, teacher_ckpt,  # noqa: F811
                                                    tmp_path):
    start = _start_of_kd_run(shapes_data, tiny_cfgs["student"], teacher_ckpt, tmp_path, inherit=inherit)
    t = model_from_checkpoint(load_checkpoint(teacher_ckpt, map_location="cpu")).state_dict()
    assert torch.equal(start["model.0.conv.weight"], t["model.0.conv.weight"][0::2])
    assert torch.equal(start["model.8.cv1.bn.running_mean"], t["model.8.cv1.bn.running_mean"][0::2])
    assert torch.equal(start["model.24.m.1.weight"], t["model.24.m.1.weight"][:, 0::2])


def test_no_inherit_and_other_graphs_start_at_random(shapes_data, tiny_cfgs, teacher_ckpt, tmp_path,  # noqa: F811
                                                     caplog):
    t = model_from_checkpoint(load_checkpoint(teacher_ckpt, map_location="cpu")).state_dict()
    start = _start_of_kd_run(shapes_data, tiny_cfgs["student"], teacher_ckpt, tmp_path, inherit=False)
    assert not torch.equal(start["model.0.conv.weight"], t["model.0.conv.weight"][0::2])
    # automatic: a student YAML with an attention block trains from its random initialisation, and says so
    se = Model(tiny_model_cfg(10, 0.125, base="hub/yolov5l-SE.yaml"))
    before = {k: v.clone() for k, v in se.state_dict().items()}
    load_teacher(str(teacher_ckpt), torch.device("cpu"), inherit_into=se, inherit_required=False)
    assert all(torch.equal(before[k], v) for k, v in se.state_dict().items())
    assert "KD inherit: " in caplog.text and "layer 3 is ('SELayer'" in caplog.text
    with pytest.raises(ValueError, match="--inherit needs"):
        load_teacher(str(teacher_ckpt), torch.device("cpu"), inherit_into=se)


def test_inherit_with_weights_is_refused(shapes_data, tiny_cfgs, teacher_ckpt, tmp_path):  # noqa: F811
    student = save_model(Model(tiny_model_cfg(10, 0.125)), tmp_path / "s.pt")
    with pytest.raises(ValueError, match="--inherit .* --weights"):
        train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], teacher_ckpt, tmp_path, inherit=True,
                               weights=str(student)))


def test_load_teacher_leaves_the_student_alone_without_inherit(teacher_ckpt):  # noqa: F811
    student = Model(tiny_model_cfg(10, 0.125))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    load_teacher(str(teacher_ckpt), torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert train_kd.build_parser().parse_args([]).inherit is None  # automatic
    assert train_kd.build_parser().parse_args(["--no-inherit"]).inherit is False
    assert train_kd.build_parser().parse_args(["--inherit"]).inherit is True


def test_student_inherits_from_an_official_v60_checkpoint():
    """A yolov5n written by YOLOv5 v6.0's own code (tests/data/yolov5-v6.0) teaches a half-width student."""
    from models.experimental import attempt_load
    from tests.test_oracle import WEIGHTS

    official = attempt_load(WEIGHTS, fuse=False).float().state_dict()
    student = Model(tiny_model_cfg(10, 0.125))
    load_teacher(str(WEIGHTS), torch.device("cpu"), inherit_into=student)
    s = student.state_dict()
    for name in ("model.0.conv.weight", "model.9.cv2.conv.weight", "model.23.m.0.cv1.bn.running_var"):
        want = official[name][0::2]
        want = want[:, 0::2] if want.dim() == 4 and want.shape[1] != 3 else want
        assert torch.equal(s[name], want), name
    assert torch.equal(s["model.24.m.2.weight"], official["model.24.m.2.weight"][:, 0::2])
