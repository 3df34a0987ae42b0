"""val.py and detect.py without arguments, and expected mistakes answered with one line instead of a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.yolo import Model
from tests.conftest import tiny_model_cfg
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.general import default_weights, yaml_save

ROOT = Path(__file__).resolve().parents[1]


def test_default_weights_is_the_newest_best_pt(tmp_path):
    with pytest.raises(ValueError, match="--weights"):
        default_weights([], tmp_path / "runs")
    older, newer = tmp_path / "runs/train/a/weights/best.pt", tmp_path / "runs/train/b/weights/best.pt"
    for f in (older, newer):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"x")
    now = time.time()
    os.utime(older, (now, now))
    os.utime(newer, (now - 100, now - 100))
    assert default_weights([], tmp_path / "runs") == [str(older)]
    assert default_weights(["given.pt"], tmp_path / "runs") == ["given.pt"]
    assert default_weights("given.pt", tmp_path / "runs") == ["given.pt"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, shapes_data):
    from utils.general import yaml_load

    names = yaml_load(shapes_data)["names"]
    model = Model(tiny_model_cfg(len(names)))
    model.names = list(names)
    return save_checkpoint(build_checkpoint(model), tmp_path_factory.mktemp("w") / "best.pt")


def run_script(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("case", ["missing weights", "missing data", "yaml without val", "bad imgsz"])
def test_val_mistakes_are_one_line(case, tiny_weights, shapes_data, tmp_path):
    data, weights, imgsz = str(shapes_data), str(tiny_weights), "64"
    if case == "missing weights":
        weights = str(tmp_path / "nope.pt")
    elif case == "missing data":
        data = str(tmp_path / "nope.yaml")
    elif case == "yaml without val":
        yaml_save(tmp_path / "d.yaml", {"path": str(tmp_path), "train": "images", "nc": 1, "names": ["a"]})
        data = str(tmp_path / "d.yaml")
    else:
        imgsz = "0"
    out = run_script([str(ROOT / "val.py"), "--data", data, "--weights", weights, "--img", imgsz, "--device", "cpu",
                      "--project", str(tmp_path / "runs")], tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    errors = [line for line in (out.stderr + out.stdout).splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, out.stderr[-2000:]


@pytest.mark.parametrize("case", ["missing source", "missing weights", "bad imgsz"])
def test_detect_mistakes_are_one_line(case, tiny_weights, tmp_path):
    source, weights, imgsz = str(tmp_path), str(tiny_weights), "64"
    if case == "missing source":
        source = str(tmp_path / "no_such_folder")
    elif case == "missing weights":
        weights = str(tmp_path / "nope.pt")
    else:
        imgsz = "-1"
    out = run_script([str(ROOT / "detect.py"), "--source", source, "--weights", weights, "--img", imgsz,
                      "--device", "cpu", "--project", str(tmp_path / "runs")], tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert sum(line.startswith("ERROR:") for line in out.stderr.splitlines()) == 1, out.stderr[-2000:]


def test_detect_without_source_uses_the_bundled_val_images(tiny_weights, shapes_data, tmp_path, monkeypatch):
    import detect
    from utils.general import yaml_load

    val_dir = Path(yaml_load(shapes_data)["path"]) / "images" / "val"
    monkeypatch.setattr("utils.datasets.check_dataset", lambda data, *a, **k: {"val": str(val_dir)})
    opt = detect.parse_opt(["--weights", str(tiny_weights), "--img", "64", "--device", "cpu", "--project",
                            str(tmp_path), "--name", "d"])
    detect.main(opt)
    assert opt.source == str(val_dir)
    assert len(list((tmp_path / "d").iterdir())) == len(list(val_dir.iterdir()))
