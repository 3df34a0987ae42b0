#!/usr/bin/env bash
# GPU checks that the CPU-only test suite cannot make. Run from anywhere on a CUDA machine; needs no internet
# (the synthetic shapes data is generated locally on first use).
#
#   bash bench/gpu_check.sh            # log: bench/gpu_check.log, or $OUT/gpu_check.log when OUT is set
#   LOG=/tmp/x.log bash bench/gpu_check.sh
#
# Steps: (1) one AMP distillation step (fp16 teacher, autocast + GradScaler, finite losses), (2) a 1-epoch DDP
# run of train.py on every visible GPU, (3) a 1-epoch yolov5s teacher run and (4) a 1-epoch yolov5n KD run from
# it with --feat_loss at cwd, all at 640 px, (5) bench/kd_step.py at 640 px (time) and (6) its --memory mode.
# A failing step is logged and the next one runs; the exit status is non-zero when any step failed.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
LOG="${LOG:-${OUT:+$OUT/gpu_check.log}}"
LOG="${LOG:-bench/gpu_check.log}"
RUNS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_runs.XXXXXX")"  # run folders stay out of the repository
STEP_TIMEOUT="${STEP_TIMEOUT:-1200}"  # seconds per step, so one hung step cannot eat the whole device lease
PYTHON="${PYTHON:-python}"
FAILED=()

mkdir -p "$(dirname "$LOG")"
: >"$LOG"

log() { echo "$*" | tee -a "$LOG"; }

# step NAME CMD...: run CMD with its output appended to the log; record a failure instead of stopping.
step() {
  local name="$1"; shift
  local start=$SECONDS rc
  log ""
  log "=== [$name] $(date '+%F %T') $*"
  timeout "$STEP_TIMEOUT" "$@" >>"$LOG" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    log "=== [$name] ok in $((SECONDS - start)) s"
  else
    log "=== [$name] FAILED (exit $rc) after $((SECONDS - start)) s"
    FAILED+=("$name")
  fi
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  log "nvidia-smi not found: this script needs a CUDA machine"
  exit 2
fi
NGPU="$(nvidia-smi -L | grep -c '^GPU')"
if [ "$NGPU" -lt 1 ]; then
  log "nvidia-smi lists no GPU: this script needs a CUDA machine"
  exit 2
fi
DEVICES="$(seq -s, 0 $((NGPU - 1)))"
log "gpu_check: $NGPU GPU(s) [$DEVICES], runs in $RUNS, log $LOG"
nvidia-smi -L >>"$LOG" 2>&1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())" >>"$LOG" 2>&1

step amp_kd_step "$PYTHON" - <<'EOF'
"""One AMP KD step per feature loss on CUDA: fp16 channels_last teacher, autocast + GradScaler, finite losses."""
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, ".")
from bench._common import FEATURES, NC, StepRunner, build_student, build_teacher, synthetic_batch  # noqa: E402
from utils.kd.distiller import KDConfig  # noqa: E402
from utils.kd.task import DistillationTask, check_teacher, kd_pairs  # noqa: E402

assert torch.cuda.is_available(), "CUDA is not available to torch"
device = torch.device("cuda:0")
student = build_student("models/yolov5n.yaml", 640, device)
with tempfile.TemporaryDirectory() as tmp:
    teacher = build_teacher("s", device, tmp, student.names)
p = next(teacher.parameters())
assert p.dtype == torch.float16, f"teacher should be fp16 on CUDA, is {p.dtype}"
assert teacher.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last), "teacher not channels_last"
check_teacher(student, teacher)
imgs, targets = synthetic_batch(8, 640, device, nc=NC)
with torch.no_grad():
    assert teacher(imgs[:1].half().contiguous(memory_format=torch.channels_last))[0] is None, "teacher decodes boxes"
for feats in [()] + [(f,) for f in FEATURES] + [FEATURES]:
    cfg = KDConfig(feat_losses=feats)
    task = DistillationTask(student, teacher, cfg, kd_pairs(student, teacher, cfg, imgsz=64))
    task.setup(SimpleNamespace(hyp=student.hyp))
    task.on_epoch_start(0, 10)
    runner = StepRunner(task, device)
    for _ in range(3):
        items = runner(imgs, targets)
        assert torch.isfinite(items).all(), f"non-finite loss items {items.tolist()} with feat_losses={feats}"
    assert all(p.grad is None for p in teacher.parameters()), "teacher received gradients"
    assert runner.scaler.is_enabled(), "GradScaler should be enabled on CUDA"
    print(f"feat_losses={list(feats) or 'output only'}: items {[round(x, 5) for x in items.tolist()]}, "
          f"scale {runner.scaler.get_scale():.0f}")
print(f"max memory allocated {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MB")
EOF

step ddp_train "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" train.py \
  --data data/shapes.yaml --cfg models/yolov5n.yaml --weights '' --epochs 1 --imgsz 640 --batch-size 16 \
  --device "$DEVICES" --project "$RUNS" --name ddp --exist-ok

step teacher_train "$PYTHON" train.py --data data/shapes.yaml --cfg models/yolov5s.yaml --weights '' \
  --epochs 1 --imgsz 640 --batch-size 16 --device 0 --project "$RUNS" --name teacher --exist-ok

TEACHER="$RUNS/teacher/weights/best.pt"
[ -f "$TEACHER" ] || TEACHER="$RUNS/teacher/weights/last.pt"
step kd_train "$PYTHON" train_kd.py --teacher_weight "$TEACHER" --data data/shapes.yaml \
  --cfg models/yolov5n.yaml --weights '' --feat_loss at cwd --epochs 1 --imgsz 640 --batch-size 16 --device 0 \
  --project "$RUNS" --name kd --exist-ok

step kd_step_bench "$PYTHON" bench/kd_step.py --imgsz 640 --device 0
step kd_step_memory "$PYTHON" bench/kd_step.py --imgsz 640 --device 0 --memory --iters 1 --warmup 1

log ""
if [ "${#FAILED[@]}" -gt 0 ]; then
  log "gpu_check: FAILED steps: ${FAILED[*]} (details in $LOG)"
  exit 1
fi
log "gpu_check: all steps passed (log $LOG)"
