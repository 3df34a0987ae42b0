"""Distilling from a teacher trained on other classes (an 80-class COCO teacher for a 20-class VOC student)."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

import train_kd
from models.yolo import Model
from tests.conftest import tiny_model_cfg
from tests.test_kd_task import HYP, kd_args, save_model
from utils.general import yaml_load
from utils.kd.classmap import COCO_NAMES as COCO, VOC_NAMES as VOC
from utils.kd.distiller import KDConfig
from utils.kd.task import DistillationTask, load_teacher, teacher_class_index
from utils.loss import scale_hyp_gains

COCO_NAMES, VOC_NAMES = list(COCO), list(VOC)


def coco_voc_task(tmp_path, student_names=VOC_NAMES, teacher_names=COCO_NAMES, class_map_file=None):
    teacher = Model(tiny_model_cfg(len(teacher_names), 0.25))
    path = save_model(teacher, tmp_path / "teacher.pt", teacher_names)
    teacher = load_teacher(str(path), torch.device("cpu"))
    index = teacher_class_index(student_names, teacher.names, class_map_file)
    student = Model(tiny_model_cfg(len(student_names)))
    student.hyp = scale_hyp_gains({**HYP, "label_smoothing": 0.0}, 3, len(student_names), 64)
    student.gr = 1.0
    task = DistillationTask(student, teacher, KDConfig(), [], index)
    task.hyp = student.hyp
    task.setup(type("T", (), {"hyp": student.hyp})())
    task.on_epoch_start(0, 10)
    return task, index


def test_voc_student_maps_all_20_classes_to_coco(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="yolov5"):
        index = teacher_class_index(VOC_NAMES, COCO_NAMES)
    assert len(index) == 20 and min(index) >= 0
    assert COCO_NAMES[index[VOC_NAMES.index("aeroplane")]] == "airplane"
    assert COCO_NAMES[index[VOC_NAMES.index("tvmonitor")]] == "tv"
    assert "20/20 student classes matched" in caplog.text


def test_class_term_reads_only_mapped_channels(tmp_path):
    task, index = coco_voc_task(tmp_path)
    imgs = torch.rand(2, 3, 64, 64)
    targets = torch.zeros((0, 6))
    maps, _ = task.teacher_forward(imgs)
    unmapped = next(c for c in range(80) if c not in index)
    perturbed = [m.clone() for m in maps]
    for m in perturbed:
        m[..., 5 + unmapped] += 3.0
    from utils.kd.losses import output_kd_terms

    preds, _ = task.trainable(imgs)
    args = dict(kind="l2", t_cls_index=task.t_cls_index, t_obj_scale=False)
    cls_a = output_kd_terms(preds, maps, **args)[2]
    cls_b = output_kd_terms(preds, perturbed, **args)[2]
    assert torch.equal(cls_a, cls_b)
    # with objectness scaling on, mass on an unmapped class lowers the weight of everything in that cell
    scaled = [output_kd_terms(preds, m, kind="l2", t_cls_index=task.t_cls_index)[0] for m in (maps, perturbed)]
    assert scaled[1] < scaled[0]
    assert task.t_obj_scale, "a COCO teacher has classes the VOC student lacks"
    loss, items = task.train_step(task.trainable, imgs, targets)
    assert torch.isfinite(loss) and items[5] > 0


def test_student_class_missing_from_teacher_gets_no_class_kd(tmp_path):
    names = VOC_NAMES[:5] + ["unicorn"]
    task, index = coco_voc_task(tmp_path, names)
    assert index[-1] == -1
    imgs = torch.rand(2, 3, 64, 64)
    preds, _ = task.trainable(imgs)
    from utils.kd.losses import output_kd_terms

    t_maps, _ = task.teacher_forward(imgs)
    cls = output_kd_terms(preds, t_maps, kind="l2", t_cls_index=task.t_cls_index)[2]
    grads = torch.autograd.grad(cls, preds)
    assert all(torch.all(g[..., 5 + 5] == 0) for g in grads), "no class KD for the unmatched class"
    assert any(torch.any(g[..., 5] != 0) for g in grads)


def test_empty_overlap_stops_before_training(shapes_data, tiny_cfgs, tmp_path):
    teacher = save_model(Model(tiny_model_cfg(3, 0.25)), tmp_path / "t.pt", ["apple", "pear", "plum"])
    with pytest.raises(ValueError, match="share no names"):
        train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], teacher, tmp_path))
    assert not list(tmp_path.rglob("results.csv"))


def test_kd_run_with_superset_teacher(shapes_data, tiny_cfgs, tmp_path):
    names = list(yaml_load(shapes_data)["names"])
    teacher_names = ["zebra"] + names[::-1] + ["kite"]
    teacher = save_model(Model(tiny_model_cfg(len(teacher_names), 0.25)), tmp_path / "t.pt", teacher_names)
    opt = train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], teacher, tmp_path, feat_loss=["at"]))
    df = pd.read_csv(Path(opt.save_dir) / "results.csv")
    df.columns = [c.strip() for c in df.columns]
    assert df["train/kd_cls"].iloc[-1] > 0


def test_single_class_student_of_multi_class_teacher(tmp_path, caplog):
    teacher_names = [f"class{i}" for i in range(10)]
    with caplog.at_level(logging.INFO, logger="yolov5"):
        task, index = coco_voc_task(tmp_path, ["item"], teacher_names)
    assert index is None and task.single_class and task.t_cls_index is None
    assert "class KD is skipped" in caplog.text and "best-class confidence" in caplog.text
    imgs = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.3, 0.6, 0.2, 0.2]])
    preds, _ = task.trainable(imgs)
    t_maps, _ = task.teacher_forward(imgs)
    assert [m.shape[-1] for m in preds] == [6] * 3 and [m.shape[-1] for m in t_maps] == [15] * 3
    # the student's objectness learns p' = sigmoid(t_obj) * max_c sigmoid(t_c), weighted by p' (l2 on logit(p'))
    want_obj = 0.0
    for s, t in zip(preds, t_maps):
        p = t[..., 4].double().sigmoid() * t[..., 5:].double().sigmoid().amax(-1)
        want_obj += float(((s[..., 4].detach().double() - torch.log(p / (1 - p))) ** 2 * p).mean())
    loss, items = task.train_step(task.trainable, imgs, targets)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(items))
    assert items[5] == 0, "no class KD for a single-class student"
    assert items[3] > 0 and items[4] > 0
    gain = task.hyp.get("kd", 1.0) * task.cfg.alpha * task.factor * task.hyp["obj"]
    assert items[4].item() == pytest.approx(want_obj * gain, rel=1e-4)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in task.trainable.parameters() if p.grad is not None)


def test_single_class_student_with_class_map_distils_that_class(tmp_path):
    class_map = tmp_path / "map.yaml"
    class_map.write_text("item: person\n")
    task, index = coco_voc_task(tmp_path, ["item"], COCO_NAMES, str(class_map))
    assert index == [0] and not task.single_class and task.t_obj_scale
    loss, items = task.train_step(task.trainable, torch.rand(2, 3, 64, 64), torch.zeros((0, 6)))
    assert torch.isfinite(loss) and items[5] > 0


def test_kd_run_single_cls_student_multi_class_teacher(shapes_data, tiny_cfgs, tmp_path):
    names = list(yaml_load(shapes_data)["names"])
    assert len(names) > 1
    teacher = save_model(Model(tiny_model_cfg(len(names), 0.25)), tmp_path / "t.pt", names)
    opt = train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], teacher, tmp_path, feat_loss=["at"],
                                 single_cls=True))
    df = pd.read_csv(Path(opt.save_dir) / "results.csv")
    df.columns = [c.strip() for c in df.columns]
    assert (df["train/kd_cls"] == 0).all() and (df["train/kd_obj"] > 0).all()
    assert all(pd.notna(df[c]).all() for c in ("train/box_loss", "train/kd_box", "train/kd_feat"))
    ckpt = torch.load(Path(opt.save_dir) / "weights/last.pt", weights_only=True)
    assert ckpt["model"]["state_dict"]["model.24.m.0.weight"].shape[0] == 3 * 6, "student head has 1 class"
