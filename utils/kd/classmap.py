"""Match a student's (dataset's) classes to a teacher's classes by name, for distilling across label sets.

The result is a teacher index per student class (-1: no counterpart), which utils.kd.losses.output_kd_terms takes
as ``t_cls_index``. Names match after :func:`normalize_name` and a small synonym table (VOC <-> COCO spellings);
a YAML class map (student name -> teacher name) overrides the automatic match.
"""
from __future__ import annotations

from types import MappingProxyType

from utils.general import yaml_load

COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# normalised spelling -> canonical normalised spelling. 'diningtable'/'dining table' and 'pottedplant'/'potted
# plant' need no entry: normalize_name already makes them equal.
SYNONYMS = MappingProxyType({
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "tvmonitor": "tv",
})
_NO_OVERLAP_FIX = ("train a teacher on this data (python train.py --data DATA.yaml --weights yolov5m.pt) or pass "
                   "--class_map FILE, a YAML mapping dataset class names to teacher class names")


def normalize_name(s: str) -> str:
    """Lower-case with spaces, underscores and hyphens removed: 'Dining_Table' -> 'diningtable'."""
    return "".join(ch for ch in str(s).lower() if ch not in " _-")


def _key(name) -> str:
    n = normalize_name(name)
    return SYNONYMS.get(n, n)


def _as_list(names) -> list:
    """Class names from a list/tuple or a YOLOv5 {index: name} dict."""
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names]


def match_classes(student_names, teacher_names, class_map=None) -> list:
    """Teacher class index for every student class, -1 where the teacher has no such class.

    Args:
        student_names: the dataset's class names (list, or {index: name} dict).
        teacher_names: the teacher's class names (model.names).
        class_map: optional {student name: teacher name or None}; overrides the automatic match for those classes
            (None unmaps a class). Names are compared after normalisation.

    Returns:
        list[int] of length len(student_names).

    Raises:
        ValueError: an override names a student or teacher class that does not exist.
    """
    student, teacher = _as_list(student_names), _as_list(teacher_names)
    t_index = {}
    for j, name in enumerate(teacher):
        t_index.setdefault(_key(name), j)  # a duplicated teacher name maps to its first channel
    index = [t_index.get(_key(name), -1) for name in student]
    s_index = {_key(name): i for i, name in enumerate(student)}
    for s_name, t_name in (class_map or {}).items():
        if _key(s_name) not in s_index:
            raise ValueError(f"class map names student class '{s_name}', which the dataset does not have; "
                             f"dataset classes: {_preview(student)}")
        if t_name is not None and _key(t_name) not in t_index:
            raise ValueError(f"class map sends '{s_name}' to teacher class '{t_name}', which the teacher does not "
                             f"have; teacher classes: {_preview(teacher)}")
        index[s_index[_key(s_name)]] = -1 if t_name is None else t_index[_key(t_name)]
    return index


def _preview(names, limit: int = 30) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_class_map(path) -> dict:
    """Read a class map YAML: a mapping {student class name: teacher class name or null}."""
    data = yaml_load(path)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data) or \
            not all(v is None or isinstance(v, str) for v in data.values()):
        raise ValueError(f"class map {path} must be a YAML mapping of dataset class name -> teacher class name "
                         f"(or null), e.g. 'motorbike: motorcycle'")
    return data


def format_mapping_table(student_names, teacher_names, index) -> str:
    """Printable student -> teacher class table followed by the list of unmatched student classes."""
    student, teacher = _as_list(student_names), _as_list(teacher_names)
    width = max([len(n) for n in student] + [7])
    lines = [f"{'':>4} {'student':<{width}}  ->  teacher"]
    for i, (name, j) in enumerate(zip(student, index)):
        lines.append(f"{i:>4} {name:<{width}}  ->  " + (f"{j:>3} {teacher[j]}" if j >= 0 else "  - (none)"))
    unmatched = [name for name, j in zip(student, index) if j < 0]
    matched = len(student) - len(unmatched)
    lines.append(f"{matched}/{len(student)} student classes matched; unmatched: "
                 f"{', '.join(unmatched) if unmatched else 'none'}")
    return "\n".join(lines)


def check_overlap(index) -> int:
    """Number of matched student classes; raises ValueError saying what to do when there are none."""
    matched = sum(1 for j in index if j >= 0)
    if not matched:
        raise ValueError(f"the teacher's classes share no names with the dataset's: {_NO_OVERLAP_FIX}")
    return matched


def needs_obj_scaling(index, nc_teacher: int) -> bool:
    """True when some teacher class has no student counterpart, so teacher objectness must be scaled
    (output_kd_terms(..., t_obj_scale=needs_obj_scaling(index, nc_teacher)))."""
    return len({j for j in index if j >= 0}) < nc_teacher
