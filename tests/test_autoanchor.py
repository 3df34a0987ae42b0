"""Tests for utils/autoanchor.py: ratio metrics, k-means, evolution and the in-place anchor check."""
import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn as nn

from models.yolo import Model
from utils.autoanchor import (anchor_fitness, anchor_metrics, check_anchors, evolve_anchors, kmean_anchors, kmeans,
                              label_wh)
from utils.general import LOGGER, ROOT, yaml_load

# YOLOv5 v6.0 default anchors in pixels, P3/8, P4/16, P5/32
DEFAULT_ANCHORS = np.array([[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119],
                            [116, 90], [156, 198], [373, 326]], dtype=float)
# Long thin boxes: none of the default anchors is within 4x of both sides, except for the square cluster.
ELONGATED = [(6, 200), (200, 6), (12, 400), (400, 12), (40, 40)]


@dataclass
class FakeDataset:
    """The two attributes AutoAnchor reads from a LoadImagesAndLabels dataset."""
    shapes: np.ndarray
    labels: list = field(default_factory=list)


def make_dataset(sizes_px, per_size=30, imgsz=640, jitter=0.03, seed=0, image_shape=(1280, 960)):
    """A dataset whose boxes, once letterboxed to imgsz, have the given pixel sizes (+-jitter relative)."""
    rng = np.random.default_rng(seed)
    shape = np.array(image_shape, dtype=float)
    scaled = imgsz * shape / shape.max()  # image (w, h) after resizing the long side to imgsz
    wh = np.repeat(np.asarray(sizes_px, dtype=float), per_size, 0)
    wh = wh * rng.uniform(1 - jitter, 1 + jitter, size=wh.shape)
    labels = []
    for chunk in np.array_split(wh, 6):  # spread the boxes over a few images
        n = len(chunk)
        labels.append(np.column_stack([np.zeros(n), np.full(n, 0.5), np.full(n, 0.5), chunk / scaled]))
    return FakeDataset(shapes=np.tile(shape, (len(labels), 1)), labels=labels), wh


@pytest.fixture(scope="module")
def pristine_model():
    """Built once per module (the dry forward pass dominates); tests modify deep copies."""
    return Model(str(ROOT / "models" / "yolov5n.yaml"), nc=2)


@pytest.fixture
def tiny_model(pristine_model):
    return lambda: copy.deepcopy(pristine_model)


def pixel_anchors(model):
    m = model.model[-1]
    return (m.anchors * m.stride.view(-1, 1, 1)).view(-1, 2)


@pytest.fixture
def log_lines():
    """Messages logged on the project LOGGER during a test (works whether or not it propagates to root)."""
    lines = []

    class _Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, level = _Collect(level=logging.DEBUG), LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    yield lines
    LOGGER.removeHandler(handler)
    LOGGER.setLevel(level)


def clustered_wh(centres, per_cluster=40, spread=0.01, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.asarray(centres, dtype=float)
    return np.concatenate([c * (1 + spread * rng.standard_normal((per_cluster, 2))) for c in centres])


def test_anchor_metrics_hand_case():
    anchors = np.array([[10, 10], [20, 20], [40, 40]], dtype=float)
    bpr, aat = anchor_metrics(anchors, anchors.copy(), thr=4.0)
    assert bpr == 1.0
    # ratios to (10, 20, 40): 10 -> 1, .5, .25; 20 -> .5, 1, .5; 40 -> .25, .5, 1. Strictly above 1/4 counts.
    assert aat == pytest.approx((2 + 3 + 2) / 3)
    too_big = anchors.max() * 10 * np.array([[1.0, 1.0], [1.0, 2.0], [3.0, 1.0]])  # 10x the largest anchor, or more
    bpr, aat = anchor_metrics(torch.tensor(anchors), torch.tensor(too_big), thr=4.0)
    assert bpr == 0.0 and aat == 0.0


def test_anchor_metrics_uses_worst_side():
    anchors = np.array([[10.0, 10.0]])
    # width matches exactly but height is 5x off: the worst side decides, so no match
    bpr, _ = anchor_metrics(anchors, np.array([[10.0, 50.0], [10.0, 30.0]]), thr=4.0)
    assert bpr == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one label"):
        anchor_metrics(anchors, np.zeros((0, 2)))


def test_anchor_fitness_matches_definition():
    rng = np.random.default_rng(3)
    wh, k = rng.uniform(3, 300, (500, 2)), rng.uniform(3, 300, (9, 2))
    r = wh[:, None] / k[None]
    best = np.minimum(r, 1 / r).min(2).max(1)
    assert anchor_fitness(k, wh, thr=4.0) == pytest.approx((best * (best > 0.25)).mean(), rel=1e-5)


def test_label_wh_letterbox_and_random_scale():
    ds = FakeDataset(shapes=np.array([[1280.0, 960.0]]), labels=[np.array([[0, 0.5, 0.5, 0.5, 0.25]])])
    np.testing.assert_allclose(label_wh(ds, imgsz=640), [[320.0, 120.0]])
    scaled = label_wh(ds, imgsz=640, rng=np.random.default_rng(0))
    factor = scaled / np.array([[320.0, 120.0]])
    assert 0.9 <= factor[0, 0] <= 1.1 and factor[0, 0] == pytest.approx(factor[0, 1])  # one factor per image
    with pytest.raises(ValueError, match="one to one"):
        label_wh(FakeDataset(shapes=np.ones((2, 2)), labels=[np.zeros((0, 5))]))


@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_kmeans_recovers_tight_clusters(k):
    rng = np.random.default_rng(k)
    widths = 8 * 1.8 ** np.arange(k)  # 8 ... ~880 px, well apart
    centres = np.column_stack([widths, widths * rng.choice([0.5, 1.0, 2.0], size=k)])
    wh = clustered_wh(centres, seed=k)
    anchors = kmean_anchors(wh, n=k, gen=0, seed=0)
    assert anchors.shape == (k, 2)
    assert np.all(np.diff(anchors.prod(1)) >= 0)  # sorted by area
    rel = np.abs(anchors[None] - centres[:, None]).max(2) / centres[:, None].max(2)  # (centres, anchors)
    nearest = rel.argmin(1)
    assert len(set(nearest.tolist())) == k, "two clusters share one anchor"
    assert rel.min(1).max() < 0.03


def test_kmeans_restarts_on_a_subsample_still_fit_all_points():
    centres = np.array([[1.0, 1.0], [4.0, 1.0], [2.0, 5.0]])
    points = clustered_wh(centres, per_cluster=300, spread=0.02)
    found, distortion = kmeans(points, 3, np.random.default_rng(0), restart_sample=60)
    found = found[np.argsort(found[:, 0] + 10 * found[:, 1])]  # same order as centres
    np.testing.assert_allclose(found, centres, rtol=0.02)
    assert distortion < 0.1


def test_kmeans_raises_when_too_few_points():
    with pytest.raises(ValueError, match="distinct points"):
        kmeans(np.ones((5, 2)), 2, np.random.default_rng(0))


def test_tiny_labels_are_left_out_of_the_fit(log_lines):
    centres = [(20, 30), (80, 60), (200, 300)]
    wh = np.concatenate([clustered_wh(centres), np.full((200, 2), 1.5)])  # a big cluster of 1.5 px boxes
    anchors = kmean_anchors(wh, n=3, gen=0, seed=0)
    rel = np.abs(anchors - np.asarray(centres, dtype=float)).max(1) / np.asarray(centres).max(1)
    assert rel.max() < 0.03
    assert any("under 3 pixels" in line for line in log_lines)


def test_more_anchors_than_points_falls_back_with_warning(log_lines):
    wh = np.array([[10.0, 20.0], [50.0, 40.0], [120.0, 90.0], [300.0, 200.0]])
    anchors = kmean_anchors(wh, n=9, gen=50, seed=0)
    assert anchors.shape == (9, 2) and np.isfinite(anchors).all() and (anchors >= 2.0).all()
    assert np.all(np.diff(anchors.prod(1)) >= 0)
    assert any("distinct label sizes for 9 anchors" in line for line in log_lines)
    assert anchor_metrics(anchors, wh)[0] == 1.0


def test_evolution_never_lowers_fitness():
    wh = clustered_wh([(12, 40), (60, 30), (150, 220)], spread=0.1)
    start = np.array([[300.0, 20.0], [5.0, 5.0], [500.0, 500.0]])  # deliberately poor
    # the same seed replays the same mutations, so shorter runs are prefixes of longer ones
    fits = [anchor_fitness(evolve_anchors(start, wh, gen=g, rng=np.random.default_rng(7)), wh)
            for g in (0, 5, 25, 100, 400)]
    assert fits[0] == pytest.approx(anchor_fitness(start, wh))
    assert all(b >= a for a, b in zip(fits, fits[1:]))
    assert fits[-1] > fits[0]


def test_evolution_respects_minimum_anchor_size():
    wh = np.full((50, 2), 1.5)  # labels below the 2 px floor pull anchors down to it
    start = np.array([[3.0, 3.0], [4.0, 4.0]])
    evolved = evolve_anchors(start, wh, gen=300, rng=np.random.default_rng(0))
    assert evolved.min() >= 2.0
    assert evolved.min() < 2.2  # it did move down to the floor


def test_kmean_anchors_is_deterministic_and_leaves_global_rng_alone():
    wh = clustered_wh([(12, 40), (60, 30), (150, 220), (300, 120)], spread=0.1)
    state = np.random.get_state()
    a = kmean_anchors(wh, n=6, gen=200, seed=5)
    b = kmean_anchors(wh, n=6, gen=200, seed=5)
    np.testing.assert_array_equal(a, b)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]


def test_check_anchors_keeps_good_anchors(tiny_model, log_lines):
    model = tiny_model()
    np.testing.assert_allclose(pixel_anchors(model).numpy(), DEFAULT_ANCHORS, rtol=1e-6)
    dataset, _ = make_dataset(DEFAULT_ANCHORS, per_size=10, jitter=0.05)
    before = model.model[-1].anchors.clone()
    assert check_anchors(dataset, model, thr=4.0, imgsz=640) is False
    assert torch.equal(model.model[-1].anchors, before)
    assert any("anchors/target" in s and "Best Possible Recall (BPR)" in s and "good fit" in s for s in log_lines)


def test_check_anchors_replaces_poor_anchors(tiny_model, log_lines):
    model = tiny_model()
    m = model.model[-1]
    dataset, wh = make_dataset(ELONGATED, per_size=30)
    old_bpr, _ = anchor_metrics(pixel_anchors(model), wh)
    assert old_bpr < 0.5  # the fixture really is a poor fit
    assert check_anchors(dataset, nn.DataParallel(model), thr=4.0, imgsz=640) is True
    assert m.anchors.shape == (3, 3, 2) and m.anchors.dtype == torch.float32
    new_px = pixel_anchors(model)
    assert anchor_metrics(new_px, wh)[0] > 0.98
    # stored in grid units: multiplying by the stride gives back the fitted pixel anchors
    np.testing.assert_allclose(new_px.numpy(), kmean_anchors(dataset, n=9, img_size=640, seed=0), rtol=1e-5)
    area = m.anchors.prod(-1).mean(-1) * m.stride ** 2  # mean pixel area per level
    assert torch.all(area[1:] >= area[:-1]) and torch.all(m.stride[1:] > m.stride[:-1])
    assert any("New anchors saved" in s for s in log_lines)


def test_check_anchors_orders_levels_by_stride_when_strides_descend():
    cfg = yaml_load(ROOT / "models" / "yolov5n.yaml")
    cfg["head"][-1][0] = cfg["head"][-1][0][::-1]  # Detect(P5, P4, P3): strides 32, 16, 8
    cfg["anchors"] = cfg["anchors"][::-1]
    model = Model(cfg, nc=2)
    m = model.model[-1]
    assert m.stride.tolist() == [32.0, 16.0, 8.0]
    dataset, wh = make_dataset(ELONGATED, per_size=20)
    assert check_anchors(dataset, model) is True
    area = m.anchors.prod(-1).mean(-1) * m.stride ** 2  # mean pixel area per level
    assert torch.all(area[1:] <= area[:-1]), "largest anchors must sit on the stride-32 level"
    assert anchor_metrics(pixel_anchors(model), wh)[0] > 0.98


def test_check_anchors_is_deterministic(tiny_model):
    dataset, _ = make_dataset(ELONGATED, per_size=20, seed=1)
    first, second = tiny_model(), tiny_model()
    assert check_anchors(dataset, first, seed=3) and check_anchors(dataset, second, seed=3)
    assert torch.equal(first.model[-1].anchors, second.model[-1].anchors)


def test_check_anchors_without_labels_is_a_no_op(tiny_model, log_lines):
    model = tiny_model()
    before = model.model[-1].anchors.clone()
    empty = FakeDataset(shapes=np.full((2, 2), 640.0), labels=[np.zeros((0, 5)), np.zeros((0, 5))])
    assert check_anchors(empty, model) is False
    assert torch.equal(model.model[-1].anchors, before)
    assert any("no labels" in s for s in log_lines)
