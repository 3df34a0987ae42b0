"""Test-time augmentation (YOLOv5 v6.0's --augment): image scaling, box counts, mapping back, val/detect runs."""
import cv2
import numpy as np
import pytest
import torch

import detect
import val
from models.yolo import Model, _descale_pred, scale_img
from tests.conftest import tiny_model_cfg
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.general import yaml_load


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Model(tiny_model_cfg(nc=2)).eval()


def test_scale_img_resizes_then_pads_with_grey():
    img = torch.ones(1, 3, 64, 96)
    out = scale_img(img, 0.83, gs=32)
    # by hand: 64 * 0.83 = 53.12 -> 53 rows, 96 * 0.83 = 79.68 -> 79 columns, padded up to 64 x 96 (multiples of 32)
    assert out.shape == (1, 3, 64, 96)
    assert torch.allclose(out[..., :53, :79], torch.ones(1)) and torch.all(out[..., 53:, :] == 0.447)
    assert torch.all(out[..., :, 79:] == 0.447)
    assert scale_img(img, 1, gs=32) is img
    assert scale_img(img, 0.67, gs=32).shape == (1, 3, 64, 96)  # 42.88 -> 64 rows, 64.32 -> 96 columns


def test_augmented_box_count_by_grid_sizes(model):
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        plain, _ = model(x)
        augmented, raw = model(x, augment=True)
    # 3 anchors per cell, strides 8/16/32. By hand:
    #   scale 1    : 64x128 -> P3 8x16=128, P4 4x8=32, P5 2x4=8 cells; its P5 level is dropped -> 3*(128+32) = 480
    #   scale 0.83 : 53x106 padded to 64x128 -> all levels            -> 3*(128+32+8) = 504
    #   scale 0.67 : 42x85 padded to 64x96 -> P3 8x12=96, P4 4x6=24, P5 2x3=6; its P3 level is dropped -> 3*30 = 90
    assert raw is None and augmented.shape == (1, 480 + 504 + 90, 7)
    assert torch.equal(augmented[:, :480], plain[:, :480])  # the first pass is the plain forward, minus P5
    assert plain.shape[1] == 3 * (128 + 32 + 8)


def test_augment_needs_eval_mode():
    m = Model(tiny_model_cfg(nc=2)).train()
    with pytest.raises(ValueError, match="eval"):
        m(torch.zeros(1, 3, 64, 64), augment=True)


def _fake_detector(strides=(8, 16, 32), na=3):
    """A stand-in for Model._forward_once: every box is the bright rectangle found in the image (x1 y1 x2 y2
    of pixels > 0.5), column 4 the level index and column 5 the pass number, with raw maps of the real shapes."""
    calls = []

    def forward_once(xi):
        ys, xs = torch.where(xi[0, 0] > 0.5)
        x1, y1, x2, y2 = float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1
        box = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        decoded, raw = [], []
        for level, s in enumerate(strides):
            ny, nx = xi.shape[2] // s, xi.shape[3] // s
            rows = torch.zeros(na * ny * nx, 7)
            rows[:, :4], rows[:, 4], rows[:, 5] = box, level, len(calls)
            decoded.append(rows)
            raw.append(torch.zeros(1, na, ny, nx, 7))
        calls.append(tuple(xi.shape[2:]))
        return torch.cat(decoded)[None], raw

    return forward_once, calls


def test_augmented_boxes_map_back_to_the_original_frame(monkeypatch):
    m = Model(tiny_model_cfg(nc=2)).eval()
    forward_once, calls = _fake_detector()
    monkeypatch.setattr(m, "_forward_once", forward_once)
    x = torch.zeros(1, 3, 64, 128)
    x[..., 20:40, 10:30] = 1.0  # off-centre: a missed un-flip would put it at x = 128 - 20 = 108
    out, _ = m(x, augment=True)
    assert calls == [(64, 128), (64, 128), (64, 96)]
    expected = torch.tensor([20.0, 30.0, 20.0, 20.0])  # xywh of the rectangle in the original image
    assert torch.allclose(out[0, :, :4], expected, atol=2.0)  # resize blur: at most ~1 px / 0.67
    # which levels survive: pass 0 drops its P5 (level 2), pass 2 its P3 (level 0); counts as in the test above
    kept = {(int(p), int(lv)): int(n) for (p, lv), n in zip(*np.unique(out[0, :, [5, 4]].numpy(), axis=0,
                                                                           return_counts=True))}
    assert kept == {(0, 0): 3 * 128, (0, 1): 3 * 32, (1, 0): 3 * 128, (1, 1): 3 * 32, (1, 2): 3 * 8,
                    (2, 1): 3 * 24, (2, 2): 3 * 6}


def test_descale_pred_inverts_scale_and_flips():
    p = torch.tensor([[[30.0, 10.0, 8.0, 4.0, 0.5, 1.0]]])  # one box predicted on a 0.5x image
    size = (50, 100)  # original (h, w)
    assert _descale_pred(p, None, 0.5, size)[0, 0].tolist() == [60.0, 20.0, 16.0, 8.0, 0.5, 1.0]
    assert _descale_pred(p, 3, 0.5, size)[0, 0, :2].tolist() == [100 - 60.0, 20.0]  # left-right mirror
    assert _descale_pred(p, 2, 0.5, size)[0, 0, :2].tolist() == [60.0, 50 - 20.0]  # up-down mirror


@pytest.fixture(scope="module")
def shapes_weights(shapes_data, tmp_path_factory):
    torch.manual_seed(0)
    model = Model(tiny_model_cfg(nc=yaml_load(shapes_data)["nc"]))
    return str(save_checkpoint(build_checkpoint(model), tmp_path_factory.mktemp("tta") / "tiny.pt"))


def _count_augmented_calls(monkeypatch):
    calls = []
    original = Model._forward_augment

    def spy(self, x):
        calls.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(Model, "_forward_augment", spy)
    return calls


def test_val_augment_end_to_end(shapes_data, shapes_weights, tmp_path, monkeypatch):
    calls = _count_augmented_calls(monkeypatch)
    results, maps, _ = val.run(str(shapes_data), weights=shapes_weights, batch_size=4, imgsz=64, device="cpu",
                               workers=0, project=tmp_path, name="aug", plots=False, augment=True)
    assert len(calls) == 2 and calls[0][0] == 4  # 8 val images in batches of 4, every batch augmented
    assert len(results) == 7 and all(np.isfinite(results[:4]))


def test_val_augment_with_an_ensemble_warns_and_runs_plain(shapes_data, shapes_weights, tmp_path, monkeypatch,
                                                           caplog):
    calls = _count_augmented_calls(monkeypatch)
    val.run(str(shapes_data), weights=[shapes_weights, shapes_weights], batch_size=8, imgsz=64, device="cpu",
            workers=0, project=tmp_path, plots=False, augment=True)
    assert not calls and "--augment needs a single PyTorch checkpoint, not a Ensemble" in caplog.text


def test_detect_augment_end_to_end(shapes_weights, tmp_path, monkeypatch):
    calls = _count_augmented_calls(monkeypatch)
    cv2.imwrite(str(tmp_path / "a.jpg"), np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    save_dir = detect.run(weights=shapes_weights, source=str(tmp_path / "a.jpg"), imgsz=64, conf_thres=0.0,
                          max_det=5, save_txt=True, augment=True, project=tmp_path / "runs", name="exp")
    assert calls == [(1, 3, 64, 64)]
    rows = np.loadtxt(save_dir / "labels" / "a.txt", ndmin=2)
    assert 1 <= len(rows) <= 5 and rows[:, 1:5].min() >= 0 and rows[:, 1:5].max() <= 1
