"""VOC XML -> YOLO conversion (data/scripts/voc2yolo.py) on small files written by the test."""
import importlib.util

import cv2
import numpy as np
import pytest

from utils.datasets import img2label_paths, list_image_files
from utils.general import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("voc2yolo", ROOT / "data" / "scripts" / "voc2yolo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


voc2yolo = load_script()


def xml_text(w, h, objects):
    """VOC annotation for objects given as (name, xmin, ymin, xmax, ymax, difficult)."""
    parts = [f"<annotation><filename>x.jpg</filename><size><width>{w}</width><height>{h}</height>"
             f"<depth>3</depth></size>"]
    for name, x1, y1, x2, y2, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
                     f"<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
                     f"</bndbox></part></object>")
    return "".join(parts) + "</annotation>"


def make_devkit(root, year, sets):
    """VOCdevkit/VOC{year} with one 100x50 image per id; sets maps image_set -> list of ids."""
    voc = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for image_set, ids in sets.items():
        (voc / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            cv2.imwrite(str(voc / "JPEGImages" / f"{i}.jpg"), np.full((50, 100, 3), 90, np.uint8))
            (voc / "Annotations" / f"{i}.xml").write_text(
                xml_text(100, 50, [("dog", 1, 1, 50, 25, 0), ("person", 51, 11, 100, 50, 1)]))


def test_parse_normalises_with_the_xml_size_and_drops_difficult(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(xml_text(100, 50, [("dog", 1, 1, 50, 25, 0), ("person", 51, 11, 100, 50, 1)]))
    rows, dropped = voc2yolo.parse_voc_xml(xml)
    assert dropped == 1 and len(rows) == 1
    cls, xc, yc, w, h = rows[0]
    assert cls == voc2yolo.VOC_NAMES.index("dog") == 11
    # 1-based inclusive pixels 1..50 span [0, 50) continuous: centre 25, width 50 on a 100 px wide image
    assert (xc, yc, w, h) == pytest.approx((0.25, 0.25, 0.5, 0.5))
    rows, dropped = voc2yolo.parse_voc_xml(xml, keep_difficult=True)
    assert dropped == 0 and rows[1] == pytest.approx((14, 0.75, 0.6, 0.5, 0.8))


def test_unknown_class_and_bad_files_name_the_problem(tmp_path):
    xml = tmp_path / "weird.xml"
    xml.write_text(xml_text(100, 50, [("dog", 1, 1, 5, 5, 0), ("unicorn", 1, 1, 5, 5, 1)]))
    with pytest.raises(ValueError, match=r"weird\.xml.*unicorn"):
        voc2yolo.parse_voc_xml(xml)
    nosize = tmp_path / "nosize.xml"
    nosize.write_text("<annotation><object><name>dog</name></object></annotation>")
    with pytest.raises(ValueError, match=r"nosize\.xml.*size"):
        voc2yolo.parse_voc_xml(nosize)
    broken = tmp_path / "broken.xml"
    broken.write_text("<annotation><size>")
    with pytest.raises(ValueError, match=r"broken\.xml"):
        voc2yolo.parse_voc_xml(broken)


def test_convert_builds_the_voc_yaml_layout(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    make_devkit(devkit, "2007", {"train": ["000001"], "val": ["000002"], "test": ["000003", "000004"]})
    make_devkit(devkit, "2012", {"train": ["2008_000001"], "val": ["2008_000002"]})
    out = tmp_path / "VOC"
    voc2yolo.main(voc2yolo.parse_opt(["--voc-root", str(devkit), "--out", str(out), "--link", "copy"]))
    for split, n in {"train2007": 1, "val2007": 1, "test2007": 2, "train2012": 1, "val2012": 1}.items():
        images = list_image_files(str(out / "images" / split))
        assert len(images) == n
        for label in img2label_paths(images):
            assert open(label).read().splitlines() == ["11 0.250000 0.250000 0.500000 0.500000"]
    stats = voc2yolo.convert_voc(tmp_path, tmp_path / "VOC2", keep_difficult=True)  # parent of VOCdevkit works too
    assert stats["test2007"] == {"images": 2, "objects": 4, "difficult_dropped": 0}
    assert (tmp_path / "VOC2" / "images" / "test2007" / "000003.jpg").stat().st_nlink >= 2  # hard-linked


def test_missing_devkit_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        voc2yolo.convert_voc(tmp_path / "nowhere", tmp_path / "out")
