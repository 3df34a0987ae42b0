"""export.py: TorchScript and ONNX files that run like the .pt (models.backends, val.py, detect.py), and the
YOLOv5 v6.0 pickled layout, checked against the checkpoint v6.0 itself wrote (tests/data/yolov5-v6.0)."""
from __future__ import annotations

import importlib.util
import pickletools
import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import export
import val
from models.backends import PAD_VALUE, DetectMultiBackend, exported_weights, weights_kind
from models.experimental import attempt_load
from models.yolo import Model
from tests.conftest import tiny_model_cfg
from utils.checkpoint import (build_checkpoint, load_checkpoint, model_from_checkpoint, safe_torch_load,
                              save_checkpoint)
from utils.general import run_cli, yaml_load, yaml_save

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT / "tests" / "data" / "yolov5-v6.0" / "yolov5n_shapes_v6.0.pt"
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
FORMATS = ["torchscript", pytest.param("onnx", marks=pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx and "
                                                                         "onnxruntime (requirements-export.txt)"))]
MAP_ATOL = 0.002  # the bound on mAP differences between formats


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the output scale (decoded xywh reach the image size, scores stay below 1)."""
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The v6.0 checkpoint exported at 96 px (ONNX with dynamic axes): ({format: file}, export.run's results)."""
    weights = tmp_path_factory.mktemp("export") / "oracle.pt"
    shutil.copy(ORACLE, weights)
    include = ["torchscript", "onnx"] if HAVE_ONNX else ["torchscript"]
    results = export.run(weights, include=include, imgsz=[96], dynamic=True)
    return weights, {k: v[0] for k, v in results.items()}, results


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_runs_like_pytorch_at_another_shape(fmt, exports):
    weights, files, results = exports
    assert files[fmt].name == f"oracle.{fmt}" and files[fmt].is_file()
    assert results[fmt][1] is not None and results[fmt][1] < 1e-3  # export.run's own check ran and passed
    backend = DetectMultiBackend(files[fmt])
    model = attempt_load(weights)
    x = torch.rand(3, 3, 64, 128)  # batch and size differ from the export's (1, 3, 96, 96)
    with torch.no_grad():
        expected, got = model(x)[0], backend(x)[0]
    assert got.shape == expected.shape == (3, 3 * (8 * 16 + 4 * 8 + 2 * 4), 15)  # na * cells, 5 + 10 classes
    assert close(got, expected) < 1e-4
    assert backend.names == yaml_load(ROOT / "data" / "shapes.yaml")["names"]  # what v6.0 pickled for this run
    assert backend.nc == 10 and int(backend.stride.max()) == 32  # yolov5n: strides 8, 16, 32


@pytest.fixture(scope="module")
def pseudo_labelled(tmp_path_factory, exports):
    """8 shapes images labelled with the .pt model's own 5 most confident detections, so its mAP is high and any
    change in the exported models' boxes or ranking shows in the metrics (the barely trained v6.0 checkpoint
    scores ~0.01 mAP on the real labels, where every format would agree trivially)."""
    from utils.synthetic import generate_shapes

    root = tmp_path_factory.mktemp("pseudo")
    generate_shapes(root / "shapes", n_train=0, n_val=8, img_size=96, difficulty=0.3, seed=0)
    data = {"path": str(root / "shapes"), "train": "images/val", "val": "images/val", "nc": 10,
            "names": yaml_load(ROOT / "data" / "shapes.yaml")["names"]}
    yaml_save(root / "data.yaml", data)
    val.run(root / "data.yaml", weights=str(exports[0]), imgsz=96, batch_size=4, half=False, workers=0, plots=False,
            save_txt=True, save_conf=True, project=str(root / "runs"), name="labels")
    for file in (root / "runs" / "labels" / "labels").glob("*.txt"):
        rows = sorted((line.split() for line in file.read_text().splitlines()), key=lambda r: -float(r[5]))
        (root / "shapes" / "labels" / "val" / file.name).write_text("".join(" ".join(r[:5]) + "\n" for r in rows[:5]))
    for cache in root.rglob("*.cache"):
        cache.unlink()
    return root / "data.yaml"


@pytest.mark.parametrize("fmt", FORMATS)
def test_val_gives_the_same_metrics(fmt, exports, pseudo_labelled, tmp_path):
    weights, files, _ = exports
    kwargs = dict(imgsz=96, batch_size=4, half=False, workers=0, plots=False, project=str(tmp_path))
    reference = val.run(pseudo_labelled, weights=str(weights), **kwargs)[0][:4]
    exported = val.run(pseudo_labelled, weights=str(files[fmt]), **kwargs)[0][:4]
    assert reference[2] > 0.5  # labels are its own detections: a meaningful mAP to compare
    for ours, theirs in zip(exported, reference):
        assert abs(ours - theirs) <= MAP_ATOL, f"{fmt} P/R/mAP {exported} vs .pt {reference}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_runs_exported_files(fmt, exports, shapes_data, tmp_path):
    import detect

    weights, files, _ = exports
    source = Path(yaml_load(shapes_data)["path"]) / "images" / "val"
    kwargs = dict(source=str(source), imgsz=(96, 96), conf_thres=0.005, save_txt=True, save_conf=True,
                  project=str(tmp_path), exist_ok=False)
    lines = {}
    for name, w in (("pt", weights), (fmt, files[fmt])):
        out = detect.run(weights=[str(w)], name=name, **kwargs)
        lines[name] = sorted(f.name + " " + line for f in (out / "labels").glob("*.txt") for line in
                             f.read_text().splitlines())
    assert lines["pt"] and len(lines["pt"]) == len(lines[fmt])
    for a, b in zip(lines["pt"], lines[fmt]):  # same files, classes, boxes (normalised) and confidences
        assert a.split()[:2] == b.split()[:2]
        assert max(abs(float(x) - float(y)) for x, y in zip(a.split()[2:], b.split()[2:])) < 1e-3


@pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx and onnxruntime (requirements-export.txt)")
def test_fixed_shape_onnx_takes_other_batches_and_smaller_images(tmp_path):
    model = Model(tiny_model_cfg(3)).eval()
    weights = save_checkpoint(build_checkpoint(model), tmp_path / "tiny.pt")
    file = export.run(weights, include=["onnx"], imgsz=[64], batch_size=2)["onnx"][0]
    backend = DetectMultiBackend(file)
    assert backend.fixed_shape == (2, 3, 64, 64)
    reference = attempt_load(weights)
    x = torch.rand(3, 3, 32, 64)  # 3 images (two runs of batch 2), half the height
    padded = torch.cat((x, torch.full((3, 3, 32, 64), PAD_VALUE)), 2)  # what letterbox grey below the image gives
    with torch.no_grad():
        assert close(backend(x)[0], reference(padded)[0]) < 1e-4
    assert val._loader_shape(backend, 640, 32) == (64, False)  # val.py scores square images of the file's size
    with pytest.raises(ValueError, match="--imgsz 96"):
        val._loader_shape(SimpleNamespace(fixed_shape=(1, 3, 64, 96)), 640, 32)


def pickle_globals(path: Path) -> set:
    """'module name' of every GLOBAL opcode in a torch zip checkpoint's pickle, read statically."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def pickled_modules(module: nn.Module) -> list:
    """An unpickled model and all its submodules, found through their dicts only (no method of theirs runs)."""
    found, stack = [], [module]
    while stack:
        found.append(stack.pop())
        stack.extend(c for c in vars(found[-1]).get("_modules", {}).values() if isinstance(c, nn.Module))
    return found


def attribute_names(module: nn.Module) -> dict:
    """{class name: public attribute names} over an unpickled model's modules."""
    found = {}
    for m in pickled_modules(module):
        found.setdefault(type(m).__name__, set()).update(k for k in vars(m) if not k.startswith("_"))
    return found


@pytest.fixture(scope="module")
def yolov5_layout(tmp_path_factory):
    """Our checkpoint of a tiny model whose EMA differs from its weights, exported with --include yolov5."""
    root = tmp_path_factory.mktemp("layout")
    model, ema = Model(tiny_model_cfg(3)), Model(tiny_model_cfg(3))
    ema.names = model.names = ["a", "b", "c"]
    ckpt = build_checkpoint(model, ema=SimpleNamespace(ema=ema, updates=7), best_fitness=0.25, hyp={"lr0": 0.01})
    weights = save_checkpoint(ckpt, root / "best.pt")
    file, diff = export.run(weights, include=["yolov5"], imgsz=[64])["yolov5"]
    return ema.eval(), file, diff


def test_yolov5_layout_matches_what_v60_pickles(yolov5_layout):
    _, file, _ = yolov5_layout
    ours, theirs = safe_torch_load(file), safe_torch_load(ORACLE)
    assert list(ours) == list(theirs)  # the same keys, in the same order
    assert ours["epoch"] == -1 and ours["best_fitness"] == 0.25 and all(
        ours[k] is None for k in ("ema", "updates", "optimizer", "wandb_id", "training_results"))
    model = ours["model"]
    tensors = [t for m in pickled_modules(model) for t in vars(m).get("_parameters", {}).values() if t is not None]
    assert not vars(model)["training"] and all(t.dtype == torch.float16 and not t.requires_grad for t in tensors)
    assert vars(model)["names"] == ["a", "b", "c"] and vars(model)["hyp"] == {"lr0": 0.01}
    ours_attrs, v60_attrs = attribute_names(model), attribute_names(theirs["model"])
    for cls, names in ours_attrs.items():  # every module carries exactly the attributes v6.0 pickles for its class
        assert names <= v60_attrs[cls] and v60_attrs[cls] - names <= {"yaml_file", "class_weights"}, cls
    # Every global the file needs is one v6.0's own checkpoint needs (no numpy, no class of ours only).
    assert pickle_globals(file) <= pickle_globals(ORACLE) - {g for g in pickle_globals(ORACLE) if "numpy" in g}


def test_yolov5_layout_round_trips_through_the_safe_loader(yolov5_layout):
    ema, file, diff = yolov5_layout
    assert diff is not None and diff < 1e-4  # export.run's own reload check
    reloaded = model_from_checkpoint(load_checkpoint(file)).eval()
    rounded = Model(ema.yaml).eval()  # the EMA weights after the fp16 round trip the layout stores them in
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in ema.state_dict().items()})
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert close(reloaded(x)[0], rounded(x)[0]) < 1e-5
    assert reloaded.names == ["a", "b", "c"] and reloaded.stride.tolist() == [8.0, 16.0, 32.0]


def test_yolov5_layout_warns_about_classes_v60_lacks(tmp_path, caplog):
    cfg = yaml_load(ROOT / "models" / "hub" / "yolov5s-SE.yaml")
    cfg.update(nc=2, width_multiple=0.125, depth_multiple=0.33)
    weights = save_checkpoint(build_checkpoint(Model(cfg)), tmp_path / "se.pt")
    export.run(weights, include=["yolov5"], imgsz=[64])
    assert "models.attention.SELayer" in caplog.text and "does not define" in caplog.text


def test_export_checks_its_arguments(tmp_path, monkeypatch, caplog):
    weights = save_checkpoint(build_checkpoint(Model(tiny_model_cfg(2))), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="CUDA --device"):
        export.run(weights, include=["torchscript"], half=True, device="cpu")
    exported = tmp_path / "w.onnx"
    exported.touch()
    with pytest.raises(ValueError, match="already exported"):
        export.run(exported, include=["onnx"])
    with pytest.raises(ValueError, match="ensemble"):
        exported_weights(["a.pt", "b.onnx"])
    assert [weights_kind(f) for f in ("a.torchscript", "a.torchscript.pt", "a.ONNX", "a.pt", "a.ckpt")] == [
        "torchscript", "torchscript", "onnx", "pt", "pt"]  # *.torchscript.pt: YOLOv5 v6.0's TorchScript name
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if onnx were not installed
    with pytest.raises(ValueError, match="pip install -r requirements-export.txt"):
        export.run(weights, include=["onnx"])


@pytest.mark.skipif(not HAVE_ONNX, reason="needs onnx and onnxruntime (requirements-export.txt)")
def test_simplify_uses_onnxsim_when_installed(tmp_path, monkeypatch, caplog):
    weights = save_checkpoint(build_checkpoint(Model(tiny_model_cfg(2))), tmp_path / "w.pt")
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    export.run(weights, include=["onnx"], imgsz=[64], simplify=True)
    assert "--simplify needs onnxsim" in caplog.text
    calls = []
    monkeypatch.setitem(sys.modules, "onnxsim", SimpleNamespace(simplify=lambda proto: calls.append(proto) or (
        proto, True)))
    export.run(weights, include=["onnx"], imgsz=[64], simplify=True)
    assert len(calls) == 1


@pytest.mark.parametrize("case", ["missing weights", "unknown format"])
def test_cli_mistakes_are_one_error_line(case, tmp_path, caplog):
    weights = save_checkpoint(build_checkpoint(Model(tiny_model_cfg(2))), tmp_path / "w.pt")
    args = ["--weights", str(tmp_path / "nope.pt")] if case == "missing weights" else \
        ["--weights", str(weights), "--include", "torchscript", "tflite"]
    with pytest.raises(SystemExit) as stop:
        run_cli(export.main, export.parse_opt(args))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert stop.value.code == 1 and len(errors) == 1 and errors[0].startswith("ERROR: ")
    assert ("nope.pt not found" in errors[0]) if case == "missing weights" else ("tflite" in errors[0])
    assert not list(tmp_path.glob("w.torchscript"))  # nothing exported before the mistake was caught
