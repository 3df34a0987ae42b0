"""A checkpoint written by YOLOv5 v6.0's own train.py gives v6.0's outputs and v6.0's val.py metrics here.

The reference files in tests/data/yolov5-v6.0/ were produced by v6.0 itself (see the README there), so these tests
compare against YOLOv5, not against checkpoints made from our own classes.
"""
import hashlib
import shutil
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import val
from models.experimental import attempt_load
from utils.general import yaml_load, yaml_save

ROOT = Path(__file__).resolve().parents[1]
ORACLE = Path(__file__).resolve().parent / "data" / "yolov5-v6.0"
WEIGHTS = ORACLE / "yolov5n_shapes_v6.0.pt"
RAW_ATOL = 1e-3  # float32 outputs of the same weights; only the order of float operations may differ

# v6.0 val.py --img 128 --batch-size 32 --task val (conf 0.001, IoU 0.6) on the shapes val split, as printed (3
# significant figures)
V60_METRICS = {"P": 0.00508, "R": 0.181, "mAP@.5": 0.00324, "mAP@.5:.95": 0.000621}
METRIC_ATOL = 0.002
VAL_SPLIT = Path(__file__).parent / "data" / "shapes_val_v60"
VAL_SHA256_PREFIX = "331e93becfd68095"  # images + labels of the val split, in sorted path order


@pytest.fixture(scope="module")
def oracle():
    with np.load(ORACLE / "outputs.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def unfused():
    return attempt_load(WEIGHTS, fuse=False)


def forward(model, x):
    with torch.no_grad():
        return model(x)


def max_errors(raw, oracle, prefix):
    """Largest absolute difference of each level's raw map (bs, na, ny, nx, no) from the oracle's."""
    assert len(raw) == 3
    errors = []
    for i, r in enumerate(raw):
        expected = oracle[f"{prefix}_raw_{i}"]
        assert tuple(r.shape) == expected.shape
        errors.append(float(np.abs(r.numpy() - expected).max()))
    return errors


def decoded_tolerance(oracle):
    """Per-column bound on decoded errors implied by raw maps within RAW_ATOL.

    sigmoid' <= 1/4, so: scores move by at most RAW_ATOL / 4; xy = (2 s - 0.5 + grid) * stride by at most
    2 * (1/4) * RAW_ATOL * stride; wh = (2 s)^2 * anchor by at most 8 * s * s' * anchor * RAW_ATOL <= 2 * anchor *
    RAW_ATOL, with the largest stride and the largest anchor in pixels.
    """
    stride = float(oracle["stride"].max())
    anchor_px = float((oracle["anchors_grid_units"] * oracle["stride"].reshape(-1, 1, 1)).max())
    no = oracle["eval_decoded"].shape[-1]
    tol = np.full(no, RAW_ATOL / 4)
    tol[0:2] = RAW_ATOL / 2 * stride
    tol[2:4] = 2 * RAW_ATOL * anchor_px
    return tol


def test_oracle_files_are_unchanged():
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (WEIGHTS, ORACLE / "outputs.npz")}
    assert digests == {
        "yolov5n_shapes_v6.0.pt": "36491fcaac42c535ff7a5ff7e59156bceac8eed78ad92369a68c2c521edd25bd",
        "outputs.npz": "0cdcab6cfe272b5d59d98a97dcc39ab2155180dd67467274d6588b6eaf985ff6",
    }


def test_stride_anchors_and_batchnorm_settings(unfused, oracle):
    detect = unfused.model[-1]
    assert detect.stride.tolist() == oracle["stride"].tolist()
    assert unfused.stride.tolist() == oracle["stride"].tolist()
    np.testing.assert_array_equal(detect.anchors.numpy(), oracle["anchors_grid_units"])
    bns = [m for m in unfused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)  # what v6.0 pickled


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_eval_outputs_match_v60(fuse, unfused, oracle):
    model = attempt_load(WEIGHTS, fuse=fuse) if fuse else unfused
    prefix = "fused" if fuse else "eval"
    assert not model.training
    decoded, raw = forward(model, torch.from_numpy(oracle["input"]))
    errors = max_errors(raw, oracle, prefix)
    assert max(errors) <= RAW_ATOL, f"{prefix} raw maps differ from v6.0 by up to {errors}"
    expected = oracle[f"{prefix}_decoded"]
    assert tuple(decoded.shape) == expected.shape
    excess = np.abs(decoded.numpy() - expected) - decoded_tolerance(oracle)
    assert excess.max() <= 0, f"{prefix} decoded outputs exceed the tolerance by up to {excess.max():.4g}"


def test_train_mode_outputs_match_v60(unfused, oracle):
    """Train mode normalises with the batch's own statistics, so this checks eps apart from the running stats."""
    model = deepcopy(unfused).train()
    raw = forward(model, torch.from_numpy(oracle["input"]))
    errors = max_errors(raw, oracle, "train")
    assert max(errors) <= RAW_ATOL, f"train-mode raw maps differ from v6.0 by up to {errors}"


def shapes_val_split(root: Path) -> Path:
    """A copy of the val split v6.0 was scored on (tests/data/shapes_val_v60: data/shapes.yaml's val split as
    generated with OpenCV 5.0) and a dataset YAML for it. The split is shipped rather than generated because the
    generator's bytes depend on the OpenCV build (JPEG encoder, anti-aliased drawing): OpenCV 5.1 writes other
    pixels for the same seed. The digest proves the copy is the split of the oracle's README.

    Returns:
        path of the dataset YAML.
    """
    settings = yaml_load(ROOT / "data" / "shapes.yaml")
    shutil.copytree(VAL_SPLIT, root / "shapes")  # val.py writes its label cache next to the labels
    files = sorted([*(root / "shapes/images/val").iterdir(), *(root / "shapes/labels/val").glob("*.txt")])
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    assert len(files) == 2 * settings["download"]["n_val"] == 300
    assert digest.startswith(VAL_SHA256_PREFIX), f"{VAL_SPLIT} is not the split v6.0 was scored on"
    data = {"path": str(root / "shapes"), "train": "images/val", "val": "images/val", "nc": settings["nc"],
            "names": settings["names"]}
    yaml_save(root / "shapes.yaml", data)
    return root / "shapes.yaml"


def test_val_metrics_match_v60(tmp_path):
    """val.py as v6.0 ran it: --img 128 --batch-size 32 --task val, conf 0.001, IoU 0.6, fp32."""
    data = shapes_val_split(tmp_path)
    results, _, _ = val.run(data, weights=str(WEIGHTS), imgsz=128, batch_size=32, task="val", half=False,
                            workers=0, plots=False, project=str(tmp_path / "runs"))
    ours = dict(zip(V60_METRICS, results[:4]))
    report = ", ".join(f"{k} {ours[k]:.6f} vs {v}" for k, v in V60_METRICS.items())
    for key, expected in V60_METRICS.items():
        assert abs(ours[key] - expected) <= METRIC_ATOL, report
        # stricter: v6.0 printed 3 significant figures; allow one unit in the last of them. (With PyTorch's
        # BatchNorm eps, P is 0.00467 and mAP@.5 0.00307: within METRIC_ATOL, but caught here.)
        unit = 10 ** (np.floor(np.log10(expected)) - 2)
        assert abs(ours[key] - expected) <= unit, report
