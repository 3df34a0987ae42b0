"""val.py --task study (mAP and speed per image size) and --task speed (each weight timed on its own)."""
import numpy as np
import pytest
import torch

import val
from models.yolo import Model
from tests.conftest import tiny_model_cfg
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.general import yaml_load


@pytest.fixture(scope="module")
def two_weights(shapes_data, tmp_path_factory):
    """Two different tiny checkpoints for the shapes classes."""
    root, nc, paths = tmp_path_factory.mktemp("val_tasks"), yaml_load(shapes_data)["nc"], []
    for seed, name in ((0, "first.pt"), (1, "second.pt")):
        torch.manual_seed(seed)
        paths.append(str(save_checkpoint(build_checkpoint(Model(tiny_model_cfg(nc))), root / name)))
    return paths


def test_study_writes_one_row_per_size_and_the_plot(shapes_data, two_weights, tmp_path):
    sizes = (64, 96)
    save_dir = val.study(str(shapes_data), two_weights, sizes=sizes, batch_size=8, device="cpu", workers=0,
                         project=tmp_path, name="study")
    assert save_dir == tmp_path / "study" and (save_dir / "study.png").stat().st_size > 0
    for w in ("first", "second"):
        rows = np.loadtxt(save_dir / f"study_shapes_{w}.txt", ndmin=2)
        assert rows.shape == (2, 10)  # P R mAP@.5 mAP@.5:.95 3 losses, 3 times; one row per size
        assert np.all(rows[:, 4:7] == 0) and np.all(rows[:, 7:] >= 0)
    # the 96 px row of 'first' holds exactly what a plain validation of that weight at 96 px scores
    results, _, _ = val.run(str(shapes_data), weights=two_weights[0], imgsz=96, batch_size=8, device="cpu",
                            workers=0, project=tmp_path, name="check", plots=False)
    first = np.loadtxt(save_dir / "study_shapes_first.txt", ndmin=2)
    assert results[1] > 0 and np.allclose(first[1, :4], results[:4], rtol=1e-3, atol=1e-7)  # txt keeps 4 digits


def test_study_sizes_are_v60s():
    assert val.STUDY_SIZES == (256, 384, 512, 640, 768, 896, 1024, 1152, 1280, 1408, 1536)


def test_speed_times_each_weight_alone_from_the_cli(shapes_data, two_weights, tmp_path, monkeypatch, caplog):
    import models.experimental as experimental

    loaded = []
    original = experimental.attempt_load

    def spy(weights, *args, **kwargs):
        loaded.append(weights)
        return original(weights, *args, **kwargs)

    monkeypatch.setattr(experimental, "attempt_load", spy)
    opt = val.parse_opt(["--data", str(shapes_data), "--weights", *two_weights, "--task", "speed", "--imgsz", "64",
                         "--batch-size", "8", "--device", "cpu", "--workers", "0", "--project", str(tmp_path)])
    rows = val.main(opt)
    assert loaded == two_weights  # one model per run, not an ensemble of both
    assert [r[0] for r in rows] == two_weights and all(len(r) == 4 and min(r[1:]) >= 0 for r in rows)
    table = caplog.text[caplog.text.index("pre-process  "):]
    assert all(any(line.startswith(w) for line in table.splitlines()) for w in two_weights)
