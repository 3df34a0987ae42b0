"""val.py: prediction-to-label matching, the metric path, and tiny end-to-end runs on a synthetic dataset."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import val
from utils.metrics import ap_per_class

IOUV = torch.linspace(0.5, 0.95, 10)
CEILING = 0.995  # YOLOv5's 101-point AP of a perfect curve, see tests/test_metrics.py


def test_process_batch_matches_once_by_confidence_order_like_v60():
    labels = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0], [1, 20.0, 20.0, 30.0, 30.0]])
    detections = torch.tensor([
        [0.0, 0.0, 10.0, 6.2, 0.9, 0],  # on label 0, IoU 0.62, most confident
        [0.0, 0.0, 10.0, 8.8, 0.8, 0],  # on label 0, IoU 0.88
        [20.0, 20.0, 30.0, 30.0, 0.7, 0],  # on label 1 exactly, wrong class
        [20.0, 20.0, 30.0, 29.7, 0.6, 1],  # on label 1, IoU 0.97, right class
    ])
    correct = val.process_batch(detections, labels, IOUV)
    t, f = True, False
    expected = torch.tensor([
        [t, t, t, f, f, f, f, f, f, f],  # wins label 0 (it comes first); correct where IoU 0.62 qualifies
        [f] * 10,  # v6.0 matches once at IoU 0.5: label 0 is taken, no re-matching at higher thresholds
        [f] * 10,
        [t] * 10,
    ])
    assert torch.equal(correct, expected)


def test_process_batch_one_detection_per_label_and_no_labels():
    labels = torch.tensor([[0, 0.0, 0.0, 10.0, 10.0]])
    duplicates = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0], [0.0, 0.0, 10.0, 10.0, 0.8, 0]])
    correct = val.process_batch(duplicates, labels, IOUV)
    assert correct[0].all() and not correct[1].any()
    none = val.process_batch(duplicates, torch.zeros((0, 5)), IOUV)
    assert none.shape == (2, 10) and not none.any()


def test_ground_truth_as_predictions_gives_the_ceiling():
    # Three images' labels fed back as predictions through the same matching and ap_per_class path.
    g = torch.Generator().manual_seed(0)
    stats = []
    for _ in range(3):
        xy = torch.rand(5, 2, generator=g) * 100
        boxes = torch.cat((xy, xy + torch.rand(5, 2, generator=g) * 50 + 5), 1)
        cls = torch.randint(0, 3, (5, 1), generator=g).float()
        labels = torch.cat((cls, boxes), 1)
        dets = torch.cat((boxes, torch.rand(5, 1, generator=g) * 0.5 + 0.5, cls), 1)
        dets = dets[dets[:, 4].argsort(descending=True)]
        correct = val.process_batch(dets, labels, IOUV)
        stats.append((correct.numpy(), dets[:, 4].numpy(), dets[:, 5].numpy(), labels[:, 0].numpy()))
    stats = [np.concatenate(x, 0) for x in zip(*stats)]
    p, r, ap, f1, classes = ap_per_class(*stats)
    assert np.allclose(ap, CEILING) and np.allclose(p, 1) and np.allclose(r, 1, atol=1e-6)


def test_output_to_target_and_coco_ids():
    out = [torch.tensor([[10.0, 20.0, 30.0, 60.0, 0.5, 2]]), torch.zeros((0, 6))]
    t = val.output_to_target(out)
    assert torch.allclose(t, torch.tensor([[0, 2, 20.0, 40.0, 20.0, 40.0, 0.5]]))
    ids = val.coco80_to_coco91_class()
    assert len(ids) == 80 and ids[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and ids[-1] == 90


# ----------------------------------------------------------------------------------------------------------------
# End to end on a synthetic dataset: black images with a filled red (class 0) and/or green (class 1) rectangle.
# Sizes are at most the 64-px input, so the loader letterboxes without resizing: pixels survive exactly.

IMAGES = {  # name: ((h, w), [(cls, x1, y1, x2, y2) inclusive pixel corners])
    "a": ((64, 64), [(0, 5, 8, 20, 30), (1, 30, 34, 60, 50)]),
    "b": ((64, 64), [(1, 10, 10, 40, 20)]),
    "c": ((32, 64), [(0, 2, 3, 12, 28), (1, 40, 5, 63, 20)]),
    "d": ((32, 64), [(0, 20, 10, 50, 25)]),
    "e": ((64, 32), []),  # background only
}


def _write_dataset(root):
    import cv2

    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for name, ((h, w), boxes) in IMAGES.items():
        im = np.zeros((h, w, 3), np.uint8)
        lines = []
        for c, x1, y1, x2, y2 in boxes:
            cv2.rectangle(im, (x1, y1), (x2, y2), (0, 0, 255) if c == 0 else (0, 255, 0), thickness=-1)  # BGR
            xc, yc, bw, bh = (x1 + x2 + 1) / 2 / w, (y1 + y2 + 1) / 2 / h, (x2 + 1 - x1) / w, (y2 + 1 - y1) / h
            lines.append(f"{c} {xc:.6f} {yc:.6f} {bw:.6f} {bh:.6f}")
        cv2.imwrite(str(root / "images" / "val" / f"{name}.png"), im)
        (root / "labels" / "val" / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return {"path": str(root), "train": "images/val", "val": "images/val", "nc": 2, "names": ["red", "green"]}


class OracleModel(nn.Module):
    """Finds the red and green rectangles in the input and reports them as certain detections."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.names, self.nc = ["red", "green"], 2

    def forward(self, im, augment=False):
        bs = im.shape[0]
        out = torch.zeros(bs, 2, 7)
        for i in range(bs):
            r, g, b = im[i].float()
            for c, mask in enumerate(((r > 0.5) & (g < 0.3), (g > 0.5) & (r < 0.3))):
                ys, xs = torch.where(mask)
                if len(xs):
                    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                    out[i, c, :4] = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)).float()
                    out[i, c, 4] = 1.0
                    out[i, c, 5 + c] = 1.0
        return out.to(im.device), []


@pytest.fixture()
def dataset(tmp_path):
    pytest.importorskip("utils.datasets")
    return _write_dataset(tmp_path / "data")


def test_oracle_end_to_end_scores_the_ceiling(dataset, tmp_path):
    save_dir = tmp_path / "out"
    results, maps, times = val.run(dataset, batch_size=2, imgsz=64, model=OracleModel(), save_dir=save_dir,
                                   workers=0, plots=True, save_txt=True, save_conf=True, save_json=True)
    mp, mr, map50, map_, *losses = results
    assert (mp, mr) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert (map50, map_) == pytest.approx((CEILING, CEILING))
    assert np.allclose(maps, CEILING) and maps.shape == (2,)
    assert losses == [0.0, 0.0, 0.0] and len(times) == 3
    for f in ("confusion_matrix.png", "PR_curve.png", "F1_curve.png", "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert (save_dir / f).is_file(), f
    # --save-txt --save-conf: the original label lines come back (normalised to the original image) with conf 1
    for name, (_, boxes) in IMAGES.items():
        txt = save_dir / "labels" / f"{name}.txt"
        if not boxes:
            assert not txt.exists()
            continue
        got = sorted(tuple(float(v) for v in line.split()) for line in txt.read_text().splitlines())
        want = sorted(tuple(float(v) for v in line.split()) + (1.0,) for line in
                      (tmp_path / "data" / "labels" / "val" / f"{name}.txt").read_text().splitlines())
        assert np.allclose(got, want, atol=1e-4), name
    # --save-json: COCO rows with top-left xywh in original pixels
    rows = json.loads((save_dir / "_predictions.json").read_text())
    assert len(rows) == sum(len(b) for _, b in IMAGES.values())
    row = next(r for r in rows if r["image_id"] == "b")
    assert row["category_id"] == 1 and row["score"] == 1.0 and row["bbox"] == [10.0, 10.0, 31.0, 11.0]


def test_oracle_with_a_dropped_class_scores_half(dataset, tmp_path):
    class RedOnly(OracleModel):
        def forward(self, im, augment=False):
            out, raw = super().forward(im)
            out[:, 1, 4] = 0.0  # never reports green
            return out, raw

    results, maps, _ = val.run(dataset, batch_size=4, imgsz=64, model=RedOnly(), save_dir=tmp_path, workers=0,
                               plots=False)
    assert results[2] == pytest.approx(CEILING / 2) and maps.tolist() == pytest.approx([CEILING, 0.0])


@pytest.fixture(scope="module")
def tiny_model():
    from models.yolo import Model
    from utils.general import yaml_load

    torch.manual_seed(0)
    cfg = yaml_load("models/yolov5n.yaml")
    cfg.update(nc=2, width_multiple=0.125, depth_multiple=0.33)
    model = Model(cfg)
    model.names = ["red", "green"]
    model.hyp = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0, fl_gamma=0.0)
    return model


@pytest.fixture(scope="module")
def tiny_weights(tiny_model, tmp_path_factory):
    ckpt_mod = pytest.importorskip("utils.checkpoint")
    pytest.importorskip("models.experimental")
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    return str(ckpt_mod.save_checkpoint(ckpt_mod.build_checkpoint(tiny_model), path))


def test_training_call_returns_losses_and_keeps_the_model(dataset, tmp_path, tiny_model):
    from utils.datasets import create_dataloader
    from utils.loss import ComputeLoss

    model = tiny_model
    loader = create_dataloader(tmp_path / "data" / "images" / "val", 64, 4, 32, rect=True, pad=0.5, workers=0)[0]
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results, maps, times = val.run(dataset, batch_size=4, imgsz=64, model=model, dataloader=loader,
                                   save_dir=tmp_path, plots=False, compute_loss=ComputeLoss(model))
    assert len(results) == 7 and all(np.isfinite(results))
    assert all(0 <= v <= 1 for v in results[:4])
    assert results[5] > 0  # objectness loss of an untrained model
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "num_batches" not in k)


def test_standalone_from_checkpoint(dataset, tmp_path, tiny_weights):
    weights = tiny_weights
    results, maps, times = val.run(dataset, weights=str(weights), batch_size=4, imgsz=64, device="cpu",
                                   workers=0, project=tmp_path / "runs", name="exp", save_txt=True, plots=False)
    assert len(results) == 7 and maps.shape == (2,) and all(t >= 0 for t in times)
    assert results[4:] == (0.0, 0.0, 0.0)  # no compute_loss, no losses
    assert len(list((tmp_path / "runs" / "exp" / "labels").glob("*.txt"))) > 0  # untrained: low-conf boxes
    val.run(dataset, weights=str(weights), batch_size=4, imgsz=64, device="cpu", workers=0,
            project=tmp_path / "runs", name="exp", task="speed")
    assert (tmp_path / "runs" / "exp2").is_dir()  # incremented, and speed writes no plots
    assert not (tmp_path / "runs" / "exp2" / "confusion_matrix.png").exists()


def test_standalone_rejects_mismatched_classes(dataset, tmp_path, tiny_weights):
    three_classes = dict(dataset, nc=3, names=["red", "green", "blue"])
    with pytest.raises(ValueError, match="single-cls"):
        val.run(three_classes, weights=tiny_weights, imgsz=64, device="cpu", workers=0, project=tmp_path / "runs")


def test_parse_opt_defaults():
    opt = val.parse_opt(["--data", "x.yaml", "--weights", "a.pt", "--save-hybrid"])
    assert opt.conf_thres == 0.001 and opt.iou_thres == 0.6 and opt.batch_size == 32 and opt.imgsz == 640
    assert opt.save_txt and opt.weights == ["a.pt"] and opt.task == "val" and opt.half is False
