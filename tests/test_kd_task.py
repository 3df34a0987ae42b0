"""Distillation on the engine: frozen teacher, gradients, adapters, hooks, compatibility errors, KD runs."""
from __future__ import annotations

import os
import subprocess
import sys
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import train_kd
from models.yolo import Model
from tests.conftest import tiny_model_cfg
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.general import yaml_load
from utils.kd.adapters import GenerativeAdapter
from utils.kd.distiller import KDConfig
from utils.kd.losses import NEEDS_ADAPTER, output_kd_terms
from utils.kd.pairing import pair_layers
from utils.kd.task import DistillationTask, check_teacher, load_teacher, teacher_class_index
from utils.loss import scale_hyp_gains

ROOT = Path(__file__).resolve().parents[1]
HYP = yaml_load(ROOT / "data/hyps/hyp.scratch.yaml")


def save_model(model, path, names=None):
    model.names = list(names or model.names)
    save_checkpoint(build_checkpoint(model), path)
    return path


def make_task(feat_losses=("at", "cwd", "mimic", "ft", "at_masked"), s_width=0.125, t_width=0.25, nc=3,
              tmp_path=None, teacher=None):
    """A task on tiny models; the teacher is load_teacher's (fused) unless one is given."""
    student = Model(tiny_model_cfg(nc, s_width))
    if teacher is None:
        teacher_path = save_model(Model(tiny_model_cfg(nc, t_width)), tmp_path / "teacher.pt")
        teacher = load_teacher(str(teacher_path), torch.device("cpu"))
    check_teacher(student, teacher)
    cfg = KDConfig(feat_losses=tuple(feat_losses))
    pairs = pair_layers(student, teacher, imgsz=64) if feat_losses else []
    task = DistillationTask(student, teacher, cfg, pairs)
    student.hyp = scale_hyp_gains({**HYP, "label_smoothing": 0.0}, 3, nc, 64)
    student.gr = 1.0
    task.setup(SimpleNamespace(hyp=student.hyp))
    return task


def batch(nc=3):
    imgs = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    return imgs, targets


FEATURE_LOSS_NAMES = ("at", "at_masked", "ft", "cwd", "mimic", "pkd", "mgd")


def assert_gradient_reaches_student_only(task, term, what, reaches=()):
    """Backpropagate one KD term on its own and check where gradient lands.

    The student's first conv must get gradient (the term flows through the whole student), as must every
    parameter of the modules in ``reaches``; the teacher must get none.
    """
    task.trainable.zero_grad(set_to_none=True)
    assert term.dim() == 0 and term.item() > 0, f"{what} is inactive, so it cannot show where gradient goes"
    term.backward(retain_graph=True)
    first = task.model.model[0].conv.weight.grad
    assert first is not None and first.abs().sum() > 0, f"{what} sends no gradient through the student"
    for module in reaches:
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{what} sends no gradient to {name}"
    assert all(not p.requires_grad and p.grad is None for p in task.teacher.parameters()), \
        f"{what} sends gradient to the teacher"


def test_train_step_reports_every_kd_term(tmp_path):
    task = make_task(tmp_path=tmp_path)
    imgs, targets = batch()
    task.on_epoch_start(0, 10)
    loss, items = task.train_step(task.trainable, imgs, targets)
    assert len(items) == len(task.loss_names) == 7
    assert torch.isfinite(loss) and torch.all(items[3:] > 0), "every KD term is active"


def test_teacher_forward_builds_no_graph(tmp_path):
    task = make_task(tmp_path=tmp_path)
    task.teacher.requires_grad_(True)  # even a teacher whose weights could take gradient records no graph
    try:
        t_maps, t_feats = task.teacher_forward(batch()[0])
    finally:
        task.teacher.requires_grad_(False)
    assert t_feats and all(not t.requires_grad and t.grad_fn is None for t in t_maps + t_feats)


@pytest.mark.parametrize("kind", ["l2", "kl", "bce"])
def test_each_output_kd_term_reaches_student_not_teacher(kind, tmp_path):
    task = make_task(feat_losses=(), tmp_path=tmp_path)
    imgs, _ = batch()
    task.on_epoch_start(0, 10)
    preds, _ = task.trainable(imgs)
    t_maps, _ = task.teacher_forward(imgs)
    terms = output_kd_terms(preds, t_maps, kind=kind, t_cls_index=task.t_cls_index, t_obj_scale=task.t_obj_scale)
    detect = task.model.model[-1]
    for what, term in zip(("box", "obj", "cls"), terms):
        assert_gradient_reaches_student_only(task, term, f"output KD {kind} {what}", reaches=(detect,))


def test_kd_box_ciou_changes_only_the_box_term(tmp_path):
    from dataclasses import replace

    task = make_task(feat_losses=(), tmp_path=tmp_path)
    imgs, targets = batch()
    task.on_epoch_start(0, 10)
    _, l2_items = task.train_step(task.trainable, imgs, targets)
    task.cfg = replace(task.cfg, box_loss="ciou")
    task.model.zero_grad()
    loss, items = task.train_step(task.trainable, imgs, targets)
    assert items[3] > 0 and not torch.isclose(items[3], l2_items[3]), "kd_box is the decoded-box term now"
    assert torch.allclose(items[:3], l2_items[:3]) and torch.allclose(items[4:], l2_items[4:])
    loss.backward()
    assert task.model.model[-1].m[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("field", ["obj_iou", "obj_all"])
def test_objectness_options_change_only_the_objectness_term(tmp_path, field):
    from dataclasses import replace

    task = make_task(feat_losses=(), tmp_path=tmp_path)
    imgs, targets = batch()
    task.on_epoch_start(0, 10)
    _, plain = task.train_step(task.trainable, imgs, targets)
    task.cfg = replace(task.cfg, **{field: True})
    _, items = task.train_step(task.trainable, imgs, targets)
    assert not torch.isclose(items[4], plain[4]), f"kd_obj has the {field} form now"
    if field == "obj_all":
        assert items[4] > plain[4], "kd_obj now counts every cell and the teacher's entropy"
    assert torch.allclose(items[[0, 1, 2, 3, 5, 6]], plain[[0, 1, 2, 3, 5, 6]])


def test_kd_box_flag_reaches_config():
    from utils.kd.task import kd_config_from_opt

    parser = train_kd.build_parser()
    assert kd_config_from_opt(parser.parse_args(["--kd_box", "l2"])).box_loss == "l2"
    assert kd_config_from_opt(parser.parse_args([])).box_loss == "ciou"  # the default since the demo measured it
    assert kd_config_from_opt(parser.parse_args(["--kd_obj_iou"])).obj_iou
    assert not kd_config_from_opt(parser.parse_args([])).obj_iou
    assert kd_config_from_opt(parser.parse_args(["--kd_obj_all"])).obj_all
    assert not kd_config_from_opt(parser.parse_args([])).obj_all
    assert kd_config_from_opt(parser.parse_args(["--kd_cls_floor", "4.6"])).cls_floor == 4.6
    assert kd_config_from_opt(parser.parse_args([])).cls_floor == 0.0
    with pytest.raises(ValueError, match="kd_cls_floor"):
        kd_config_from_opt(parser.parse_args(["--kd_cls_floor", "4.6", "--kd_loss_selected", "kl"]))
    with pytest.raises(ValueError, match="kd_box"):
        KDConfig(box_loss="iou")


def test_mgd_combines_with_attention_transfer_but_not_with_a_1x1_adapter_loss():
    assert KDConfig(feat_losses=("at", "mgd")).feat_losses == ("at", "mgd")
    for other in ("ft", "cwd", "mimic", "pkd"):
        with pytest.raises(ValueError, match="combine mgd with at or at_masked only"):
            KDConfig(feat_losses=("mgd", other))


@pytest.mark.parametrize("name", FEATURE_LOSS_NAMES)
def test_each_feature_loss_reaches_student_and_adapters_not_teacher(name, tmp_path):
    task = make_task(feat_losses=(name,), tmp_path=tmp_path)
    imgs, targets = batch()
    task.on_epoch_start(0, 10)
    _, s_feats = task.trainable(imgs)
    _, t_feats = task.teacher_forward(imgs)
    adapters = task.distiller.adapters
    if name in NEEDS_ADAPTER:
        assert len(adapters) == len(s_feats) > 0, "student 0.125 vs teacher 0.25 width: one adapter per pair"
    else:
        assert len(adapters) == 0, f"{name} compares channel-free statistics and needs no adapter"
    term = task.distiller.feature_loss(s_feats, t_feats, targets)
    assert_gradient_reaches_student_only(task, term, f"feature loss {name}", reaches=(adapters,))


def test_adapters_are_trainable_and_in_the_optimizer(tmp_path):
    from utils.engine import smart_optimizer

    task = make_task(tmp_path=tmp_path)
    adapters = task.distiller.adapters
    assert len(adapters) > 0, "student 0.125 vs teacher 0.25 width: channel counts differ everywhere"
    opt = smart_optimizer(task.trainable, "SGD", 0.01, 0.9, 5e-4)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in adapters.parameters())
    imgs, targets = batch()
    task.on_epoch_start(0, 10)
    loss, _ = task.train_step(task.trainable, imgs, targets)
    loss.backward()
    assert all(p.grad is not None for p in adapters.parameters())


def test_no_hooks_left_after_steps(tmp_path):
    task = make_task(tmp_path=tmp_path)
    imgs, targets = batch()
    task.on_epoch_start(0, 10)
    for _ in range(5):
        task.train_step(task.trainable, imgs, targets)
    for model in (task.model, task.teacher):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    deepcopy(task.model)  # hooks holding closures would make this fail or leak


def randomize_bn_statistics(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)


def test_loaded_teacher_is_frozen_inference_model(tmp_path):
    teacher = load_teacher(str(save_model(Model(tiny_model_cfg(3, 0.25)), tmp_path / "t.pt")), torch.device("cpu"))
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_kd_steps_leave_batchnorm_teacher_bit_identical(tmp_path):
    """A teacher that still has BatchNorm layers (unfused) and was left in train mode: the epoch start must put it
    back in eval mode, so a few optimizer steps of KD leave every parameter and buffer (running statistics and
    num_batches_tracked included) exactly as they were."""
    teacher = Model(tiny_model_cfg(3, 0.25)).requires_grad_(False)
    randomize_bn_statistics(teacher)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    teacher.train()  # as if something had switched it; a train-mode forward would move the running statistics
    task = make_task(feat_losses=("at", "mimic"), tmp_path=tmp_path, teacher=teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(task.trainable.parameters(), lr=0.01, momentum=0.9)
    imgs, targets = batch()
    for epoch in range(2):
        task.trainable.train()  # what the engine does at every epoch start, just before on_epoch_start
        task.on_epoch_start(epoch, 2)
        for _ in range(2):
            loss, items = task.train_step(task.trainable, imgs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert torch.all(items[3:] > 0), "the teacher took part in every step"
    after = teacher.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert not moved, f"teacher parameters/buffers moved: {moved[:5]}"
    assert not any(m.training for m in teacher.modules())


def test_fused_teacher_matches_unfused(tmp_path):
    model = Model(tiny_model_cfg(3, 0.25)).eval()
    randomize_bn_statistics(model)
    path = save_model(model, tmp_path / "t.pt")
    fused = load_teacher(str(path), torch.device("cpu"))
    from utils.kd.recorder import FeatureRecorder

    names = ["model.4", "model.9", "model.17", "model.23"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        with FeatureRecorder(model, names) as a:
            ref = model(x)[1]
        with FeatureRecorder(fused, names) as b:
            decoded, out = fused(x)
    assert decoded is None and model(x)[0] is not None  # the teacher skips box decoding, other models do not
    for r, o in zip(ref, out):
        assert torch.allclose(r, o, atol=1e-4, rtol=1e-3)
    for n in names:
        assert torch.allclose(a.outputs[n], b.outputs[n], atol=1e-4, rtol=1e-3)


def test_incompatible_teachers(tmp_path):
    student = Model(tiny_model_cfg(3))
    p6 = tiny_model_cfg(3)
    p6["anchors"] = p6["anchors"][:2]
    p6["head"][-1] = [[17, 20], 1, "Detect", ["nc", "anchors"]]
    teacher = Model(p6)
    with pytest.raises(ValueError, match="strides"):
        check_teacher(student, teacher)
    four = tiny_model_cfg(3)
    four["anchors"] = [a + [50, 50] for a in four["anchors"]]
    with pytest.raises(ValueError, match="anchors per level"):
        check_teacher(student, Model(four))
    with pytest.raises(ValueError, match="train a teacher on this dataset first"):
        teacher_class_index(["a", "b", "c"], [str(i) for i in range(80)], data="x.yaml")


def test_student_adopts_teacher_anchors():
    student = Model(tiny_model_cfg(3))
    cfg = tiny_model_cfg(3)
    cfg["anchors"] = [[x * 2 for x in a] for a in cfg["anchors"]]
    teacher = Model(cfg)
    assert check_teacher(student, teacher) is True
    assert torch.equal(student.model[-1].anchors, teacher.model[-1].anchors)


@pytest.fixture(scope="module")
def teacher_ckpt(shapes_data, tmp_path_factory):
    nc = yaml_load(shapes_data)["nc"]
    names = yaml_load(shapes_data)["names"]
    root = tmp_path_factory.mktemp("teacher")
    return save_model(Model(tiny_model_cfg(nc, 0.25)), root / "teacher.pt", names)


def kd_args(data, cfg, teacher, project, **extra):
    args = dict(data=str(data), cfg=str(cfg), weights="", imgsz=64, batch_size=8, epochs=1, workers=0,
                project=str(project), name="kd", device="cpu", teacher_weight=str(teacher),
                feat_loss=["at", "cwd"])
    args.update(extra)
    return args


def test_kd_run_writes_kd_columns_and_usable_checkpoints(shapes_data, tiny_cfgs, teacher_ckpt, tmp_path):
    import val

    before = {k: v.clone() for k, v in load_teacher(str(teacher_ckpt), torch.device("cpu")).state_dict().items()}
    seen = {}
    original = DistillationTask.build.__func__

    def spy(cls, model, trainer):
        task = original(cls, model, trainer)
        seen["task"] = task
        return task

    DistillationTask.build = classmethod(spy)
    try:
        opt = train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], teacher_ckpt, tmp_path, epochs=2))
    finally:
        DistillationTask.build = classmethod(original)
    run = Path(opt.save_dir)
    df = pd.read_csv(run / "results.csv")
    df.columns = [c.strip() for c in df.columns]
    assert list(df.columns)[-5:] == ["train/kd_box", "train/kd_obj", "train/kd_cls", "train/kd_feat", "x/amp"]
    assert (df["train/kd_feat"] > 0).all()
    after = seen["task"].teacher.state_dict()
    # the fused teacher has no BatchNorm statistics left; test_kd_steps_leave_batchnorm_teacher_bit_identical
    # covers those. Here: the optimizer never touched the teacher's weights (cast to the run's precision: bf16
    # on CPUs with native bf16, so compare in that dtype).
    assert all(torch.equal(before[k].to(after[k].dtype), after[k]) for k in before), "teacher weights moved"
    assert not any(m.training for m in seen["task"].teacher.modules())
    ckpt = torch.load(run / "weights/last.pt", weights_only=True)
    assert "adapters" in ckpt and ckpt["adapters"], "adapters saved under their own key"
    assert not any(k.startswith("adapters") for k in ckpt["model"]["state_dict"])
    results, _, _ = val.run(data=str(shapes_data), weights=str(run / "weights/best.pt"), imgsz=64,
                            batch_size=8, device="cpu", project=str(tmp_path), name="v", workers=0)
    assert len(results) == 7
    # a KD run's best.pt is itself a teacher
    opt2 = train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], run / "weights/best.pt", tmp_path,
                                  name="kd2", feat_loss=["none"]))
    assert (Path(opt2.save_dir) / "weights/last.pt").exists()


def test_no_kd_is_plain_training(shapes_data, tiny_cfgs, tmp_path):
    opt = train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], "", tmp_path, kd=False))
    df = pd.read_csv(Path(opt.save_dir) / "results.csv")
    assert not any("kd" in c for c in df.columns)


def test_kd_resume_restores_adapters(shapes_data, tiny_cfgs, teacher_ckpt, tmp_path):
    opt = train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], teacher_ckpt, tmp_path, epochs=2,
                                 kd_stop_epoch=5, feat_loss=["mimic"], nosave=False))
    last = Path(opt.save_dir) / "weights/last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["epoch"] = 0  # pretend the run stopped after its first epoch
    ckpt["optimizer"] = None
    save_checkpoint(ckpt, last)
    seen = {}
    original = DistillationTask.load_state_dict

    def spy(self, state):
        original(self, state)
        seen["adapters"] = {k: v.clone() for k, v in self.distiller.adapters.state_dict().items()}

    DistillationTask.load_state_dict = spy
    try:
        train_kd.run(resume=str(last))
    finally:
        DistillationTask.load_state_dict = original
    assert seen["adapters"].keys() == ckpt["adapters"].keys()
    assert all(torch.equal(seen["adapters"][k], ckpt["adapters"][k]) for k in ckpt["adapters"])


def test_kd_ddp_two_processes(shapes_data, tiny_cfgs, teacher_ckpt, tmp_path):
    from tests.test_train import cli_args

    args = kd_args(shapes_data, tiny_cfgs["student"], teacher_ckpt, tmp_path)
    args.pop("feat_loss")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           str(ROOT / "train_kd.py"), *cli_args(args), "--feat_loss", "at", "mimic"]
    out = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    df = pd.read_csv(tmp_path / "kd" / "results.csv")
    assert len(df) == 1  # one row: rank 1 writes no results.csv rows of its own
    df.columns = [c.strip() for c in df.columns]
    assert df["train/kd_feat"].iloc[0] > 0 and df["train/kd_obj"].iloc[0] > 0
    assert (tmp_path / "kd" / "labels.jpg").exists()
    ckpt = torch.load(tmp_path / "kd" / "weights" / "last.pt", weights_only=True)
    assert ckpt["adapters"], "the adapters of the mimic pairs are saved"


def test_teacher_required_message(shapes_data, tiny_cfgs, tmp_path):
    with pytest.raises(ValueError, match="--teacher_weight"):
        train_kd.run(**kd_args(shapes_data, tiny_cfgs["student"], "", tmp_path))


def test_kd_pairs_by_loss_kind(tmp_path):
    """Adapter losses pair the 3 Detect inputs only; at/at_masked also the 4 backbone stages, also beside an
    adapter loss (which compares the Detect inputs only: channel_pair_names); none without feature losses;
    explicit layers win (every loss at every pair)."""
    from utils.kd.task import channel_pair_names, kd_pairs

    student = Model(tiny_model_cfg(3, 0.125))
    teacher = load_teacher(str(save_model(Model(tiny_model_cfg(3, 0.25)), tmp_path / "t.pt")), torch.device("cpu"))
    detect_inputs = [f"model.{i}" for i in student.model[-1].f]
    assert kd_pairs(student, teacher, KDConfig()) == []
    for losses in (("at",), ("at", "mimic"), ("cwd", "at_masked")):
        pairs = kd_pairs(student, teacher, KDConfig(feat_losses=losses))
        assert len(pairs) == 7 and [p.s_name for p in pairs[-3:]] == detect_inputs
        assert [p.stride for p in pairs] == [4, 8, 16, 32, 8, 16, 32]
        channel = channel_pair_names(student, KDConfig(feat_losses=losses), pairs)
        assert channel == (None if losses == ("at",) else set(detect_inputs))
    for losses in (("cwd",), ("pkd", "mimic"), ("ft",), ("mgd",)):
        pairs = kd_pairs(student, teacher, KDConfig(feat_losses=losses))
        assert [p.s_name for p in pairs] == detect_inputs
        assert [p.stride for p in pairs] == [8, 16, 32]
    manual_cfg = KDConfig(feat_losses=("mimic",), s_layers=("model.4",), t_layers=("model.4",))
    manual = kd_pairs(student, teacher, manual_cfg)
    assert [(p.s_name, p.t_name) for p in manual] == [("model.4", "model.4")]
    assert channel_pair_names(student, manual_cfg, manual) is None
    cfg = KDConfig(feat_losses=("at", "cwd"))
    task = DistillationTask(student, teacher, cfg, kd_pairs(student, teacher, cfg))
    assert sorted(task.distiller.adapters.keys()) == ["4", "5", "6"]  # the Detect inputs, widths 0.125 vs 0.25
    assert task.distiller.loss_pairs == {"at": list(range(7)), "cwd": [4, 5, 6]}
    cfg = KDConfig(feat_losses=("at", "mgd"))
    task = DistillationTask(student, teacher, cfg, kd_pairs(student, teacher, cfg))
    assert sorted(task.distiller.adapters.keys()) == ["4", "5", "6"], "mgd's generators on the Detect inputs only"
    assert all(isinstance(a, GenerativeAdapter) for a in task.distiller.adapters.values())
    assert task.distiller.loss_pairs == {"at": list(range(7)), "mgd": [4, 5, 6]}
