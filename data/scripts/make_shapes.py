"""Generate the bundled synthetic shapes dataset (see data/shapes.yaml).

Usage:
    python data/scripts/make_shapes.py                       # datasets/shapes, 600 train / 150 val, 256 px
    python data/scripts/make_shapes.py --out /tmp/shapes --n-train 100 --n-val 20 --difficulty 0.8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a top-level script: make `utils` importable from any working directory

from utils.general import set_logging  # noqa: E402
from utils.synthetic import generate_shapes  # noqa: E402


def parse_opt(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=None, help="dataset root (same as --out)")
    parser.add_argument("--out", dest="out_opt", default=None, help="dataset root (default: datasets/shapes)")
    parser.add_argument("--n-train", type=int, default=600, help="number of training images")
    parser.add_argument("--n-val", type=int, default=150, help="number of validation images")
    parser.add_argument("--img-size", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--difficulty", type=float, default=0.5, help="0 (clean) .. 1 (heavy clutter)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    parser.add_argument("--workers", type=int, default=2, help="drawing threads")
    parser.add_argument("--format", default="jpg", choices=("jpg", "png"), help="image file format")
    return parser.parse_args(argv)


def main(opt: argparse.Namespace) -> Path:
    out = opt.out_opt or opt.out or str(ROOT / "datasets" / "shapes")
    return generate_shapes(out, n_train=opt.n_train, n_val=opt.n_val, img_size=opt.img_size,
                           difficulty=opt.difficulty, seed=opt.seed, workers=opt.workers,
                           image_format=opt.format)


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
