"""The training engine's YOLOv5 v6.0 defaults (LR schedule, warm-up, no clipping), its hyp keys for later-YOLOv5
behaviours, gradient accumulation across a skipped non-finite batch, rank-0-only callbacks, --sync-bn on KD
adapters, and the KD command line of the original scripts."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import train
import train_kd
from models.yolo import Model
from tests.conftest import tiny_model_cfg
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.engine import Trainer, lr_lambda
from utils.general import yaml_load
from utils.torch_utils import select_precision

ROOT = Path(__file__).resolve().parents[1]


def make_trainer(data, cfg, project, parser=None, **extra) -> Trainer:
    """A Trainer built exactly as train.py builds it (no training yet)."""
    parser = parser or train.build_parser()
    opt = train.parse_opt([], parser)
    args = dict(data=str(data), cfg=str(cfg), weights="", imgsz=64, batch_size=8, epochs=4, workers=0,
                project=str(project), name="exp", device="cpu", noautoanchor=True)
    args.update(extra)
    for k, v in args.items():
        setattr(opt, k, v)
    opt, hyp, device = train.prepare_run(opt, parser)
    return Trainer(opt, hyp, Path(opt.save_dir), device)


def batch(n=4, size=64):
    gen = torch.Generator().manual_seed(7)
    imgs = torch.rand(n, 3, size, size, generator=gen)
    targets = torch.tensor([[i, 1, 0.4, 0.5, 0.3, 0.25] for i in range(n)])
    return imgs, targets


@pytest.fixture(scope="module")
def trainer(shapes_data, tiny_cfgs, tmp_path_factory):
    return make_trainer(shapes_data, tiny_cfgs["student"], tmp_path_factory.mktemp("runs"))


def test_lr_schedules_by_hand():
    cosine, linear = lr_lambda(4, 0.1), lr_lambda(4, 0.1, cosine=False)
    # cosine ('one cycle'): half a cosine from 1 at epoch 0 to lrf at epoch `epochs`
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(2) == pytest.approx(0.55)  # (1 - cos(pi/2)) / 2 * (0.1 - 1) + 1
    assert cosine(3) == pytest.approx((1 - math.cos(3 * math.pi / 4)) / 2 * -0.9 + 1)
    assert cosine(4) == pytest.approx(0.1)
    # linear: 1 down to lrf at the last epoch (epochs - 1)
    assert [linear(e) for e in range(4)] == pytest.approx([1.0, 0.7, 0.4, 0.1])


def test_cosine_is_the_default_and_linear_lr_switches(shapes_data, tiny_cfgs, tmp_path, trainer):
    assert trainer.lf(2) == pytest.approx(0.55)  # v6.0: cosine unless --linear-lr
    linear = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, linear_lr=True)
    assert linear.lf(1) == pytest.approx(0.7)
    both = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, cos_lr=True)  # later-YOLOv5 flag accepted
    assert both.lf(2) == pytest.approx(0.55)


def test_warmup_lasts_at_least_1000_iterations(trainer):
    assert trainer.nb == 3  # 24 images, batch 8: warmup_epochs 3 would be only 9 iterations
    lr0 = trainer.hyp["lr0"]
    trainer.warmup(500, 0)
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * lr0)
    assert trainer.optimizer.param_groups[2]["lr"] == pytest.approx(0.5 * 0.1 + 0.5 * lr0)  # bias from 0.1
    trainer.warmup(1000, 0)
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(lr0)


def test_warmup_floor_and_clip_norm_are_hyp_keys_recorded_in_the_run(shapes_data, tiny_cfgs, tmp_path, monkeypatch):
    hyp = yaml_load(ROOT / "data" / "hyps" / "hyp.scratch.yaml")
    default = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, name="default")
    recorded = yaml_load(Path(default.opt.save_dir) / "hyp.yaml")
    assert recorded["warmup_min_iters"] == 1000 and recorded["grad_clip_norm"] == 0 and recorded["nbs"] == 64

    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: calls.append(max_norm))
    default.forward_backward(*batch())
    default.optimizer_step()
    assert calls == []  # v6.0 does not clip

    custom = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, name="custom",
                          hyp={**hyp, "warmup_min_iters": 100, "grad_clip_norm": 10.0})
    assert yaml_load(Path(custom.opt.save_dir) / "hyp.yaml")["warmup_min_iters"] == 100
    custom.warmup(50, 0)
    assert custom.optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * hyp["lr0"])
    custom.forward_backward(*batch())
    custom.optimizer_step()
    assert calls == [10.0]


def test_ema_decay_and_ramp_are_hyp_keys(shapes_data, tiny_cfgs, tmp_path):
    import math

    hyp = yaml_load(ROOT / "data" / "hyps" / "hyp.scratch.yaml")
    default = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, name="default")
    recorded = yaml_load(Path(default.opt.save_dir) / "hyp.yaml")
    assert recorded["ema_decay"] == 0.9999 and recorded["ema_tau"] == 2000  # YOLOv5 v6.0's constants
    assert default.ema.decay_at(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))

    custom = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, name="custom",
                          hyp={**hyp, "ema_decay": 0.99, "ema_tau": 10})
    assert yaml_load(Path(custom.opt.save_dir) / "hyp.yaml")["ema_decay"] == 0.99
    name, before = next((k, v.clone()) for k, v in custom.ema.ema.state_dict().items() if k.endswith("conv.weight"))
    with torch.no_grad():
        for param in custom.model.parameters():
            param.add_(1.0)
    target = custom.model.state_dict()[name].clone()
    custom.ema.update(custom.model)
    d = 0.99 * (1 - math.exp(-1 / 10))  # first update: the ramp by hand
    assert torch.allclose(custom.ema.ema.state_dict()[name], d * before + (1 - d) * target, atol=1e-6)

    with pytest.raises(ValueError, match="ema_decay"):
        make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, name="bad", hyp={**hyp, "ema_decay": 1.0})


def test_demo_hyp_sets_the_later_behaviours():
    hyp = yaml_load(ROOT / "data" / "hyps" / "hyp.demo.yaml")
    assert hyp["warmup_min_iters"] == 100 and hyp["grad_clip_norm"] == 10.0


def test_skipped_nonfinite_batch_keeps_accumulated_gradients(trainer, monkeypatch):
    trainer.optimizer.zero_grad()
    assert trainer.forward_backward(*batch()) is not None
    good = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert good and any(g.abs().sum() > 0 for g in good.values())

    def nan_step(module, imgs, targets):
        return torch.tensor(float("nan"), requires_grad=True), torch.zeros(3)

    monkeypatch.setattr(trainer.task, "train_step", nan_step)
    assert trainer.forward_backward(*batch()) is None
    trainer._skip_bad_step(0)
    for n, p in trainer.model.named_parameters():
        if n in good:
            assert torch.equal(p.grad, good[n]), f"gradient of {n} was lost with the bad batch"
    trainer.optimizer.zero_grad()


def test_callbacks_run_on_rank_zero_only():
    seen = []
    cb = SimpleNamespace(on_train_start=lambda t: seen.append(t))
    Trainer._emit(SimpleNamespace(main=False, callbacks=[cb]), "on_train_start", "rank1")
    assert seen == []  # labels.jpg, results.csv, plots: written by rank 0 alone
    Trainer._emit(SimpleNamespace(main=True, callbacks=[cb]), "on_train_start", "rank0")
    assert seen == ["rank0"]


def test_sync_bn_converts_kd_adapters_too():
    from utils.kd.distiller import KDStudent

    student = Model(tiny_model_cfg(3, 0.125))
    adapters = nn.ModuleDict({"0": nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16))})
    wrapper = KDStudent(student, adapters, [])
    bn_before = sum(isinstance(m, nn.BatchNorm2d) for m in wrapper.modules())
    fake = SimpleNamespace(opt=SimpleNamespace(sync_bn=True), cuda=True, rank=0)  # DDP on CUDA, as --sync-bn needs
    Trainer._sync_batchnorm(fake, wrapper)
    assert wrapper.model is student  # the task keeps its reference to the same student object
    assert isinstance(wrapper.adapters["0"][1], nn.SyncBatchNorm)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in wrapper.modules()) == bn_before
    assert not any(type(m) is nn.BatchNorm2d for m in wrapper.modules())


@pytest.mark.parametrize("words, value", [([], None), (["--isL"], True), (["--isL", "False"], False),
                                          (["--isL", "True"], True), (["--isL", "false"], False)])
def test_original_isl_flag_is_accepted(words, value):
    opt = train.parse_opt(["--teacher_weight", "t.pt", *words], train_kd.build_parser())
    assert opt.isL is value
    with pytest.raises(SystemExit):
        train.parse_opt(["--isL", "maybe"], train_kd.build_parser())


def test_kd_default_recipe_is_output_kd_plus_attention_transfer():
    from utils.kd.task import kd_config_from_opt

    cfg = kd_config_from_opt(train.parse_opt(["--teacher_weight", "t.pt"], train_kd.build_parser()))
    assert cfg.feat_losses == ("at",) and cfg.alpha > 0 and cfg.beta > 0
    only_output = kd_config_from_opt(train.parse_opt(["--feat_loss", "none"], train_kd.build_parser()))
    assert only_output.feat_losses == ()


def small_dataset(root: Path, names) -> Path:
    from utils.general import yaml_save
    from utils.synthetic import generate_shapes

    generate_shapes(root / "d", n_train=4, n_val=2, img_size=64, difficulty=0.3, seed=1)
    data = {"path": str(root / "d"), "train": "images/train", "val": "images/val", "nc": len(names),
            "names": list(names)}
    yaml_save(root / "d.yaml", data)
    return root / "d.yaml"


@pytest.mark.parametrize("problem", ["missing", "strides"])
def test_bad_teacher_stops_before_any_dataset_is_scanned(shapes_data, tiny_cfgs, tmp_path, problem):
    names = yaml_load(shapes_data)["names"]
    data = small_dataset(tmp_path, names)
    teacher = tmp_path / "teacher.pt"
    if problem == "strides":  # a P4-only head: two detection levels
        cfg = tiny_model_cfg(len(names), 0.25)
        cfg["anchors"] = cfg["anchors"][:2]
        cfg["head"][-1] = [[17, 20], 1, "Detect", ["nc", "anchors"]]
        model = Model(cfg)
        model.names = list(names)
        save_checkpoint(build_checkpoint(model), teacher)
    error = FileNotFoundError if problem == "missing" else ValueError
    with pytest.raises(error, match="teacher"):
        train_kd.run(data=str(data), cfg=str(tiny_cfgs["student"]), weights="", imgsz=64, batch_size=2, epochs=1,
                     workers=0, project=str(tmp_path / "runs"), name="kd", device="cpu", teacher_weight=str(teacher))
    assert not list((tmp_path / "d").rglob("*.cache")), "labels were scanned and cached before the teacher check"


def test_teacher_anchors_are_checked_before_the_precision_cast(monkeypatch, tmp_path):
    from utils.kd import task as kd_task

    order = []
    real_check, real_cast = kd_task.check_teacher, kd_task.teacher_precision
    monkeypatch.setattr(kd_task, "check_teacher", lambda s, t: (order.append(("check", t.model[-1].anchors.dtype)),
                                                                 real_check(s, t))[1])
    monkeypatch.setattr(kd_task, "teacher_precision", lambda t, d: (order.append(("cast", None)),
                                                                    real_cast(t, d))[1])
    teacher = Model(tiny_model_cfg(3, 0.25))
    teacher.names = ["a", "b", "c"]
    save_checkpoint(build_checkpoint(teacher), tmp_path / "t.pt")
    student = Model(tiny_model_cfg(3, 0.125))
    opt = train.parse_opt(["--teacher_weight", str(tmp_path / "t.pt")], train_kd.build_parser())
    fake_trainer = SimpleNamespace(opt=opt, device=torch.device("cpu"), names=["a", "b", "c"], gs=32,
                                   precision=select_precision(torch.device("cpu"), True))
    kd_task.DistillationTask.build(student, fake_trainer)
    assert order == [("check", torch.float32), ("cast", None)]


def test_resuming_a_run_saved_before_v6_batchnorm_keeps_its_settings(shapes_data, tiny_cfgs, tmp_path, monkeypatch):
    opt = train.run(data=str(shapes_data), cfg=str(tiny_cfgs["student"]), weights="", imgsz=64, batch_size=8,
                    epochs=2, workers=0, project=str(tmp_path), name="old", device="cpu", noval=True, nosave=False)
    last = Path(opt.save_dir) / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["model"]["batchnorm"] == {"eps": 1e-3, "momentum": 0.03}
    # pretend epoch 0 of this run was written by the earlier format (PyTorch's BatchNorm defaults)
    ckpt.update(format="yolov5-kd/1", epoch=0, optimizer=None)
    del ckpt["model"]["batchnorm"]
    save_checkpoint(ckpt, last)
    seen = {}
    real_fit = Trainer.fit

    def spy(self):
        seen["eps"] = {m.eps for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)}
        seen["momentum"] = {m.momentum for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)}
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", spy)
    train.run(resume=str(last))
    assert seen == {"eps": {1e-5}, "momentum": {0.1}}


@pytest.mark.parametrize("best_is_last", [True, False])
def test_best_pt_is_validated_once_more_only_when_it_is_not_the_last_epoch(shapes_data, tiny_cfgs, tmp_path,
                                                                          monkeypatch, best_is_last):
    calls = []
    real_validate = Trainer.validate

    def scripted(self, plots=False, model=None, verbose=False):
        results, maps = real_validate(self, plots=plots, model=model, verbose=verbose)
        calls.append({"plots": plots, "model": model is not None})
        if model is not None:
            return results, maps
        fitness = [0.2, 0.5] if best_is_last else [0.5, 0.2]  # mAP@.5:.95 of epoch 0 and 1
        return (0.1, 0.1, 0.3, fitness[len(calls) - 1], *results[4:]), maps

    monkeypatch.setattr(Trainer, "validate", scripted)
    opt = train.run(data=str(shapes_data), cfg=str(tiny_cfgs["student"]), weights="", imgsz=64, batch_size=8,
                    epochs=2, workers=0, project=str(tmp_path), name="exp", device="cpu", noautoanchor=True)
    best = torch.load(Path(opt.save_dir) / "weights" / "best.pt", weights_only=True)
    assert best["epoch"] == -1  # stripped
    if best_is_last:  # the last epoch's validation (with plots) is best.pt's report
        assert calls == [{"plots": False, "model": False}, {"plots": True, "model": False}]
    else:  # best.pt is epoch 0's weights: validated again, with plots
        assert calls == [{"plots": False, "model": False}, {"plots": True, "model": False},
                         {"plots": True, "model": True}]


def test_save_period_follows_v6(shapes_data, tiny_cfgs, tmp_path):
    opt = train.run(data=str(shapes_data), cfg=str(tiny_cfgs["student"]), weights="", imgsz=64, batch_size=8,
                    epochs=5, workers=0, project=str(tmp_path), name="exp", device="cpu", noval=True,
                    save_period=2)
    saved = sorted(p.name for p in (Path(opt.save_dir) / "weights").glob("epoch*.pt"))
    assert saved == ["epoch2.pt", "epoch4.pt"]  # e % N == 0 and e > 0, as v6.0 (not epoch1/epoch3)
    assert torch.load(Path(opt.save_dir) / "weights" / "epoch4.pt", weights_only=True)["epoch"] == 4


def test_finetune_hyps_have_every_key_of_the_scratch_hyp():
    scratch = set(yaml_load(ROOT / "data" / "hyps" / "hyp.scratch.yaml"))
    for name in ("hyp.finetune.yaml", "hyp.finetune_objects365.yaml"):
        hyp = yaml_load(ROOT / "data" / "hyps" / name)
        assert scratch <= set(hyp), f"{name} lacks {scratch - set(hyp)}"
        assert all(isinstance(v, (int, float)) for v in hyp.values())


def test_hyp_anchor_count_gets_anchors_from_autoanchor(shapes_data, tiny_cfgs, tmp_path):
    hyp = {**yaml_load(ROOT / "data" / "hyps" / "hyp.scratch.yaml"), "anchors": 3.2}
    trainer = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, hyp=hyp, noautoanchor=False)
    detect = trainer.model.model[-1]
    pixels = detect.anchors * detect.stride.view(-1, 1, 1)
    yaml_anchors = torch.tensor(yaml_load(ROOT / "models" / "yolov5n.yaml")["anchors"], dtype=torch.float32)
    assert pixels.shape == (3, 3, 2)
    assert not torch.allclose(pixels, yaml_anchors.view(3, 3, 2))  # not the YAML's COCO anchors
    assert (pixels > 1).all()  # placeholders (0, 1, 2, ... px) replaced by k-means anchors of the labels
    areas = pixels.prod(-1).mean(-1)
    assert (areas[1:] >= areas[:-1]).all()  # small anchors on the fine level


def test_close_mosaic_switches_persistent_workers_to_letterboxed_images(shapes_data, tiny_cfgs, tmp_path):
    trainer = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, epochs=3, close_mosaic=1, workers=1)
    assert trainer.train_loader.persistent_workers and trainer.hyp["mosaic"] == 1.0
    *_, shapes = next(iter(trainer.train_loader))
    assert all(s is None for s in shapes)  # mosaics carry no letterbox shapes

    trainer._close_mosaic(epoch=1)  # not yet one of the last epochs
    assert trainer.dataset.mosaic
    stale = trainer.train_loader
    trainer._close_mosaic(epoch=2)
    assert not trainer.dataset.mosaic and trainer.train_loader is not stale
    assert all(s is None for s in next(iter(stale))[3])  # the old workers still hold a mosaic dataset
    *_, shapes = next(iter(trainer.train_loader))
    assert shapes and all(s is not None for s in shapes)
    assert len(trainer.train_loader) == trainer.nb

    with pytest.raises(ValueError, match="close_mosaic"):
        make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, name="bad", close_mosaic=-1)


def test_close_mosaic_takes_effect_inside_fit(shapes_data, tiny_cfgs, tmp_path):
    trainer = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, epochs=2, close_mosaic=1, noval=True)
    seen = []
    step = trainer.forward_backward

    def record(imgs, targets):
        seen.append((trainer.epoch, trainer.dataset.mosaic))
        return step(imgs, targets)

    trainer.forward_backward = record
    trainer.fit()
    assert {m for e, m in seen if e == 0} == {True} and {m for e, m in seen if e == 1} == {False}
    assert yaml_load(Path(trainer.opt.save_dir) / "opt.yaml")["close_mosaic"] == 1
