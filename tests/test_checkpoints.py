"""Checkpoints: our weights-only format, official YOLOv5 pickles, refusal of unsafe pickles, attempt_load."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import pickle
import pickletools
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

import models.yolo
from models.common import Conv
from models.experimental import Ensemble, attempt_load
from models.yolo import Model
from utils.checkpoint import (UnsafeCheckpointError, build_checkpoint, load_checkpoint, model_from_checkpoint,
                              save_checkpoint, strip_optimizer)
from utils.general import ROOT, yaml_load, yaml_save
from utils.torch_utils import ModelEMA, initialize_weights

IMG = 64


@pytest.fixture(scope="module")
def cfg():
    """yolov5n layout, 3 classes, narrower still so every build and forward is quick."""
    d = yaml_load(ROOT / "models" / "yolov5n.yaml")
    d.update(nc=3, width_multiple=0.125)
    return d


def make_model(cfg, seed=0):
    """A model with random BatchNorm statistics, so that fusing and fp16 rounding change the outputs."""
    torch.manual_seed(seed)
    model = Model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, IMG, IMG)


def allowlist_active():
    """Whether our model classes are registered as safe globals right now (they must only be inside a load)."""
    registered = [g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()]
    return Model in registered or Conv in registered


def decoded(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)[0]


def test_own_format_round_trip(cfg, images, tmp_path):
    model = make_model(cfg)
    model.names = ["cat", "dog", "bird"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    sum(p.mean() for p in model(images)).backward()
    optimizer.step()
    ema = ModelEMA(model)
    with torch.no_grad():
        model.model[0].conv.weight.add_(0.05)  # model and EMA now differ
    opt = argparse.Namespace(save_dir=tmp_path / "exp", epochs=3)
    hyp = {"lr0": np.float64(0.01), "box": 0.05}
    adapters = nn.Conv2d(4, 8, 1)

    @dataclasses.dataclass
    class KDSettings:
        temperature: float = 4.0
        layers: tuple = ("model.17",)

    ckpt = build_checkpoint(model, ema, optimizer, epoch=2, best_fitness=np.array([0.25]), opt=opt, hyp=hyp,
                            extra={"adapters": adapters.state_dict(), "kd": KDSettings()})
    path = save_checkpoint(ckpt, tmp_path / "weights" / "last.pt")

    assert not allowlist_active()
    raw = torch.load(path, weights_only=True)  # no allowlist needed for our own format
    assert raw["format"] == "yolov5-kd/2" and raw["epoch"] == 2 and raw["best_fitness"] == 0.25
    assert raw["model"]["batchnorm"] == {"eps": 1e-3, "momentum": 0.03}  # YOLOv5 v6.0's values
    assert raw["opt"] == {"save_dir": str(tmp_path / "exp"), "epochs": 3}
    assert type(raw["hyp"]["lr0"]) is float
    assert raw["kd"] == {"temperature": 4.0, "layers": ("model.17",)}
    assert raw["model"]["names"] == ["cat", "dog", "bird"] and raw["model"]["nc"] == 3
    assert all(v.dtype != torch.float16 for v in raw["model"]["state_dict"].values())
    torch.testing.assert_close(raw["adapters"]["weight"], adapters.weight.detach())

    loaded = load_checkpoint(path)
    plain = model_from_checkpoint(loaded, use_ema=False)
    averaged = model_from_checkpoint(loaded, use_ema=True)
    assert plain.names == ["cat", "dog", "bird"]
    assert torch.equal(decoded(plain, images), decoded(model, images))
    assert torch.equal(decoded(averaged, images), decoded(ema.ema, images))
    assert not torch.equal(decoded(plain, images), decoded(averaged, images))

    restored = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    restored.load_state_dict(loaded["optimizer"])
    for p_old, p_new in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(optimizer.state[p_old]["momentum_buffer"], restored.state[p_new]["momentum_buffer"])


def test_build_checkpoint_refuses_what_cannot_round_trip(cfg):
    model = make_model(cfg)
    with pytest.raises(ValueError, match="reserved"):
        build_checkpoint(model, extra={"model": {}})
    with pytest.raises(TypeError, match=r"opt\['callback'\]"):
        build_checkpoint(model, opt={"callback": object()})
    with torch.no_grad():
        fused = copy.deepcopy(model).fuse()
    with pytest.raises(ValueError, match="fuse"):
        build_checkpoint(fused)


def test_save_is_atomic(cfg, tmp_path, monkeypatch):
    model = make_model(cfg)
    path = tmp_path / "last.pt"
    save_checkpoint(build_checkpoint(model, epoch=1), path)

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_checkpoint(model, epoch=2), path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temp file left behind
    assert load_checkpoint(path)["epoch"] == 1  # the previous file is intact


def test_copy_is_byte_identical_and_atomic(cfg, tmp_path, monkeypatch):
    import shutil

    from utils.checkpoint import copy_checkpoint

    model = make_model(cfg)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint(build_checkpoint(model, epoch=1), last)
    copy_checkpoint(last, best)
    assert best.read_bytes() == last.read_bytes()
    save_checkpoint(build_checkpoint(model, epoch=2), last)

    def crash_mid_copy(src, dst, *args):
        dst.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", crash_mid_copy)
    with pytest.raises(OSError, match="disk full"):
        copy_checkpoint(last, best)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temp file left behind
    assert load_checkpoint(best)["epoch"] == 1  # the previous best.pt is intact


def official_checkpoint(model, style):
    """A YOLOv5-style checkpoint dict holding a pickled fp16 model, with old-version attributes simulated."""
    model = copy.deepcopy(model).half()
    detect = model.model[-1]
    for m in model.modules():
        if isinstance(m, nn.Upsample):
            del m.recompute_scale_factor  # pickled by torch < 1.11
        if isinstance(m, nn.SiLU):
            del m.inplace
    if style == "v5.0":  # anchor_grid was a registered buffer in pixels, plus an 'export' flag
        pixels = detect.anchors * detect.stride.view(-1, 1, 1)
        del detect.anchor_grid
        detect.register_buffer("anchor_grid", pixels.clone().view(detect.nl, 1, -1, 1, 1, 2))
        detect.export = False
    else:  # v7.0: names as a dict and a 'dynamic' flag
        model.names = dict(enumerate(model.names))
        detect.dynamic = False
    return {"epoch": -1, "best_fitness": np.array([0.5]), "model": model, "ema": None, "updates": None,
            "optimizer": None, "wandb_id": None, "date": "2022-11-22T00:00:00"}


def pickled_globals(path):
    """GLOBAL names in a torch.save file (read statically)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.mark.parametrize("style", ["v5.0", "v7.0"])
def test_official_checkpoint_loads_safely_and_matches(cfg, images, tmp_path, monkeypatch, style):
    model = make_model(cfg)
    model.names = ["cat", "dog", "bird"]
    ckpt = official_checkpoint(model, style)
    path = tmp_path / f"yolov5n-{style}.pt"
    if style == "v7.0":  # v7.0 pickles the class under the name DetectionModel
        detection_model = type("DetectionModel", (Model,), {"__module__": "models.yolo"})
        monkeypatch.setattr(models.yolo, "DetectionModel", detection_model)
        ckpt["model"].__class__ = detection_model
        torch.save(ckpt, path)
        monkeypatch.undo()
    else:
        torch.save(ckpt, path)
    names = pickled_globals(path)
    assert "numpy._core.multiarray._reconstruct" in names or "numpy.core.multiarray._reconstruct" in names
    assert ("models.yolo.DetectionModel" if style == "v7.0" else "models.yolo.Model") in names
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # proves the file really needs the allowlist

    reference = copy.deepcopy(model).half().float()  # same fp16-rounded weights, our classes
    loaded = attempt_load(path, fuse=False)
    assert type(loaded) is Model
    assert loaded.names == ["cat", "dog", "bird"] and loaded.nc == 3
    assert loaded.stride.tolist() == [8.0, 16.0, 32.0]
    assert next(loaded.parameters()).dtype == torch.float32 and not loaded.training
    assert torch.equal(decoded(loaded, images), decoded(reference, images))
    fused = attempt_load(path)
    torch.testing.assert_close(decoded(fused, images), decoded(reference, images), rtol=1e-4, atol=1e-3)
    assert not any(hasattr(m, "bn") for m in fused.modules() if isinstance(m, Conv))

    converted = load_checkpoint(path)
    assert converted["best_fitness"] == 0.5 and converted["optimizer"] is None
    assert not allowlist_active()  # the allowlist does not leak out of the load


def test_official_activations_are_adopted(cfg, images, tmp_path):
    """Activations carry no weights; a rebuilt model must still use the ones the file was trained with."""
    model = make_model(cfg)
    model.model[0].act = nn.Hardswish()
    model.model[1].act = nn.LeakyReLU(0.1)
    path = tmp_path / "leaky.pt"
    torch.save(official_checkpoint(model, "v7.0"), path)
    reference = copy.deepcopy(model).half().float()

    loaded = attempt_load(path, fuse=False)
    assert isinstance(loaded.model[1].act, nn.LeakyReLU) and loaded.model[1].act.negative_slope == 0.1
    assert torch.equal(decoded(loaded, images), decoded(reference, images))
    naive = Model(cfg)
    naive.load_state_dict(reference.state_dict())
    assert not torch.allclose(decoded(naive, images), decoded(reference, images))  # the check above can fail


def test_official_training_checkpoint_prefers_ema(cfg, images, tmp_path):
    model, averaged = make_model(cfg, seed=0), make_model(cfg, seed=1)
    ckpt = official_checkpoint(model, "v5.0")
    ckpt.update(ema=official_checkpoint(averaged, "v5.0")["model"], updates=10, epoch=4)
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)

    converted = load_checkpoint(path)
    assert converted["updates"] == 10 and converted["epoch"] == 4
    deployed = attempt_load(path, fuse=False)
    assert torch.equal(decoded(deployed, images), decoded(copy.deepcopy(averaged).half().float(), images))
    raw_weights = model_from_checkpoint(converted, use_ema=False)
    assert torch.equal(decoded(raw_weights, images), decoded(copy.deepcopy(model).half().float(), images))


def test_official_batchnorm_settings_come_from_the_pickle(cfg, images, tmp_path):
    """BatchNorm eps/momentum are not weights either: a rebuilt model takes them from the pickled layers."""
    model = initialize_weights(make_model(cfg), eps=1e-4, momentum=0.05)  # unlike both v6.0 and PyTorch
    path = tmp_path / "eps.pt"
    torch.save(official_checkpoint(model, "v5.0"), path)
    reference = copy.deepcopy(model).half().float()

    assert load_checkpoint(path)["model"]["batchnorm"] == {"eps": 1e-4, "momentum": 0.05}
    loaded = attempt_load(path, fuse=False)
    bns = [m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-4 and m.momentum == 0.05 for m in bns)
    assert torch.equal(decoded(loaded, images), decoded(reference, images))


def legacy_checkpoint(model, path):
    """A file as this project wrote it before the BatchNorm record: format yolov5-kd/1, no model['batchnorm']."""
    ckpt = build_checkpoint(model)
    ckpt["format"] = "yolov5-kd/1"
    del ckpt["model"]["batchnorm"]
    return save_checkpoint(ckpt, path)


def test_old_own_checkpoint_keeps_its_predictions(cfg, images, tmp_path, caplog):
    """Our checkpoints from before v6.0's BatchNorm settings were adopted were trained with PyTorch's defaults."""
    model = initialize_weights(make_model(cfg), eps=1e-5, momentum=0.1)  # a model as it was built back then
    path = legacy_checkpoint(model, tmp_path / "old.pt")
    assert "batchnorm" not in torch.load(path, weights_only=True)["model"]

    with caplog.at_level("INFO", logger="yolov5"):
        loaded = attempt_load(path, fuse=False)
    notes = [r.getMessage() for r in caplog.records if "yolov5-kd/1" in r.getMessage()]
    assert len(notes) == 1 and "eps 1e-05" in notes[0] and "momentum 0.1" in notes[0]
    bns = [m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-5 and m.momentum == 0.1 for m in bns)
    assert torch.equal(decoded(loaded, images), decoded(model, images))
    fused = attempt_load(path)
    torch.testing.assert_close(decoded(fused, images), decoded(model, images), rtol=1e-4, atol=1e-3)
    v6 = model_from_checkpoint({**load_checkpoint(path), "format": "yolov5-kd/2"})  # what ignoring the age gives
    assert not torch.allclose(decoded(v6, images), decoded(model, images), atol=1e-3)  # so the check can fail

    resaved = save_checkpoint(build_checkpoint(loaded), tmp_path / "resaved.pt")
    assert torch.load(resaved, weights_only=True)["model"]["batchnorm"] == {"eps": 1e-5, "momentum": 0.1}
    assert torch.equal(decoded(attempt_load(resaved, fuse=False), images), decoded(model, images))
    strip_optimizer(path, tmp_path / "stripped.pt")
    stripped = torch.load(tmp_path / "stripped.pt", weights_only=True)
    assert stripped["format"] == "yolov5-kd/2" and stripped["model"]["batchnorm"] == {"eps": 1e-5, "momentum": 0.1}


def test_new_checkpoints_record_batchnorm_and_newer_formats_are_refused(cfg, images, tmp_path, caplog):
    model = make_model(cfg)
    path = save_checkpoint(build_checkpoint(model), tmp_path / "new.pt")
    with caplog.at_level("INFO", logger="yolov5"):
        loaded = attempt_load(path, fuse=False)
    assert not any("yolov5-kd/1" in r.getMessage() for r in caplog.records)
    assert all(m.eps == 1e-3 and m.momentum == 0.03 for m in loaded.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(decoded(loaded, images), decoded(model, images))
    future = build_checkpoint(model)
    future["format"] = "yolov5-kd/3"
    save_checkpoint(future, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="newer than this code reads"):
        load_checkpoint(tmp_path / "future.pt")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["top-level", "inside-model"])
def test_malicious_pickle_is_refused_and_never_runs(cfg, tmp_path, where):
    marker = tmp_path / "pwned"
    model = make_model(cfg).half()
    ckpt = {"epoch": -1, "model": model, "ema": None}
    if where == "top-level":
        ckpt["wandb_id"] = Payload(marker)
    else:
        model.model[-1].export = Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    offending = f"{os.system.__module__}.system"  # posix.system on Linux

    with pytest.raises(UnsafeCheckpointError, match=offending.replace(".", r"\.")) as info:
        load_checkpoint(path)
    assert "Nothing from the file was executed" in str(info.value)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        attempt_load(path)
    assert not marker.exists()


class CallsConstructor:
    def __reduce__(self):
        return Conv, (3, 8)


def test_allowlisted_class_constructors_never_run(tmp_path, monkeypatch):
    """Allowlisted names map to data-only stand-ins: a file may restore their state, never call them."""
    path = tmp_path / "calls.pt"
    torch.save({"model": CallsConstructor()}, path)
    calls = []
    monkeypatch.setattr(Conv, "__init__", lambda self, *args, **kwargs: calls.append(args))
    with pytest.raises(UnsafeCheckpointError, match=r"models\.common\.Conv\(\.\.\.\)"):
        load_checkpoint(path)
    assert calls == []


def test_bare_state_dict_needs_cfg(cfg, images, tmp_path):
    model = make_model(cfg)
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    cfg_file = tmp_path / "tiny.yaml"
    yaml_save(cfg_file, {**cfg, "nc": 80})  # class count comes from the weights, not the YAML

    ckpt = load_checkpoint(path)
    with pytest.raises(ValueError, match="--cfg"):
        model_from_checkpoint(ckpt)
    with pytest.raises(ValueError, match="--cfg"):
        attempt_load(path)
    loaded = model_from_checkpoint(ckpt, cfg=str(cfg_file))
    assert loaded.nc == 3
    assert torch.equal(decoded(loaded, images), decoded(model, images))
    direct = model_from_checkpoint(model.state_dict(), cfg=cfg)
    assert torch.equal(decoded(direct, images), decoded(model, images))


def test_class_count_and_architecture_mismatch_are_clear(cfg, tmp_path):
    ckpt = build_checkpoint(make_model(cfg))
    with pytest.raises(ValueError, match="checkpoint has 3 classes but --nc/data says 5"):
        model_from_checkpoint(ckpt, nc=5)
    assert model_from_checkpoint(ckpt, nc=3).nc == 3
    wider = {**cfg, "width_multiple": 0.25}
    with pytest.raises(ValueError, match="do not fit"):
        model_from_checkpoint(ckpt, cfg=wider)


def test_strip_optimizer_keeps_ema_in_fp16(cfg, images, tmp_path):
    model = make_model(cfg)
    ema = ModelEMA(model)
    with torch.no_grad():
        model.model[0].conv.weight.mul_(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    path = save_checkpoint(build_checkpoint(model, ema, optimizer, epoch=5, best_fitness=0.7,
                                            extra={"scheduler": {"last_epoch": 5}}), tmp_path / "best.pt")
    before = path.stat().st_size
    strip_optimizer(path)

    raw = torch.load(path, weights_only=True)
    assert path.stat().st_size < 0.6 * before
    assert raw["optimizer"] is None and raw["ema"] is None and raw["epoch"] == -1 and "scheduler" not in raw
    assert raw["best_fitness"] == 0.7
    weights = {k: v for k, v in raw["model"]["state_dict"].items() if v.is_floating_point()}
    assert all(v.dtype == torch.float16 for k, v in weights.items() if not k.endswith("anchors"))
    stripped = attempt_load(path, fuse=False)
    reference = copy.deepcopy(ema.ema).half().float()
    torch.testing.assert_close(decoded(stripped, images), decoded(reference, images), rtol=1e-3, atol=1e-2)


def test_ensemble_concatenates_member_detections(cfg, images, tmp_path):
    paths = []
    for seed in (0, 1):
        paths.append(save_checkpoint(build_checkpoint(make_model(cfg, seed)), tmp_path / f"m{seed}.pt"))
    ensemble = attempt_load(paths, fuse=False)
    assert isinstance(ensemble, Ensemble) and ensemble.nc == 3 and ensemble.stride.tolist() == [8.0, 16.0, 32.0]
    members = [attempt_load(p, fuse=False) for p in paths]
    expected = torch.cat([decoded(m, images) for m in members], 1)
    with torch.no_grad():
        out, raw = ensemble(images)
    assert raw is None and torch.equal(out, expected)


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        attempt_load(tmp_path / "yolov5s.pt")
