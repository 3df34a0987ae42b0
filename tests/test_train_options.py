"""train.py --image-weights, --quad, TensorBoard event files and labels_correlogram.jpg."""
from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from utils.datasets import LoadImagesAndLabels, image_weighted_indices, labels_to_class_weights
from utils.engine import Trainer
from utils.loggers import TensorBoardLogger, optional_loggers, results_columns
from utils.plots import _correlogram_canvas, plot_labels


def make_trainer(data, cfg, project, **extra) -> Trainer:
    """A Trainer built as train.py builds it, without its file-writing callbacks (no training yet)."""
    opt = train.parse_opt([])
    args = dict(data=str(data), cfg=str(cfg), weights="", imgsz=64, batch_size=8, epochs=1, workers=0,
                project=str(project), name="exp", device="cpu", noautoanchor=True)
    args.update(extra)
    for k, v in args.items():
        setattr(opt, k, v)
    opt, hyp, device = train.prepare_run(opt)
    return Trainer(opt, hyp, Path(opt.save_dir), device)


def one_class_labels(classes) -> list:
    return [np.array([[c, 0.5, 0.5, 0.2, 0.2]], dtype=np.float32) for c in classes]


def draw_share(labels, nc, maps, cls, epochs=200) -> float:
    """Share of drawn images whose (single) label is of class cls, over many epochs' draws."""
    rng = random.Random(0)
    drawn = [i for _ in range(epochs) for i in image_weighted_indices(labels, nc, maps, rng)]
    return np.mean([labels[i][0, 0] == cls for i in drawn])


def test_image_weights_follow_class_rarity_and_low_map():
    # 15 images of class 0, 5 of class 1: inverse frequency gives one image of class 1 three times the weight of
    # one of class 0, so each class gets half of the draws (15 x 1 vs 5 x 3)
    labels = one_class_labels([0] * 15 + [1] * 5)
    assert labels_to_class_weights(labels, 2) == pytest.approx([0.25, 0.75])
    assert draw_share(labels, 2, [0.0, 0.0], 1) == pytest.approx(0.5, abs=0.02)
    # equal frequency, class 0 well learnt (mAP 0.9): weights (1 - mAP)^2 = 0.01 vs 1 -> class 1 gets 1 / 1.01
    labels = one_class_labels([0] * 10 + [1] * 10)
    assert draw_share(labels, 2, [0.9, 0.0], 1) == pytest.approx(1 / 1.01, abs=0.005)


def test_image_weights_redraw_the_training_images_each_epoch(shapes_data, tiny_cfgs, tmp_path):
    trainer = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, image_weights=True)
    labels = trainer.dataset.labels
    counts = np.bincount(np.concatenate([lb[:, 0] for lb in labels]).astype(int), minlength=trainer.nc)
    weak = int(np.flatnonzero(counts)[np.argmin(counts[counts > 0])])  # the rarest class present
    with_weak = {trainer.dataset.im_files[i] for i, lb in enumerate(labels) if weak in lb[:, 0]}
    assert 0 < len(with_weak) < len(labels)
    trainer.maps = np.ones(trainer.nc)
    trainer.maps[weak] = 0.0  # every other class fully learnt: only images holding the weak class are drawn
    drawn = []
    trainer.callbacks.append(SimpleNamespace(on_train_batch_end=lambda tr, ni, imgs, targets, paths:
                                             drawn.extend(paths)))
    trainer.train_one_epoch(0)
    assert len(drawn) == len(labels)
    assert set(drawn) <= with_weak


def quad_batch():
    """Four 8x8 images, each with one object drawn as a filled rectangle of its own colour, and their targets."""
    items = []
    for k in range(4):
        im = torch.zeros(3, 8, 8, dtype=torch.uint8)
        x0, y0, w, h = k, 2, 4, 3 + (k % 2)  # pixel box
        im[:, y0:y0 + h, x0:x0 + w] = torch.tensor([40 * (k + 1), 200 - 40 * k, 17 * k + 5]).view(3, 1, 1)
        target = torch.tensor([[0, k, (x0 + w / 2) / 8, (y0 + h / 2) / 8, w / 8, h / 8]])
        items.append((im, target, f"im{k}.jpg", None))
    return items


def test_quad_collate_tiles_four_images_and_moves_their_labels(monkeypatch):
    items = quad_batch()
    monkeypatch.setattr(random, "random", lambda: 0.9)  # the 2x2 tiling branch
    imgs, targets, paths, shapes = LoadImagesAndLabels.collate_fn4(items + items)
    assert imgs.shape == (2, 3, 16, 16) and imgs.dtype == torch.uint8
    assert paths == ("im0.jpg", "im0.jpg") and len(shapes) == 2
    assert targets[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for t in targets:  # each box must frame exactly the pixels of its own object's colour
        k = int(t[1])
        x1, y1 = round(float((t[2] - t[4] / 2) * 16)), round(float((t[3] - t[5] / 2) * 16))
        x2, y2 = round(float((t[2] + t[4] / 2) * 16)), round(float((t[3] + t[5] / 2) * 16))
        colour = items[k][0][:, 2, k]  # the object's colour in its source image
        region = imgs[int(t[0]), :, y1:y2, x1:x2]
        assert region.numel() and (region == colour.view(3, 1, 1)).all()
        mask = (imgs[int(t[0])] == colour.view(3, 1, 1)).all(0)
        assert mask.sum() == (x2 - x1) * (y2 - y1)  # and no pixel of that colour lies outside it


def test_quad_collate_upsamples_one_image_and_handles_short_batches(monkeypatch):
    items = quad_batch()
    monkeypatch.setattr(random, "random", lambda: 0.1)  # the upsampling branch
    imgs, targets, paths, _ = LoadImagesAndLabels.collate_fn4(items)
    expected = torch.nn.functional.interpolate(items[0][0][None].float(), scale_factor=2, mode="bilinear",
                                               align_corners=False).to(torch.uint8)
    assert torch.equal(imgs, expected)
    assert torch.equal(targets, items[0][1])  # normalised labels do not change with the image size
    short, short_targets, short_paths, _ = LoadImagesAndLabels.collate_fn4(quad_batch()[:3])
    assert short.shape == (1, 3, 16, 16) and short_paths == ("im0.jpg",) and short_targets[:, 1].tolist() == [0]


def test_quad_run_trains_on_double_size_images_with_4x_loss(shapes_data, tiny_cfgs, tmp_path, monkeypatch):
    trainer = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, quad=True)
    seen, scaled = [], []
    step = trainer.task.train_step

    def spy(module, imgs, targets):
        loss, items = step(module, imgs, targets)
        seen.append((imgs.shape, loss.detach().clone()))
        return loss, items

    monkeypatch.setattr(trainer.task, "train_step", spy)
    original_scale = trainer.scaler.scale
    monkeypatch.setattr(trainer.scaler, "scale", lambda loss: scaled.append(loss.detach().clone())
                        or original_scale(loss))
    results = trainer.fit()
    assert [s[0] for s in seen] == [(2, 3, 128, 128)] * 3  # 24 images, batch 8 -> 3 batches of 2 quads
    assert [float(x) for x in scaled] == pytest.approx([4 * float(s[1]) for s in seen])
    assert len(results) == 7 and (trainer.save_dir / "weights" / "last.pt").exists()


def test_bad_quad_and_image_weights_options_say_the_fix(shapes_data, tmp_path, monkeypatch):
    opt = train.parse_opt(["--data", str(shapes_data), "--quad", "--batch-size", "2", "--project", str(tmp_path)])
    with pytest.raises(ValueError, match="at least 4"):
        train.prepare_run(opt)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    opt = train.parse_opt(["--data", str(shapes_data), "--image-weights", "--project", str(tmp_path)])
    with pytest.raises(ValueError, match="single process"):
        train.prepare_run(opt)


class FakeWriter:
    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_logger_writes_the_results_columns(tmp_path):
    logger = TensorBoardLogger(tmp_path, FakeWriter)
    trainer = SimpleNamespace(task=SimpleNamespace(loss_names=("box_loss", "obj_loss", "cls_loss")), amp=False)
    values = {"train": [1, 2, 3], "metrics": [0.4, 0.5, 0.6, 0.7], "val": [8, 9, 10], "lr": [0.1, 0.2, 0.3]}
    logger.on_fit_epoch_end(trainer, 5, values, 0.0)
    logger.on_train_end(trainer)
    expected = dict(zip(results_columns(trainer.task.loss_names)[1:], [1, 2, 3, 0.4, 0.5, 0.6, 0.7, 8, 9, 10,
                                                                         0.1, 0.2, 0.3, 0]))
    assert {tag: value for tag, value, _ in logger.writer.scalars} == pytest.approx(expected)
    assert {step for _, _, step in logger.writer.scalars} == {5}
    assert logger.writer.log_dir == str(tmp_path) and logger.writer.closed


def test_without_tensorboard_training_goes_on_silently(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    assert optional_loggers(tmp_path) == []
    assert not caplog.records


def test_tensorboard_event_files_when_installed(shapes_data, tiny_cfgs, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    opt = train.run(data=str(shapes_data), cfg=str(tiny_cfgs["student"]), weights="", imgsz=64, batch_size=8,
                    epochs=1, workers=0, device="cpu", project=str(tmp_path), noautoanchor=True)
    assert list(Path(opt.save_dir).glob("events.out.tfevents.*"))


def test_labels_correlogram_places_the_boxes(tmp_path):
    # all boxes at x = 0.25, y = 0.75, w = 0.5, h = 0.125; cell (row i, column j) bins column j across, i upward
    labels = np.tile(np.array([[0, 0.25, 0.75, 0.5, 0.125]], dtype=np.float32), (50, 1))
    cell = 32
    canvas = _correlogram_canvas(labels[:, 1:5], cell)
    assert canvas.shape == (4 * cell, 4 * cell, 3)
    darkest = {}
    for i, j in ((1, 0), (3, 2), (2, 1)):  # (y vs x), (height vs width), (width vs y)
        tile = canvas[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].sum(-1)
        row, col = np.unravel_index(np.argmin(tile), tile.shape)
        darkest[(i, j)] = (cell - 1 - row, col)  # (vertical bin from the bottom, horizontal bin)
    assert darkest[(1, 0)] == (int(0.75 * cell), int(0.25 * cell))
    assert darkest[(3, 2)] == (int(0.125 * cell), int(0.5 * cell))
    assert darkest[(2, 1)] == (int(0.5 * cell), int(0.75 * cell))
    assert (canvas[:cell, cell:] == 1).all()  # above the diagonal: blank
    plot_labels(labels, ["a"], tmp_path)
    assert (tmp_path / "labels.jpg").exists() and (tmp_path / "labels_correlogram.jpg").stat().st_size > 0
