"""utils.torch_utils.tune_cpu_allocator: freed tensor memory is reused without fresh page faults."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
