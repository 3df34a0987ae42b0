"""Mixed precision: the automatic choice (bf16 autocast on CPUs with native bf16, float32 elsewhere, fp16 on
CUDA), --amp/--no-amp, what a run records, channels_last models, a bf16 teacher and float32 losses."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import train
import train_kd
from models.yolo import Model
from tests.conftest import tiny_model_cfg
from utils import torch_utils
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.general import yaml_load
from utils.torch_utils import select_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_automatic_choice_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(torch_utils, "cpu_has_native_bf16", lambda: native)
    auto = select_precision(CPU)
    assert auto.enabled is native
    assert auto.dtype == (torch.bfloat16 if native else None)
    assert auto.channels_last  # the CPU's fast layout in bf16 and in float32 alike (bench/layout.py)
    assert auto.name == ("bf16" if native else "fp32")
    assert select_precision(CPU, False).enabled is False  # --no-amp
    assert select_precision(CPU, False).channels_last  # float32, still in the fast layout
    assert select_precision(CPU, True).dtype == torch.bfloat16  # --amp forces it (warned where emulated)


def test_cuda_uses_fp16_autocast():
    cuda = select_precision(torch.device("cuda", 0))
    assert cuda.dtype == torch.float16 and cuda.channels_last and cuda.device_type == "cuda"
    assert not select_precision(torch.device("cuda", 0), False).enabled
    assert not select_precision(torch.device("cuda", 0), False).channels_last  # float32 CUDA: default layout


def test_native_bf16_probe_reads_cpu_flags(monkeypatch, tmp_path):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    flags = tmp_path / "cpuinfo"
    monkeypatch.setattr(torch_utils, "Path", lambda p: flags if p == "/proc/cpuinfo" else Path(p))
    flags.write_text("flags\t: fpu sse avx512f avx512bw\n")
    assert torch_utils.cpu_has_native_bf16() is False
    flags.write_text("flags\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert torch_utils.cpu_has_native_bf16() is True


def test_autocast_context_runs_convolutions_in_bf16():
    conv = torch.nn.Conv2d(3, 4, 3)
    with select_precision(CPU, True).autocast():
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16
    with select_precision(CPU, False).autocast():
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.float32


def test_channels_last_after_an_eval_forward():
    """Detect's 5-D grid caches used to break .to(memory_format=channels_last) after any eval forward."""
    model = Model(tiny_model_cfg(3)).eval()
    with torch.no_grad():
        before = model(torch.rand(1, 3, 64, 64))[0]
    model.to(memory_format=torch.channels_last)
    assert model.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        after = model(torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))[0]
    assert after.shape == before.shape
    with torch.no_grad(), select_precision(CPU, True).autocast():
        decoded, raw = model(torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
        neck = model.model[-2](torch.rand(1, model.model[-2].cv1.conv.in_channels, 8, 8))
    assert neck.dtype == torch.bfloat16  # the network runs in bf16 ...
    assert raw[0].dtype == torch.float32  # ... but the Detect convs in float32, where the losses read them
    assert decoded.dtype == torch.float32  # and boxes are decoded in float32: bf16 would round pixel coordinates


def run_args(data, cfg, project, **extra):
    args = dict(data=str(data), cfg=str(cfg), weights="", imgsz=64, batch_size=8, epochs=1, workers=0,
                project=str(project), name="exp", device="cpu")
    args.update(extra)
    return args


@pytest.mark.parametrize("amp", [True, False])
def test_amp_flag_is_recorded_in_opt_yaml_and_results(shapes_data, tiny_cfgs, tmp_path, amp):
    opt = train.run(**run_args(shapes_data, tiny_cfgs["student"], tmp_path, amp=amp))
    assert yaml_load(Path(opt.save_dir) / "opt.yaml")["amp"] is amp
    df = pd.read_csv(Path(opt.save_dir) / "results.csv")
    df.columns = [c.strip() for c in df.columns]
    assert df["x/amp"].tolist() == [int(amp)]
    assert (df["train/box_loss"] > 0).all() and df["metrics/mAP_0.5"].notna().all()


def test_automatic_choice_is_resolved_before_opt_yaml(shapes_data, tiny_cfgs, tmp_path, monkeypatch):
    monkeypatch.setattr(torch_utils, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    opt = train.run(**run_args(shapes_data, tiny_cfgs["student"], tmp_path))
    assert yaml_load(Path(opt.save_dir) / "opt.yaml")["amp"] is False


def test_amp_step_keeps_float32_master_weights_and_losses(shapes_data, tiny_cfgs, tmp_path):
    from tests.test_engine import batch, make_trainer

    trainer = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, amp=True)
    assert trainer.precision.dtype == torch.bfloat16
    assert trainer.model.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = {}
    real_step = trainer.task.train_step

    def spy(module, imgs, targets):
        loss, items = real_step(module, imgs, targets)
        seen.update(loss=loss.dtype, imgs=imgs.is_contiguous(memory_format=torch.channels_last))
        return loss, items

    trainer.task.train_step = spy
    imgs, targets = batch()
    assert trainer.forward_backward(trainer.precision.to_input(imgs), targets) is not None
    assert seen == {"loss": torch.float32, "imgs": True}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in trainer.model.parameters() if p.grad is not None)
    assert not trainer.scaler.is_enabled()  # bf16 needs no loss scaling


def test_teacher_runs_in_the_run_precision(tmp_path):
    from utils.kd import task as kd_task

    teacher = Model(tiny_model_cfg(3, 0.25))
    teacher.names = ["a", "b", "c"]
    save_checkpoint(build_checkpoint(teacher), tmp_path / "t.pt")
    opt = train.parse_opt(["--teacher_weight", str(tmp_path / "t.pt")], train_kd.build_parser())
    for amp, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        student = Model(tiny_model_cfg(3, 0.125))
        trainer = SimpleNamespace(opt=opt, device=CPU, names=["a", "b", "c"], gs=32,
                                  precision=select_precision(CPU, amp))
        task = kd_task.DistillationTask.build(student, trainer)
        student.hyp, student.gr = yaml_load(Path(train.ROOT) / "data/hyps/hyp.scratch.yaml"), 1.0
        task.setup(SimpleNamespace(hyp=student.hyp))
        weight = task.teacher.model[0].conv.weight
        assert weight.dtype == dtype
        assert weight.is_contiguous(memory_format=torch.channels_last)  # the run's layout, float32 included
        maps, feats = task.teacher_forward(torch.rand(2, 3, 64, 64))
        assert maps[0].dtype == dtype and feats[0].dtype == dtype
        with trainer.precision.autocast():
            student.train()
            loss, items = task.train_step(task.trainable, trainer.precision.to_input(torch.rand(2, 3, 64, 64)),
                                          torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]]))
        assert loss.dtype == torch.float32 and torch.isfinite(items).all()


def test_float32_cpu_step_runs_channels_last(shapes_data, tiny_cfgs, tmp_path):
    from tests.test_engine import batch, make_trainer

    trainer = make_trainer(shapes_data, tiny_cfgs["student"], tmp_path, amp=False)
    assert trainer.precision.dtype is None
    assert trainer.model.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.precision.to_input(batch()[0]).is_contiguous(memory_format=torch.channels_last)
    imgs, targets = batch()
    assert trainer.forward_backward(trainer.precision.to_input(imgs), targets) is not None
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_runs_channels_last_reads_the_first_conv():
    from utils.torch_utils import runs_channels_last

    model = Model(tiny_model_cfg(3, 0.25))
    assert not runs_channels_last(model)
    assert runs_channels_last(model.to(memory_format=torch.channels_last))
    assert not runs_channels_last(torch.nn.Identity())  # no parameters, as an exported backend


@pytest.mark.parametrize("channels_last", [True, False])
def test_teacher_layout_follows_the_run(channels_last):
    from utils.kd.task import teacher_precision
    from utils.torch_utils import Precision

    teacher = teacher_precision(Model(tiny_model_cfg(3, 0.25)), Precision("cpu", None, channels_last=channels_last))
    weight = teacher.model[0].conv.weight
    assert weight.dtype == torch.float32
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert weight.is_contiguous() is not channels_last


@pytest.mark.parametrize("native", [True, False])
def test_val_half_means_bf16_autocast_only_on_native_cpus(monkeypatch, native):
    import val

    monkeypatch.setattr(torch_utils, "cpu_has_native_bf16", lambda: native)
    assert val._reduced_precision(True, CPU) == (False, native)  # (fp16 model, bf16 autocast)
    assert val._reduced_precision(False, CPU) == (False, False)
    assert val._reduced_precision(True, torch.device("cuda", 0)) == (True, False)
    assert val._reduced_precision(False, torch.device("cuda", 0)) == (False, False)


def test_forced_amp_on_an_emulating_cpu_warns_once(shapes_data, tiny_cfgs, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch_utils, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    opt = train.run(**run_args(shapes_data, tiny_cfgs["student"], tmp_path, amp=True))
    assert yaml_load(Path(opt.save_dir) / "opt.yaml")["amp"] is True  # forced: bf16 even where it is emulated
    assert sum("emulated" in r.getMessage() for r in caplog.records) == 1
