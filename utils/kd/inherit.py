"""Start a student from a subset of its teacher's weights ("weight selection", Xu et al., ICLR 2024: Initializing
Models with Larger Ones).

YOLOv5 sizes share one layer graph and differ in width (and in the number of bottlenecks in each C3), so every
student tensor has a teacher tensor of the same name that is as large or larger along each dimension. The student
takes evenly spaced entries of it along every dimension: index ``floor(i * t / s)`` for student size s and teacher
size t. With a whole-number ratio (yolov5s -> yolov5n: 2) that is every r-th channel, and the selection stays
consistent through concatenations: a Concat of two parts of t channels each keeps, in each part, the very
channels that part's producer kept, because t is a multiple of r. A C3 with fewer bottlenecks keeps the teacher's
first ones (the names the student has).

Left at their own initialisation: anchors and strides (the KD run takes the teacher's anchors elsewhere), a Detect
output convolution whose class count differs from the teacher's (its rows mean other classes), and any tensor the
teacher lacks or has smaller. The caller gets a summary of what was taken.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

SKIPPED_BUFFERS = ("anchors", "anchor_grid", "stride")


@dataclass
class Inherited:
    taken: int = 0  # tensors copied or selected from the teacher
    selected: int = 0  # of those, tensors the teacher held larger (evenly spaced entries taken)
    total: int = 0  # tensors in the student's state_dict
    kept: list = field(default_factory=list)  # (name, why) of tensors left at the student's own initialisation

    def summary(self) -> str:
        text = f"{self.taken}/{self.total} tensors from the teacher ({self.selected} by evenly spaced selection)"
        if self.kept:
            shown = ", ".join(f"{n} ({why})" for n, why in self.kept[:4])
            more = f" and {len(self.kept) - 4} more" if len(self.kept) > 4 else ""
            text += f"; kept their own initialisation: {shown}{more}"
        return text


def spaced_index(student_size: int, teacher_size: int) -> torch.Tensor:
    """Evenly spaced indices of student_size entries among teacher_size (floor(i * t / s), i < s)."""
    if student_size > teacher_size:
        raise ValueError(f"cannot select {student_size} entries from {teacher_size}")
    return torch.arange(student_size) * teacher_size // student_size


def select_tensor(source: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """source reduced to shape by evenly spaced selection along every dimension that differs."""
    if source.dim() != len(shape):
        raise ValueError(f"teacher tensor has {source.dim()} dimensions, the student's {len(shape)}")
    out = source
    for d, (t, s) in enumerate(zip(source.shape, shape)):
        if t != s:
            out = out.index_select(d, spaced_index(s, t).to(out.device))
    return out


def _detect_output_names(model: nn.Module) -> set:
    det = model.model[-1]
    prefix = f"model.{len(model.model) - 1}.m."
    return {f"{prefix}{i}.{p}" for i in range(det.nl) for p in ("weight", "bias")}


def graph_mismatch(student: nn.Module, teacher: nn.Module) -> str:
    """'' when both models have the same layers in the same order (layer i of the same type, from the same inputs),
    the condition for a tensor name to mean the same thing in both; else where they first differ."""
    s_layers = [(type(m).__name__, m.f) for m in student.model]
    t_layers = [(type(m).__name__, m.f) for m in teacher.model]
    for i, (s, t) in enumerate(zip(s_layers, t_layers)):
        if s != t:
            return f"layer {i} is {s} in the student and {t} in the teacher (type, inputs)"
    if len(s_layers) != len(t_layers):
        return f"the student has {len(s_layers)} layers and the teacher {len(t_layers)}"
    return ""


def check_same_graph(student: nn.Module, teacher: nn.Module) -> None:
    """Raise unless both models have the same layer graph (graph_mismatch)."""
    mismatch = graph_mismatch(student, teacher)
    if mismatch:
        raise ValueError(f"--inherit needs the teacher's layer graph, but {mismatch}; use a student YAML that differs "
                         f"from the teacher's only in depth_multiple/width_multiple (e.g. yolov5n.yaml for a yolov5s "
                         f"teacher), or drop --inherit")


def inherit_weights(student: nn.Module, teacher: nn.Module) -> Inherited:
    """Overwrite the student's weights, in place, with evenly spaced selections of the teacher's (unfused: BatchNorm
    layers still separate). Both are models.yolo.Model of one layer graph (checked); returns what was taken."""
    check_same_graph(student, teacher)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    same_classes = student.model[-1].nc == teacher.model[-1].nc
    head = _detect_output_names(student)
    report, new = Inherited(total=len(s_state)), {}
    for name, s in s_state.items():
        t = t_state.get(name)
        why = None
        if name.rsplit(".", 1)[-1] in SKIPPED_BUFFERS:
            why = "anchors/strides"
        elif t is None:
            why = "not in the teacher"
        elif name in head and not same_classes:
            why = "other classes"
        elif t.dim() != s.dim() or any(a < b for a, b in zip(t.shape, s.shape)):
            why = f"teacher shape {tuple(t.shape)}"
        if why:
            report.kept.append((name, why))
            continue
        value = t if t.shape == s.shape else select_tensor(t, s.shape)
        report.selected += t.shape != s.shape
        new[name] = value.to(dtype=s.dtype, device=s.device)
        report.taken += 1
    student.load_state_dict(new, strict=False)
    return report
