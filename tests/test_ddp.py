"""DDP: one optimizer step of a 2-process gloo run equals one process on the whole batch (plain and KD)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from models.yolo import Model
from tests.conftest import tiny_model_cfg
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.general import yaml_load

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "ddp_step.py"


def run_step(out: Path, args: list, nproc: int, port: int, cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if nproc == 1:
        cmd = [sys.executable, str(HARNESS), str(out), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), str(HARNESS), str(out), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_same_step(single: dict, ddp: dict) -> None:
    assert ddp["world"] == 2 and single["world"] == 1
    assert single["grads"].keys() == ddp["grads"].keys()
    assert len(single["grads"]) > 50
    scale = max(g.abs().max().item() for g in single["grads"].values())
    for name, g in single["grads"].items():
        # an N-times-too-small DDP gradient (no world-size factor) or a missing all-reduce fails here
        torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-4, atol=1e-6 * scale, msg=f"gradient of {name}")
    nonzero = sum(bool(g.abs().sum() > 0) for g in single["grads"].values())
    assert nonzero > 0.9 * len(single["grads"])
    # the step moves a weight by at most lr x its gradient (lr <= 0.1, the warm-up bias lr, at the first step), so
    # weights may differ by 0.1 x the gradient tolerance: float sums of 4 + 4 images vs 8 round differently
    weight_atol = max(1e-7, 0.1 * 1e-6 * scale)
    for name, p in single["params"].items():
        torch.testing.assert_close(ddp["params"][name], p, rtol=1e-5, atol=weight_atol, msg=f"updated weight {name}")


def common_args(data, cfg, project, name) -> list:
    return ["--data", str(data), "--cfg", str(cfg), "--weights", "", "--imgsz", "64", "--batch-size", "8",
            "--epochs", "1", "--workers", "0", "--device", "cpu", "--project", str(project), "--name", name,
            "--noautoanchor", "--hyp", str(ROOT / "data" / "hyps" / "hyp.scratch.yaml"),
            "--no-amp"]  # float32: bf16 kernels may round a 4-image batch differently from an 8-image one


def test_ddp_step_equals_single_process_plain(shapes_data, tiny_cfgs, tmp_path):
    args = common_args(shapes_data, tiny_cfgs["student"], tmp_path, "plain") + ["--no-kd"]
    single = run_step(tmp_path / "single.pt", args, 1, 0, tmp_path)
    ddp = run_step(tmp_path / "ddp.pt", args, 2, 29531, tmp_path)
    assert_same_step(single, ddp)


def test_ddp_step_equals_single_process_kd_with_adapters(shapes_data, tiny_cfgs, tmp_path):
    nc, names = yaml_load(shapes_data)["nc"], yaml_load(shapes_data)["names"]
    teacher = Model(tiny_model_cfg(nc, 0.25))
    teacher.names = list(names)
    save_checkpoint(build_checkpoint(teacher), tmp_path / "teacher.pt")
    args = common_args(shapes_data, tiny_cfgs["student"], tmp_path, "kd") + [
        "--teacher_weight", str(tmp_path / "teacher.pt"), "--feat_loss", "mimic", "at"]
    single = run_step(tmp_path / "single.pt", args, 1, 0, tmp_path)
    ddp = run_step(tmp_path / "ddp.pt", args, 2, 29533, tmp_path)
    adapter_grads = [k for k in single["grads"] if k.startswith("adapters.")]
    assert adapter_grads, "the KD run has channel adapters (student 0.125 vs teacher 0.25 width)"
    assert_same_step(single, ddp)
