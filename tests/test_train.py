"""train.py on the shared engine: run folder contents, resume after SIGKILL, bad input (DDP: test_ddp.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import train
from utils.general import yaml_load
from utils.loggers import YOLOV5_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def train_args(data, cfg, project, **extra):
    args = dict(data=str(data), cfg=str(cfg), weights="", imgsz=64, batch_size=8, epochs=1, workers=0,
                project=str(project), name="exp", device="cpu", noautoanchor=False)
    args.update(extra)
    return args


def cli_args(args: dict) -> list:
    out = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            continue
        else:
            out += [flag, str(v)]
    return out


def read_results(run_dir) -> pd.DataFrame:
    df = pd.read_csv(Path(run_dir) / "results.csv")
    df.columns = [c.strip() for c in df.columns]
    return df


@pytest.fixture(scope="module")
def trained_run(shapes_data, tiny_cfgs, tmp_path_factory):
    project = tmp_path_factory.mktemp("runs")
    opt = train.run(**train_args(shapes_data, tiny_cfgs["student"], project, epochs=2))
    return Path(opt.save_dir)


def test_run_folder(trained_run):
    for f in ("weights/last.pt", "weights/best.pt", "opt.yaml", "hyp.yaml", "results.csv", "results.png",
              "labels.jpg", "train_batch0.jpg", "confusion_matrix.png"):
        assert (trained_run / f).exists(), f
    df = read_results(trained_run)
    assert list(df.columns) == ["epoch", *YOLOV5_COLUMNS, "x/amp"]
    assert df["epoch"].tolist() == [0, 1]
    assert (df["train/box_loss"] > 0).all()
    assert list(trained_run.glob("val_batch0_*.jpg")), "validation images with labels and predictions"


def test_checkpoint_is_weights_only_and_loads_in_val_and_detect(trained_run, shapes_data, tmp_path):
    import detect
    import val

    ckpt = torch.load(trained_run / "weights/best.pt", weights_only=True)
    assert ckpt["optimizer"] is None  # stripped at the end of training
    results, maps, times = val.run(data=str(shapes_data), weights=str(trained_run / "weights/best.pt"),
                                   imgsz=64, batch_size=8, device="cpu", project=str(tmp_path), name="val",
                                   workers=0)
    assert len(results) == 7 and 0 <= results[2] <= 1
    source = Path(yaml_load(shapes_data)["path"]) / "images" / "val"
    detect.run(weights=str(trained_run / "weights/best.pt"), source=str(source), imgsz=64, device="cpu",
               project=str(tmp_path), name="det", save_txt=True, conf_thres=0.0)
    assert len(list((tmp_path / "det").glob("*.png"))) + len(list((tmp_path / "det").glob("*.jpg"))) == 8


def test_resume_after_sigkill(shapes_data, tiny_cfgs, tmp_path):
    args = train_args(shapes_data, tiny_cfgs["student"], tmp_path, epochs=3, noval=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cli_args(args)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "exp" / "weights" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert last.exists(), "the first epoch's checkpoint was never written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_done = torch.load(last, weights_only=True)["epoch"]
    assert epoch_done < 2, "the run finished before it could be killed"
    opt = train.run(resume=str(last))
    assert Path(opt.save_dir) == tmp_path / "exp"
    df = read_results(opt.save_dir)
    assert df["epoch"].tolist()[-1] == 2
    assert df["epoch"].is_unique


def test_missing_dataset_is_a_clear_error(tiny_cfgs, tmp_path):
    with pytest.raises(FileNotFoundError):
        train.run(**train_args(tmp_path / "nope.yaml", tiny_cfgs["student"], tmp_path))


def test_cuda_device_without_cuda(shapes_data, tiny_cfgs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(ValueError, match="--device cpu"):
        train.run(**train_args(shapes_data, tiny_cfgs["student"], tmp_path, device="0"))


def test_missing_resume_target(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        train.run(resume=str(tmp_path / "missing" / "last.pt"))


def test_cli_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "none.yaml"),
                          "--device", "cpu", "--project", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "ERROR:" in out.stderr


def test_nan_loss_stops_and_saves(shapes_data, tiny_cfgs, tmp_path, monkeypatch):
    from utils.engine import DetectionTask

    def nan_step(self, module, imgs, targets):
        loss, items = self.compute_loss(module(imgs), targets)
        return loss * float("nan"), items

    monkeypatch.setattr(DetectionTask, "train_step", nan_step)
    monkeypatch.setattr("utils.engine.MAX_BAD_STEPS", 2)
    with pytest.raises(RuntimeError, match="NaN"):
        train.run(**train_args(shapes_data, tiny_cfgs["student"], tmp_path, epochs=2, batch_size=8))
    assert (tmp_path / "exp" / "weights" / "last.pt").exists()


def test_resume_drops_rows_of_epochs_that_were_not_checkpointed(tmp_path):
    from types import SimpleNamespace

    from utils.loggers import RunLogger, results_columns

    logger = RunLogger(tmp_path, plots=False)
    columns = results_columns(("box_loss", "obj_loss", "cls_loss"))
    rows = [",".join(["epoch", *columns[1:]])] + [",".join([str(e)] + ["0.5"] * (len(columns) - 1))
                                                  for e in (0, 1, 2)]
    (tmp_path / "results.csv").write_text("\n".join(rows) + "\n" + "3,0.5,0.")  # and a row cut short
    # killed after writing epoch 2's row but before its last.pt: the checkpoint says epoch 1, so resume at 2
    logger.on_train_start(SimpleNamespace(names=["a"], start_epoch=2))
    df = read_results(tmp_path)
    assert df["epoch"].tolist() == [0, 1]
