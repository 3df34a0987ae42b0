"""Convert PASCAL VOC 2007/2012 XML annotations to the YOLO layout used by data/VOC.yaml.

Input: the official VOCdevkit folder with VOC2007/ and/or VOC2012/, each holding Annotations/, JPEGImages/ and
ImageSets/Main/{train,val,test}.txt. Output (``--out``, default datasets/VOC):
    images/{train2012,val2012,train2007,val2007,test2007}/*.jpg   hard links (or symlinks / copies) of the JPEGs
    labels/{...same...}/*.txt                                      one "cls xc yc w h" row per object, normalised

Usage:
    python data/scripts/voc2yolo.py --voc-root VOCdevkit --out datasets/VOC [--keep-difficult] [--link copy]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a top-level script: make `utils` importable from any working directory

from utils.general import LOGGER, set_logging  # noqa: E402

VOC_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_SPLITS = (("2012", "train"), ("2012", "val"), ("2007", "train"), ("2007", "val"), ("2007", "test"))
LINK_MODES = ("hardlink", "symlink", "copy")


def _number(node, tag: str, xml_file) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{xml_file}: <{tag}> is missing or not a number ({text!r})") from None


def parse_voc_xml(xml_file, names=VOC_NAMES, keep_difficult: bool = False):
    """Read one VOC annotation.

    Args:
        xml_file: path of the XML file.
        names: class names; the row's class id is the name's index.
        keep_difficult: keep objects marked <difficult>1</difficult> (dropped by default, as in VOC evaluation).
    Returns:
        (rows, n_difficult_dropped): rows is a list of (cls, xc, yc, w, h) normalised by the XML's <size>.
    Raises:
        ValueError naming the file for malformed XML, a missing size, or a class name not in ``names``.
    """
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_file}: not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{xml_file}: no <size> element; cannot normalise the boxes")
    w, h = _number(size, "width", xml_file), _number(size, "height", xml_file)
    if w <= 0 or h <= 0:
        raise ValueError(f"{xml_file}: image size {w}x{h} is not positive")
    index = {n: i for i, n in enumerate(names)}
    rows, dropped = [], 0
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise ValueError(f"{xml_file}: unknown class '{name}'; expected one of {', '.join(names)}")
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "")
        if difficult and not keep_difficult:
            dropped += 1
            continue
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{xml_file}: object '{name}' has no <bndbox>")
        # VOC pixel coordinates are 1-based and inclusive: pixel xmin spans [xmin - 1, xmin) in continuous units
        x1 = min(max(_number(box, "xmin", xml_file) - 1, 0), w)
        y1 = min(max(_number(box, "ymin", xml_file) - 1, 0), h)
        x2 = min(max(_number(box, "xmax", xml_file), 0), w)
        y2 = min(max(_number(box, "ymax", xml_file), 0), h)
        rows.append((index[name], (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h))
    return rows, dropped


def format_rows(rows) -> str:
    """YOLO label text for rows of (cls, xc, yc, w, h)."""
    return "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows)


def place_file(src: Path, dst: Path, mode: str = "hardlink") -> None:
    """Put ``src`` at ``dst`` as a hard link (falling back to a copy across devices), a symlink or a copy."""
    if mode not in LINK_MODES:
        raise ValueError(f"link mode {mode!r} is not one of {LINK_MODES}")
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if mode == "symlink":
        dst.symlink_to(src.resolve())
        return
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:  # different file systems or no link support: copying still works
            pass
    shutil.copy2(src, dst)


def convert_split(devkit: Path, year: str, image_set: str, out: Path, names=VOC_NAMES,
                  keep_difficult: bool = False, mode: str = "hardlink") -> dict:
    """Convert VOC{year} ImageSets/Main/{image_set}.txt into out/{images,labels}/{image_set}{year}.

    Returns:
        {'images': n, 'objects': n, 'difficult_dropped': n}.
    """
    voc = Path(devkit) / f"VOC{year}"
    ids_file = voc / "ImageSets" / "Main" / f"{image_set}.txt"
    if not ids_file.is_file():
        raise FileNotFoundError(f"{ids_file} not found; is --voc-root the VOCdevkit folder?")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    im_dir, lb_dir = Path(out) / "images" / f"{image_set}{year}", Path(out) / "labels" / f"{image_set}{year}"
    im_dir.mkdir(parents=True, exist_ok=True)
    lb_dir.mkdir(parents=True, exist_ok=True)
    stats = {"images": 0, "objects": 0, "difficult_dropped": 0}
    for image_id in ids:
        rows, dropped = parse_voc_xml(voc / "Annotations" / f"{image_id}.xml", names, keep_difficult)
        src = voc / "JPEGImages" / f"{image_id}.jpg"
        if not src.is_file():
            raise FileNotFoundError(f"{src} listed in {ids_file} does not exist")
        (lb_dir / f"{image_id}.txt").write_text(format_rows(rows))
        place_file(src, im_dir / src.name, mode)
        stats["images"] += 1
        stats["objects"] += len(rows)
        stats["difficult_dropped"] += dropped
    return stats


def convert_voc(voc_root, out, keep_difficult: bool = False, mode: str = "hardlink", splits=VOC_SPLITS) -> dict:
    """Convert every (year, image_set) split present under ``voc_root``; absent ones are skipped with a warning.

    Returns:
        {'train2012': stats, ...} for the converted splits.
    Raises:
        FileNotFoundError naming the folder searched when no split is present.
    """
    devkit = Path(voc_root)
    if not any((devkit / f"VOC{y}").is_dir() for y, _ in splits) and (devkit / "VOCdevkit").is_dir():
        devkit = devkit / "VOCdevkit"  # the folder that holds the extracted VOCdevkit/ also works
    done = {}
    for year, image_set in splits:
        if not (devkit / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt").is_file():
            LOGGER.warning(f"WARNING: VOC{year} {image_set} split not found under {devkit}, skipping it")
            continue
        stats = convert_split(devkit, year, image_set, Path(out), keep_difficult=keep_difficult, mode=mode)
        done[f"{image_set}{year}"] = stats
        LOGGER.info(f"{image_set}{year}: {stats['images']} images, {stats['objects']} objects, "
                    f"{stats['difficult_dropped']} difficult objects dropped")
    if not done:
        raise FileNotFoundError(f"no VOC split found under {devkit} (expected VOC2007/ or VOC2012/ with "
                                f"ImageSets/Main/*.txt); point --voc-root at the extracted VOCdevkit folder")
    return done


def parse_opt(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc-root", required=True, help="VOCdevkit folder holding VOC2007/ and/or VOC2012/")
    parser.add_argument("--out", default=str(ROOT / "datasets" / "VOC"), help="output dataset root")
    parser.add_argument("--keep-difficult", action="store_true", help="keep objects marked difficult")
    parser.add_argument("--link", default="hardlink", choices=LINK_MODES, help="how images reach the output")
    return parser.parse_args(argv)


def main(opt: argparse.Namespace) -> dict:
    return convert_voc(opt.voc_root, opt.out, keep_difficult=opt.keep_difficult, mode=opt.link)


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
