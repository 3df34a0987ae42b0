"""Tests for utils/kd/classmap.py."""
import pytest

from utils.kd.classmap import (COCO_NAMES, VOC_NAMES, check_overlap, format_mapping_table, load_class_map,
                               match_classes, needs_obj_scaling, normalize_name)


def test_normalize_name():
    assert normalize_name("Dining_Table") == "diningtable"
    assert normalize_name("potted-plant") == "pottedplant"
    assert normalize_name(" TV monitor ") == "tvmonitor"


def test_name_tables():
    assert len(COCO_NAMES) == 80 and len(set(COCO_NAMES)) == 80
    assert len(VOC_NAMES) == 20 and len(set(VOC_NAMES)) == 20
    assert COCO_NAMES[0] == "person" and COCO_NAMES[-1] == "toothbrush"


def test_voc_student_coco_teacher_matches_all_20():
    index = match_classes(VOC_NAMES, COCO_NAMES)
    assert len(index) == 20 and all(j >= 0 for j in index)
    assert check_overlap(index) == 20
    pairs = {s: COCO_NAMES[j] for s, j in zip(VOC_NAMES, index)}
    assert pairs["aeroplane"] == "airplane" and pairs["motorbike"] == "motorcycle"
    assert pairs["sofa"] == "couch" and pairs["tvmonitor"] == "tv"
    assert pairs["diningtable"] == "dining table" and pairs["pottedplant"] == "potted plant"
    assert all(normalize_name(s) == normalize_name(t) for s, t in pairs.items()
               if s not in ("aeroplane", "motorbike", "sofa", "tvmonitor"))
    assert needs_obj_scaling(index, 80)
    assert not needs_obj_scaling(match_classes(COCO_NAMES, COCO_NAMES), 80)


def test_coco_student_voc_teacher():
    index = match_classes(COCO_NAMES, VOC_NAMES)
    assert sum(j >= 0 for j in index) == 20
    assert index[COCO_NAMES.index("couch")] == VOC_NAMES.index("sofa")
    assert index[COCO_NAMES.index("toothbrush")] == -1


def test_dict_names_and_override():
    student = {0: "car", 1: "Person", 2: "lorry"}
    teacher = ["person", "truck", "car"]
    assert match_classes(student, teacher) == [2, 0, -1]
    assert match_classes(student, teacher, {"lorry": "truck", "car": None}) == [-1, 0, 1]


def test_override_errors_name_the_culprit():
    with pytest.raises(ValueError, match="'lorry'.*truck"):
        match_classes(["car", "lorry"], ["car", "bus"], {"lorry": "truck"})
    with pytest.raises(ValueError, match="'van'"):
        match_classes(["car"], ["car"], {"van": "car"})


def test_no_overlap_message_says_what_to_do():
    index = match_classes(["circle", "square"], COCO_NAMES)
    assert index == [-1, -1]
    with pytest.raises(ValueError) as err:
        check_overlap(index)
    text = str(err.value)
    assert "share no names" in text and "train.py --data" in text and "--class_map" in text


def test_format_mapping_table():
    student, teacher = ["car", "person", "lorry"], ["person", "car"]
    index = match_classes(student, teacher)
    table = format_mapping_table(student, teacher, index)
    lines = table.splitlines()
    assert len(lines) == 1 + 3 + 1
    assert "car" in lines[1] and lines[1].rstrip().endswith("1 car")
    assert "lorry" in lines[3] and "none" in lines[3]
    assert "2/3" in lines[-1] and "unmatched: lorry" in lines[-1]


def test_load_class_map(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("motorbike: motorcycle\nlorry: truck\nkite: null\n")
    assert load_class_map(path) == {"motorbike": "motorcycle", "lorry": "truck", "kite": None}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- motorbike\n- motorcycle\n")
    with pytest.raises(ValueError, match="mapping"):
        load_class_map(bad)
