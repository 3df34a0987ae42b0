"""utils.torch_utils.tune_cpu_allocator: freed tensor memory is reused without fresh page faults."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from utils.torch_utils import KEEP_MALLOC_ENV

ROOT = Path(__file__).resolve().parents[1]

# Allocates and frees 40 tensors of 4 MB three times; prints whether tuning applied and the minor page faults of
# rounds 2 and 3 (memory freed by the round before is either still mapped or must be faulted in again).
CHILD = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    from utils.torch_utils import tune_cpu_allocator
    applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
    faults = 0
    for round_ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.empty(2 ** 20).fill_(1.0) for _ in range(40)]
        del blocks
        if round_:  # the first round faults its pages in under any setting
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, faults)
""")


def run_child(setting: str, env_extra=None) -> tuple:
    env = {k: v for k, v in os.environ.items() if k != KEEP_MALLOC_ENV}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", CHILD, setting, str(ROOT)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def glibc_linux() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc_linux(), reason="tune_cpu_allocator acts on glibc's malloc only")
def test_tuned_allocator_reuses_freed_pages():
    applied_default, faults_default = run_child("default")
    applied_tuned, faults_tuned = run_child("tuned")
    assert not applied_default and applied_tuned
    pages = 40 * 4 * 2 ** 20 // 4096
    # with glibc's defaults round 1's blocks are mmap'd and unmapped when freed, so round 2 faults them in again
    # (from then on it depends on the heap layout); tuned, rounds 2 and 3 reuse round 1's pages
    assert faults_default > pages // 2, faults_default
    assert faults_tuned * 4 < faults_default, (faults_tuned, faults_default)


def test_allocator_tuning_can_be_switched_off():
    applied, _ = run_child("tuned", {KEEP_MALLOC_ENV: "1"})
    assert not applied


def test_allocator_left_alone_for_gpu_devices():
    import torch

    from utils.torch_utils import tune_cpu_allocator

    assert tune_cpu_allocator(torch.device("cuda", 0)) is False  # GPU activations never touch malloc


def test_ema_update_is_the_decayed_average_by_hand():
    import math

    import torch.nn as nn

    from utils.torch_utils import ModelEMA

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2.0))  # decay after the first update
    now = model.state_dict()
    for k, v in ema.ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, d * before[k] + (1 - d) * now[k], rtol=1e-6, atol=1e-7)
        else:  # integer buffers (num_batches_tracked) are not averaged
            assert torch.equal(v, before[k])


def test_smart_optimizer_uses_fused_kernels_where_torch_has_them():
    import torch.nn as nn

    from utils.engine import smart_optimizer

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    try:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, fused=True)
        has_fused = True
    except (RuntimeError, TypeError, ValueError):
        has_fused = False
    for name in ("SGD", "Adam", "AdamW"):
        optimizer = smart_optimizer(model, name, 0.01, 0.9, 5e-4)
        assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1, 2]  # BN weight, conv weight, biases
        assert all(bool(g.get("fused")) is has_fused for g in optimizer.param_groups)
