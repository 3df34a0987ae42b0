"""Tests for utils/kd/recorder.py: scoped hooks on a YOLOv5 model."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

from models.yolo import Model
from utils.kd.recorder import FeatureRecorder


@pytest.fixture(scope="module")
def model():
    return Model("models/yolov5n.yaml", nc=3).eval()


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def _attribute_names(model):
    return [sorted(vars(m)) for m in model.modules()]


def test_outputs_match_manual_forward(model):
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        with FeatureRecorder(model, ["model.4", "model.2", "model.4.cv3"]) as rec:
            model(x)
        y = x
        manual = {}
        for i in range(5):  # layers 0-4 of the backbone form a plain chain
            y = model.model[i](y)
            manual[f"model.{i}"] = y
    assert list(rec.outputs) == ["model.4", "model.2", "model.4.cv3"]
    assert torch.equal(rec.outputs["model.2"], manual["model.2"])
    assert torch.equal(rec.outputs["model.4"], manual["model.4"])
    assert torch.equal(rec.outputs["model.4.cv3"], manual["model.4"])  # C3's last conv is its output
    a, b = rec.get(["model.2", "model.4"])
    assert a is rec.outputs["model.2"] and b is rec.outputs["model.4"]


def test_list_outputs_kept_as_is(model):
    model.train()
    try:
        with FeatureRecorder(model, ["model.24"]) as rec:
            out = model(torch.zeros(1, 3, 64, 64))
    finally:
        model.eval()
    assert isinstance(rec.outputs["model.24"], list) and len(rec.outputs["model.24"]) == 3
    assert all(a is b for a, b in zip(rec.outputs["model.24"], out))


def test_no_hooks_or_attributes_left(model):
    before_hooks, before_attrs = _hook_count(model), _attribute_names(model)
    rec = FeatureRecorder(model, ["model.2", "model.17"])
    x = torch.zeros(1, 3, 32, 32)  # smallest input the strides allow: this test is about hooks
    for _ in range(50):  # the same recorder, re-entered every step
        with rec:
            assert _hook_count(model) == before_hooks + 2
            model(x)
    for _ in range(50):  # a new recorder every step (attach/detach only: the forward was covered above)
        with FeatureRecorder(model, ["model.2"]):
            assert _hook_count(model) == before_hooks + 1
    assert _hook_count(model) == before_hooks == 0
    assert model.model[2]._forward_hooks == {}
    assert _attribute_names(model) == before_attrs
    copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))


def test_hooks_removed_after_exception(model):
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureRecorder(model, ["model.2", "model.4"]):
            model(torch.zeros(1, 3, 64, 64))
            raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_each_entry_starts_fresh_outputs(model):
    rec = FeatureRecorder(model, ["model.2"])
    with torch.no_grad(), rec:
        model(torch.zeros(1, 3, 64, 64))
    first = rec.outputs
    with rec:
        pass  # nothing ran
    assert rec.outputs == {} and "model.2" in first
    with pytest.raises(KeyError, match="did not run"):
        rec.get()


def test_unknown_name_lists_valid_names(model):
    with pytest.raises(ValueError) as err:
        FeatureRecorder(model, ["model.17", "model.99"])
    text = str(err.value)
    assert "model.99" in text and "model.0" in text and "model.24" in text
    assert "model.4.cv3.conv" not in text.split("did you mean")[0]  # the listing stays short
    assert _hook_count(model) == 0


def test_detach_flag(model):
    x = torch.zeros(1, 3, 64, 64)
    with FeatureRecorder(model, ["model.2"], detach=True) as rec:
        model(x)
    assert not rec.outputs["model.2"].requires_grad
    with FeatureRecorder(model, ["model.2"]) as rec:
        model(x)
    feat = rec.outputs["model.2"]
    assert feat.requires_grad
    feat.sum().backward()
    assert model.model[0].conv.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_through_data_parallel_wrapper(model):
    wrapped = nn.DataParallel(model) if not torch.cuda.is_available() else model
    with torch.no_grad(), FeatureRecorder(wrapped, ["model.4"]) as rec:
        wrapped(torch.zeros(1, 3, 64, 64))
    assert rec.outputs["model.4"].shape[-1] == 8
    assert _hook_count(model) == 0


def test_nesting_the_same_recorder_is_refused(model):
    rec = FeatureRecorder(model, ["model.2"])
    with rec:
        with pytest.raises(RuntimeError, match="already active"):
            rec.__enter__()
    assert _hook_count(model) == 0
