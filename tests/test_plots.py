"""Tests for utils/plots.py (annotation, mosaics, label and result plots) and utils/sources.py (LoadImages)."""
import logging

import cv2
import numpy as np
import pytest
import torch

from utils.general import LOGGER
from utils.plots import (RESULT_COLUMNS, Annotator, colors, plot_images, plot_labels, plot_results, read_results_csv,
                         extra_result_columns, save_one_box, smooth_curve)

RESULTS_HEADER = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision",
                  "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss",
                  "val/cls_loss", "x/lr0", "x/lr1", "x/lr2"]


def write_results_csv(path, epochs, extra=()):
    """A results.csv laid out like YOLOv5's: header names right-aligned in 20-character fields."""
    columns = RESULTS_HEADER + list(extra)
    rng = np.random.default_rng(len(columns) + epochs)
    lines = [",".join(f"{c:>20s}" for c in columns)]
    for e in range(epochs):
        values = [f"{e:>20d}"] + [f"{v:>20.5g}" for v in rng.uniform(0.01, 1.0, len(columns) - 1)]
        lines.append(",".join(values))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def near_colour(im, colour, tol=60):
    """Number of pixels within ``tol`` (L1 over channels) of a colour; JPEG shifts colours a little."""
    return int((np.abs(im.astype(int) - np.array(colour)).sum(-1) < tol).sum())


class CaptureWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_log():
    handler = CaptureWarnings()
    LOGGER.addHandler(handler)
    yield handler.messages
    LOGGER.removeHandler(handler)


def test_colors_palette_fixed_and_bgr_reversed():
    assert len({colors(i) for i in range(20)}) == 20
    assert colors(3) == colors(23)
    assert colors(5, bgr=True) == colors(5)[::-1]
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in colors(7))


def test_annotator_draws_inside_box_region_only():
    im = np.zeros((100, 120, 3), np.uint8)
    ann = Annotator(im, line_width=2)
    ann.box_label((30, 40, 80, 90), "cat", color=(0, 0, 255))
    out = ann.result()
    drawn = np.argwhere(out.any(-1))
    assert len(drawn)
    # The box outline is drawn on its edges; the label tab sits just above the box.
    assert drawn[:, 1].min() >= 28 and drawn[:, 0].max() <= 92
    assert out[40, 50].tolist() == [0, 0, 255] and out[90, 50].tolist() == [0, 0, 255]
    assert not out[65, 55].any()  # box interior untouched
    assert not out[:, :25].any() and not out[:, 85 + 30:].any()


def test_annotator_label_inside_when_box_touches_top():
    ann = Annotator(np.zeros((60, 60, 3), np.uint8), line_width=2)
    ann.box_label((5, 0, 50, 50), "dog", color=(255, 0, 0))
    assert ann.result()[1:10, 10:20, 0].max() == 255  # tab moved inside the box


def test_annotator_rejects_tensor():
    with pytest.raises(TypeError, match="numpy"):
        Annotator(torch.zeros(3, 10, 10))


def _batch(bs=4, h=64, w=96):
    return torch.full((bs, 3, h, w), 0.5)


@pytest.mark.parametrize("bs,grid", [(4, (2, 2)), (3, (2, 2)), (5, (2, 3))])
def test_plot_images_grid_size_labels(tmp_path, bs, grid):
    targets = torch.tensor([[i, i % 2, 0.5, 0.5, 0.6, 0.6] for i in range(bs)])
    fname = tmp_path / "train_batch0.jpg"
    plot_images(_batch(bs), targets, paths=[f"im{i}.jpg" for i in range(bs)], fname=fname, names=["a", "b"])
    im = cv2.imread(str(fname))
    assert im is not None and im.shape == (grid[0] * 64, grid[1] * 96, 3)
    assert near_colour(im, colors(0, bgr=True)) > 50 and near_colour(im, colors(1, bgr=True)) > 50


def test_plot_images_predictions_conf_filter_and_pixel_boxes(tmp_path):
    images = (np.ones((2, 3, 64, 64)) * 128).astype(np.uint8)
    # Pixel boxes; image 0 has a confident class-2 box, image 1 only a class-4 box below the 0.25 threshold.
    preds = np.array([[0, 2, 32, 32, 40, 40, 0.9], [1, 4, 32, 32, 40, 40, 0.1]], np.float32)
    fname = tmp_path / "val_batch0_pred.jpg"
    plot_images(images, preds, fname=fname)
    im = cv2.imread(str(fname))
    assert im.shape == (64, 128, 3)
    assert near_colour(im[:, :64], colors(2, bgr=True)) > 50
    assert near_colour(im[:, 64:], colors(4, bgr=True)) == 0


def test_plot_images_no_targets_and_shrink_to_max_size(tmp_path):
    fname = tmp_path / "b.jpg"
    plot_images(_batch(4, 128, 128), torch.zeros(0, 6), fname=fname, max_size=128)
    im = cv2.imread(str(fname))
    assert im.shape == (128, 128, 3)
    assert near_colour(im, colors(0, bgr=True)) == 0


def test_plot_images_bad_targets(tmp_path):
    with pytest.raises(ValueError, match="targets"):
        plot_images(_batch(1), torch.zeros(2, 5), fname=tmp_path / "x.jpg")


def test_save_one_box_crops_region(tmp_path):
    im = np.zeros((50, 50, 3), np.uint8)
    im[10:20, 10:30] = 200
    crop = save_one_box((10, 10, 30, 20), im, file=tmp_path / "c" / "a.jpg", gain=1.0, pad=0)
    assert crop.shape == (10, 20, 3) and crop.min() == 200
    assert (tmp_path / "c" / "a.jpg").is_file()


def test_plot_labels_writes_jpg(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.concatenate([rng.integers(0, 3, (200, 1)), rng.uniform(0.1, 0.5, (200, 4))], 1)
    out = plot_labels(torch.from_numpy(labels), names=["circle", "square", "三角形"], save_dir=tmp_path)
    assert out == tmp_path / "labels.jpg" and cv2.imread(str(out)) is not None


def test_plot_labels_empty_warns(tmp_path, warnings_log):
    assert plot_labels(np.zeros((0, 5)), save_dir=tmp_path) is None
    assert any("no labels" in m for m in warnings_log)
    assert not (tmp_path / "labels.jpg").exists()


def test_plot_results_with_and_without_kd(tmp_path):
    """One epoch without KD columns, several epochs with them: both plot, and KD columns add a row of panels."""
    plain = plot_results(file=write_results_csv(tmp_path / "a" / "results.csv", 1))
    kd = plot_results(file=write_results_csv(tmp_path / "b" / "results.csv", 7,
                                             ("train/kd_out", "train/kd_feat", "kd/total")))
    assert plain == tmp_path / "a" / "results.png" and kd == tmp_path / "b" / "results.png"
    plain_im, kd_im = cv2.imread(str(plain)), cv2.imread(str(kd))
    assert plain_im is not None and kd_im is not None
    assert plain_im.shape[1] > plain_im.shape[0]  # 2 rows x 5 columns -> wider than tall
    assert kd_im.shape[1] == plain_im.shape[1] and kd_im.shape[0] > plain_im.shape[0]


def test_extra_result_columns_generic(tmp_path):
    df = read_results_csv(write_results_csv(tmp_path / "results.csv", 2, ("train/kd_out", "kd/total", "foo")))
    assert "train/box_loss" in df.columns and "epoch" in df.columns  # header padding stripped
    assert extra_result_columns(df) == ["train/kd_out", "kd/total", "foo"]


def test_plot_results_dir_and_missing(tmp_path):
    write_results_csv(tmp_path / "results.csv", 4)
    write_results_csv(tmp_path / "results2.csv", 6)
    assert plot_results(dir=tmp_path).is_file()
    with pytest.raises(FileNotFoundError, match="results"):
        plot_results(file=tmp_path / "nope" / "results.csv")


def test_result_columns_and_smoothing():
    assert len(RESULT_COLUMNS) == 10 and RESULT_COLUMNS[8] == "metrics/mAP_0.5"
    y = np.array([0.0] * 10 + [10.0] * 10)
    s = smooth_curve(y)
    assert s.shape == y.shape and s[0] == 0 and s[-1] == 10
    assert 0 < s[10] < 10 and np.all(np.diff(s) >= 0)
    assert smooth_curve(np.array([3.0])).tolist() == [3.0]


# ---- utils/sources.py --------------------------------------------------------------------------------------------

@pytest.fixture
def sources():
    """utils.sources needs utils.augmentations.letterbox; skip these tests until it exists."""
    pytest.importorskip("utils.augmentations")
    return pytest.importorskip("utils.sources")


@pytest.fixture
def media(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), np.full((48, 80, 3), 60, np.uint8))
    cv2.imwrite(str(folder / "b.png"), np.full((100, 50, 3), 200, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_load_images_folder(sources, media):
    ds = sources.LoadImages(media, img_size=64, stride=32)
    items = list(ds)
    assert len(ds) == 2 and len(items) == 2 and ds.mode == "image"
    path, im, im0, cap, s = items[0]
    assert path.endswith("a.jpg") and cap is None and s.startswith("image 1/2") and path in s
    assert im0.shape == (48, 80, 3)
    assert im.dtype == np.uint8 and im.flags.c_contiguous and im.shape[0] == 3
    assert im.shape[1] % 32 == 0 and im.shape[2] == 64  # long side scaled to 64, short side padded to stride
    assert items[1][2].shape == (100, 50, 3) and items[1][1].shape[1] == 64


def test_load_images_rgb_order(sources, tmp_path):
    bgr = np.zeros((64, 64, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "blue.png"), bgr)
    _, im, im0, _, _ = next(iter(sources.LoadImages(tmp_path / "blue.png", img_size=64)))
    assert im0[0, 0].tolist() == [255, 0, 0] and im[:, 32, 32].tolist() == [0, 0, 255]


def test_load_images_glob(sources, media):
    ds = sources.LoadImages(str(media / "*.jpg"), img_size=64)
    assert [p for p, *_ in ds] == [str(media / "a.jpg")]


def test_load_images_video(sources, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for i in range(4):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    ds = sources.LoadImages(video, img_size=64)
    items = list(ds)
    assert len(ds) == 1 and len(items) == 4 and ds.mode == "video" and ds.frames == 4 and ds.frame == 4
    assert items[0][3] is not None and items[2][4].startswith("video 1/1 (3/4)")
    assert items[3][2].shape == (48, 64, 3)


def test_load_images_missing_path(sources, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.LoadImages(missing)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        sources.LoadImages(str(tmp_path / "*.jpg"))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="No images or videos"):
        sources.LoadImages(tmp_path)


def test_load_images_skips_corrupt(sources, media, warnings_log):
    (media / "broken.jpg").write_bytes(b"this is not a jpeg")
    items = list(sources.LoadImages(media, img_size=64))
    assert sorted(p.rsplit("/", 1)[-1] for p, *_ in items) == ["a.jpg", "b.png"]
    assert any("broken.jpg" in m for m in warnings_log)
